"""The DiT of the demo: the tiny Token2Wav (configs/tiny.py `token2wav`) trained with flow matching on the demo
corpus's spoken replies (their open units, their mels, a reference clip of the speaker), the Thinker and
Talker frozen. run.sh main runs it after the main job, starting from that job's checkpoint, so the result
holds all three towers (Thinker, Talker, DiT):

  python train.py --config configs/demo_token2wav.py --config.data.speech_codes=WORKDIR/units/codes.json \
      --config.init_from=WORKDIR --workdir WORKDIR/token2wav
  python eval.py --config configs/demo_token2wav.py --config.data.speech_codes=... --checkpoint WORKDIR/token2wav

Without init_from every tower starts from scratch (the DiT does not read the Thinker). Measured loss curve:
docs/token2wav.md ("Training the DiT").
"""

import ml_collections

from configs import demo
from configs import tiny


def get_config() -> ml_collections.ConfigDict:
  c = demo.get_config()
  tiny.token2wav(c)
  c.data.mixture = ml_collections.ConfigDict(dict(speech=1.0))  # the spoken replies
  t = c.train
  t.objectives = ml_collections.ConfigDict({"token2wav_flow": 1.0})
  t.freeze = ("thinker", "talker")  # frozen: no optimizer state, no weight decay on them
  t.steps, t.warmup_steps, t.lr, t.weight_decay = 600, 20, 3e-3, 0.01
  t.log_every, t.eval_every, t.checkpoint_every = 50, 200, 200
  e = c.eval
  e.tasks = e.train_tasks = "loss"  # eval/token2wav_flow/loss (conditional, fixed noise and times)
  e.at_start = True
  e.samples_per_dataset = 6
  # The speech answers need <= 96 tokens; one DiT row per Thinker row (max_frames: the longest reply is 4.4 s).
  media = dict(max_images=0, max_image_patches=0, max_videos=0, max_video_patches=0, max_audios=1,
               max_audio_frames=600)
  c.data.buckets = (dict(seq_len=192, **media),)
  return c

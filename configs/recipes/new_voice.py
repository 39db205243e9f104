"""A new voice (docs/new_voice.md): fine-tune the Talker and the Token2Wav DiT on one speaker's recordings, the
Thinker frozen, so the model answers in that voice. `dir` is the output of the data step
(`python -m omni_jax.token2wav.new_voice prepare`), whose new_voice.json names the speaker, its Thinker row and
its reference clip.

  python train.py --config configs/recipes/new_voice.py:dir=voices/ada --workdir workdirs/ada \
      --config.init_from=workdirs/tiny_demo [--config.data.speech_codes=voices/ada/codes.json]
  python generate.py --checkpoint workdirs/ada --prompt "Say this aloud: good morning." --speak --speaker Ada

model=tiny (default: configs/tiny.py with its tiny DiT) or 3b / 7b (their training defaults; a converted
checkpoint brings its own Token2Wav, so --config.init_from is where the architecture comes from).
Without init_from every tower starts from scratch (what the recipe's test does, in a few steps).
"""

import json
import os

import ml_collections

from configs.recipes import common

SPLITS = ("train", "validation")


def get_config(arg=None):
  a = common.parse(arg, model="tiny", dir="")
  if not a.dir:
    raise ValueError("configs/recipes/new_voice.py needs :dir=OUT (the output of "
                     "`python -m omni_jax.token2wav.new_voice prepare ... --out OUT`)")
  out = os.path.abspath(os.path.expanduser(a.dir))
  record_path = os.path.join(out, "new_voice.json")
  if not os.path.isfile(record_path):
    raise ValueError(f"{record_path}: missing; run "
                     f"`python -m omni_jax.token2wav.new_voice prepare --out {a.dir}` first")
  with open(record_path, encoding="utf-8") as f:
    record = json.load(f)
  if a.model not in common.MODELS:
    raise ValueError(f"recipe model {a.model!r}: choose one of {sorted(common.MODELS)}")
  module = common.MODELS[a.model]
  c = module.get_config()
  if a.model == "tiny":
    module.token2wav(c)  # the tiny DiT; a converted 3B / 7B checkpoint brings its own (init_from)
  name = record["speaker"]
  talker = c.model.talker
  talker.speakers[name] = int(record["bos_token"])
  talker.default_speaker = name

  d = c.data
  d.source = "jsonl"
  d.datasets = ml_collections.ConfigDict({"voice": {s: os.path.join(out, f"voice.{s}.jsonl") for s in SPLITS}})
  d.mixture = ml_collections.ConfigDict({"voice": 1.0})
  d.speech_codes = os.path.join(out, "codes.json")  # `python -m omni_jax.units encode ... --out DIR/codes.json`
  d.worker_count = 0
  # Text prompts and replies of one sentence: short rows, no media (so the step compiles no media towers).
  media = dict(max_images=0, max_image_patches=0, max_videos=0, max_video_patches=0, max_audios=0,
               max_audio_frames=0)
  d.buckets = (dict(seq_len=128, talker_seq_len=384, **media),)

  t = c.train
  # The voice is the Talker (its codes for the Thinker's text) and the DiT (its mels): the Thinker keeps its
  # answers, so it is frozen (no optimizer state, no drift).
  t.objectives = ml_collections.ConfigDict({"talker_codes": 1.0, "token2wav_flow": 1.0})
  t.freeze = ("thinker",)
  if c.train.get("token2wav", None) is None:
    t.token2wav = ml_collections.ConfigDict(dict(time_sampling="cosine", logit_mean=0.0, logit_std=1.0,
                                                 drop_audio=0.3, drop_code=0.2, max_frames=480, ref_frames=300))
  # The reference clip first: synthesis voices the speaker with the first clip (token2wav/voice.py); training
  # picks among all of them (a different clip than the target where it can, omni_jax/token2wav/targets.py).
  clips = [record["reference"]] + [p for p in record["clips"] if p != record["reference"]]
  t.token2wav.references = {name: clips}
  if a.model == "tiny":
    t.steps, t.batch_size, t.lr, t.warmup_steps, t.weight_decay = 300, 4, 2e-3, 20, 0.01
    t.log_every, t.eval_every, t.checkpoint_every = 25, 100, 100
  else:
    t.update(dict(steps=2000, batch_size=32, lr=1e-5, warmup_steps=100, weight_decay=0.0, checkpoint_every=500,
                  keep_every=0, eval_every=250, log_every=10))
  e = c.eval
  e.tasks = e.train_tasks = "loss"  # eval/talker_codes/loss and eval/token2wav_flow/loss on the held-out clips
  e.steps, e.batch_size = 2, min(4, t.batch_size)
  return c

"""The README's main job: the tiny model (configs/tiny.py) trained on the embedded demo corpus, evaluated by
every evaluator, so that its final table shows what was learned.

  python train.py --config configs/demo.py --workdir workdirs/tiny_demo
  python eval.py --config configs/demo.py --checkpoint workdirs/tiny_demo

The learnable task is `digits` (one spoken digit per clip, 6 voices; 2 unseen voices held out): about nine
samples in ten, because its replies are one token long (the other datasets' replies, 10-40 tokens, still
carry about half the loss). Short buckets keep a step near one second on 2 CPU cores. Measured
figures: README.md ("What the main job shows") and docs/evaluation.md.
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
  c = tiny.get_config()
  d = c.data
  d.source = "demo"
  d.mixture = ml_collections.ConfigDict(dict(digits=40.0, asr=1.0, image=1.0, video=0.5, text=1.0, speech=0.5))
  # Every demo sample fits one of these (the longest, video with its audio track, is 269 tokens).
  media = dict(max_images=2, max_image_patches=512, max_videos=1, max_video_patches=512, max_audios=4,
               max_audio_frames=600)
  d.buckets = (dict(seq_len=192, **media), dict(seq_len=288, **media))
  # The Talker learns on a fixed Thinker (Qwen's recipe): its code loss does not reach the Thinker's hidden
  # states; and its weight is 0.1, so that the fresh Talker's gradients take less of the global norm that
  # clipping (train.grad_clip_norm = 1) shares out with the Thinker (our reading of the result below; the
  # per-tower norms were not measured). Measured with the
  # same 200 steps and speech codes (held-out digits; the Talker's held-out code loss): end to end, weight 1:
  # 10%, 1.96; fixed Thinker, weight 1: 30%, 1.93; fixed Thinker, weight 0.1: 47.5%, 2.00.
  c.model.talker.thinker_gradient = False
  c.train.objectives.talker_codes = 0.1
  t = c.train
  t.steps, t.eval_every, t.checkpoint_every = 200, 100, 100
  # The demo's rows carry few labels (800 rows: median 8 per row, at most 60; a batch of 4 rows: median 42, at
  # most 89), so the LM head runs on 24 positions per row pooled over the batch (96 in all) instead of tiny's 96
  # per row: about a fifth off the step against 48 per row; a batch with more labels takes the every-position
  # path (the loss is exact either way).
  t.label_budget = 24
  e = c.eval
  e.tasks = "loss,asr,mcq,open"
  e.train_tasks = "loss,asr"  # in training: the held-out loss and the digits, the rest at the end (eval.py)
  e.at_start = True  # the untrained baseline: step 0 in metrics.jsonl, the first column of eval.py's table
  e.samples_per_dataset = 8
  e.steps, e.batch_size = 64, 4  # at most; the loss evaluator reads eval.samples_per_dataset of each dataset
  e.max_new_tokens = ml_collections.ConfigDict(dict(asr=32, mcq=8, open=24, speech=32))
  # speech (run.sh main's last step, on WORKDIR/token2wav): the spoken replies are at most 4.4 s (220 codes at
  # 50 Hz); a Talker that never stops would otherwise run to config.generate's 4096. The same bound for
  # generate.py --speak, chat.py and the server, which read config.generate.talker from the checkpoint.
  e.talker_max_new_tokens = 256
  c.generate.talker.max_new_tokens = 256
  return c

"""Thinker pre-training stage 2 (Qwen2.5-Omni technical report): everything trains, on mixed
image/video/audio/text data.

  python train.py --config configs/recipes/stage2.py --workdir workdirs/s2 --config.init_from=workdirs/s1
  python train.py --config configs/recipes/stage2.py:model=7b --workdir DIR --config.init_from=S1_WORKDIR

Data: synthetic text/image/audio rows by default; set config.data.source for real data (docs/data.md).
"""

from configs.recipes import common


def get_config(arg=None):
  a = common.parse(arg, model="tiny")
  c = common.base(a.model)
  c.train.freeze = ()
  c.data.synthetic.kinds = ("text", "image", "audio")
  if a.model == "tiny":
    c.train.steps, c.train.lr, c.train.seq_len = 100, 1e-3, 128
  else:
    c.train.update(dict(steps=50_000, batch_size=512, seq_len=8192, lr=5e-5, warmup_steps=1000,
                        checkpoint_every=1000, keep_every=10_000, eval_every=1000))
  return c

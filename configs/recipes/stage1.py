"""Thinker pre-training stage 1 (Qwen2.5-Omni technical report): the LLM is frozen; the encoders and their
adapters train on image-text and audio-text data. phase=adapters trains only the adapters (vision merger, audio
projection), phase=encoders (the default) the whole encoders, as the paper does in that order.

  python train.py --config configs/recipes/stage1.py:phase=adapters --workdir workdirs/s1a
  python train.py --config configs/recipes/stage1.py --workdir workdirs/s1 --config.init_from=workdirs/s1a
  python train.py --config configs/recipes/stage1.py:model=3b --workdir gs://.../s1 --config.init_from=ckpt/omni3b

Frozen parameters carry no optimizer state and stay bit-identical; gradients still flow through the frozen
LLM into the encoders. Data: synthetic image/audio rows by default; set config.data.source for real data (docs/data.md).
"""

from configs.recipes import common


def get_config(arg=None):
  a = common.parse(arg, model="tiny", phase="encoders")
  c = common.base(a.model)
  if a.phase not in ("adapters", "encoders"):
    raise ValueError(f"stage1 phase {a.phase!r}: choose adapters or encoders")
  c.train.freeze = common.LLM + (common.ENCODER_BODIES if a.phase == "adapters" else ())
  c.model.thinker.vision.freeze = c.model.thinker.audio.freeze = False
  c.data.synthetic.kinds = ("image", "audio")
  if a.model == "tiny":
    c.train.steps, c.train.lr, c.train.seq_len = 100, 3e-3, 128
  else:  # paper: sequences up to 8,192 tokens in stages 1-2; batch and lr are starting points, not tuned
    c.train.update(dict(steps=10_000, batch_size=256, seq_len=8192, lr=1e-4 if a.phase == "encoders" else 1e-3,
                        warmup_steps=500, checkpoint_every=1000, keep_every=5000, eval_every=1000))
  return c

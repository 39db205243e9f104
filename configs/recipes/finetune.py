"""Fine-tune a converted checkpoint (post-training / SFT). Needs --config.init_from.

  python -m omni_jax.convert --hf_dir /path/to/Qwen2.5-Omni-3B --out_dir ckpt/omni3b
  python train.py --config configs/recipes/finetune.py:model=3b --workdir workdirs/ft --config.init_from=ckpt/omni3b

The model architecture stored with the checkpoint is used (model=... only picks the training defaults).
The encoders are frozen by default (no optimizer state, no weight decay drift); pass
--config.train.freeze='()' to train everything.
"""

from configs.recipes import common


def get_config(arg=None):
  a = common.parse(arg, model="tiny")
  c = common.base(a.model)
  c.require_init_from = True
  c.train.freeze = common.ENCODERS
  c.data.synthetic.kinds = ("text",)
  if a.model == "tiny":
    c.train.steps, c.train.lr, c.train.warmup_steps = 50, 1e-3, 5
  else:
    c.train.update(dict(steps=3000, batch_size=64, seq_len=8192, lr=1e-5, warmup_steps=100, weight_decay=0.0,
                        checkpoint_every=500, keep_every=0, eval_every=250))
  return c

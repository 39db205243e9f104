"""Thinker pre-training stage 3 (paper §1.4): long sequences (32,768 tokens for the released models).

  python train.py --config configs/recipes/stage3.py --workdir workdirs/s3 --config.init_from=workdirs/s2
  python train.py --config configs/recipes/stage3.py:model=7b --workdir DIR --config.init_from=S2_WORKDIR

Long rows cost activation memory: every layer is rematerialised (remat_policy=full). There is no context
parallelism: attention runs over the whole sequence on each device, so the mesh's `context` axis does not
split its cost; scale with data/fsdp/tensor instead.
"""

from configs.recipes import common


def get_config(arg=None):
  a = common.parse(arg, model="tiny")
  c = common.base(a.model)
  c.train.freeze = ()
  c.model.remat_policy = "full"
  c.data.synthetic.kinds = ("text", "image", "audio")
  if a.model == "tiny":
    c.train.steps, c.train.lr, c.train.seq_len, c.train.batch_size = 50, 5e-4, 512, 2
    c.eval.batch_size = 2
  else:
    c.train.update(dict(steps=5000, batch_size=128, seq_len=32768, lr=2e-5, warmup_steps=200,
                        checkpoint_every=500, keep_every=2500, eval_every=500))
  return c

"""Thinker pre-training stage 3 (Qwen2.5-Omni technical report): long sequences (32,768 tokens for the released models).

  python train.py --config configs/recipes/stage3.py --workdir workdirs/s3 --config.init_from=workdirs/s2
  python train.py --config configs/recipes/stage3.py:model=7b --workdir DIR --config.init_from=S2_WORKDIR

  python train.py --config configs/recipes/stage3.py:model=7b --workdir DIR --config.mesh.context=8 ...

Long rows cost activation memory: every layer is rematerialised (remat_policy=full), attention never holds
L x L scores (attention_impl="auto": splash on TPU, Pallas flash on GPU, blocked XLA on a CPU), and the
mesh's `context` axis splits each row over devices (omni_jax/layers/context_parallel.py: load-balanced causal
chunks, K/V all-gathered per layer), combined freely with data/fsdp/tensor.
"""

from configs.recipes import common


def get_config(arg=None):
  a = common.parse(arg, model="tiny")
  c = common.base(a.model)
  c.train.freeze = ()
  c.model.remat_policy = "full"
  c.model.attention_impl = "auto"
  c.data.synthetic.kinds = ("text", "image", "audio")
  if a.model == "tiny":
    c.train.steps, c.train.lr, c.train.seq_len, c.train.batch_size = 50, 5e-4, 512, 2
    c.eval.batch_size = 2
  else:
    c.train.update(dict(steps=5000, batch_size=128, seq_len=32768, lr=2e-5, warmup_steps=200,
                        checkpoint_every=500, keep_every=2500, eval_every=500))
  return c

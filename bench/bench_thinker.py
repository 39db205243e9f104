"""Forward+backward time of our Thinker LM vs transformers' on the same config (CPU, float32).

  .venv/bin/python bench/bench_thinker.py [--size small|tiny] [--batch 4] [--seq 256] [--iters 10]

Both sides get identical weights (ours are imported from the transformers model) and the same token batch;
the loss is the mean next-token cross-entropy. Prints milliseconds per step for each and the ratio
(transformers time / ours: > 1 means we are faster). Figures are recorded in docs/performance.md.
"""

import argparse

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from common import reference_thinker, time_alternating  # noqa: E402
from omni_jax.convert import hf  # noqa: E402
from omni_jax.models import omni  # noqa: E402

SIZES = {
    "tiny": dict(vocab_size=2048, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=2),
}


def build(size: str):
  spec = dict(SIZES[size], mrope=[8, 12, 12] if size == "small" else [2, 3, 3])
  model, config, directory = reference_thinker(spec)
  graphdef, abstract = omni.abstract_model(config)
  return model, graphdef, jax.tree.map(jnp.asarray, hf.load_state(directory, abstract))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", default="small", choices=sorted(SIZES))
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--iters", type=int, default=10)
  args = p.parse_args()
  torch_model, graphdef, state = build(args.size)
  torch_model.train()
  vocab = SIZES[args.size]["vocab_size"]
  ids = np.random.default_rng(0).integers(10, vocab, size=(args.batch, args.seq))
  pos = jnp.broadcast_to(jnp.arange(args.seq), (3, args.batch, args.seq))
  seg = jnp.ones((args.batch, args.seq), jnp.int32)
  jids = jnp.asarray(ids)

  @jax.jit
  def step(state):
    def loss_fn(state):
      logits = nnx.merge(graphdef, state).thinker(jids, pos, seg)
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], jids[:, 1:]).mean()
    return jax.value_and_grad(loss_fn)(state)

  tids = torch.tensor(ids)

  def torch_step():
    torch_model.zero_grad(set_to_none=True)
    out = torch_model.model(input_ids=tids)  # thinker text model (5.x: model.language_model inside)
    logits = torch_model.lm_head(out.last_hidden_state)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), tids[:, 1:].reshape(-1))
    loss.backward()

  ours, theirs = time_alternating([lambda: jax.block_until_ready(step(state)), torch_step], args.iters)
  n_params = sum(np.size(x) for x in jax.tree.leaves(state))
  print(f"config={args.size} params={n_params / 1e6:.1f}M batch={args.batch}x{args.seq} devices={jax.devices()[0].platform}"
        f" torch_threads={torch.get_num_threads()}")
  print(f"omni_jax fwd+bwd: {ours * 1e3:.1f} ms  transformers fwd+bwd: {theirs * 1e3:.1f} ms  "
        f"ratio (transformers/omni_jax): {theirs / ours:.2f}x")


if __name__ == "__main__":
  main()

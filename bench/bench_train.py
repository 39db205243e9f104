"""Train-step throughput and MFU: our jitted step vs transformers' forward+backward+AdamW on the same model.

  .venv/bin/python bench/bench_train.py                     # tiny (configs/tiny.py text dims) and 100m
  .venv/bin/python bench/bench_train.py --sizes 100m --batch 4 --seq 256 --iters 3

Both sides start from identical weights (ours are converted from the transformers model) and train on the
same unpacked token rows: next-token cross-entropy, global-norm clipping at 1.0, AdamW. Ours is the real
train step (omni_jax.train.step: TMRoPE positions, segment masks, per-modality sums, clipping, AdamW with
masked weight decay). Float32 on both sides (bfloat16 matmuls are slow on CPUs). MFU uses the FLOPs of
docs/training.md ("MFU") against a peak: config/device table, or on CPU the best float32 matmul rate
measured in this run. The two sides are timed alternately (medians), so a shared machine's load hits both.
Prints one line per size with tokens/s, MFU and the ratio (ours / transformers). Figures are recorded in
docs/performance.md. XLA's CPU flags apply as usual, e.g. XLA_FLAGS=--xla_cpu_use_xnnpack=true.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from common import reference_thinker  # noqa: E402
from omni_jax import datasheets, sharding  # noqa: E402
from omni_jax.convert import hf  # noqa: E402
from omni_jax.models import omni  # noqa: E402
from omni_jax.train import data as data_lib  # noqa: E402
from omni_jax.train import metrics as metrics_lib  # noqa: E402
from omni_jax.train import state as state_lib  # noqa: E402
from omni_jax.train import step as step_lib  # noqa: E402

SIZES = {
    # configs/tiny.py's language model (the real 151,936-token vocabulary dominates its cost).
    "tiny": dict(vocab_size=151936, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, mrope=[2, 3, 3]),
    # ~125M parameters: a GPT-2-small-sized Qwen2.5 decoder with a 32k vocabulary.
    "100m": dict(vocab_size=32768, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, head_dim=64, mrope=[8, 12, 12]),
}


def build(size: str):
  torch_model, config, directory = reference_thinker(SIZES[size])
  _, abstract = omni.abstract_model(config)
  return torch_model, config, nnx.to_pure_dict(hf.load_state(directory, abstract))


def cpu_matmul_peak(n: int = 2048, iters: int = 5) -> float:
  """Best float32 FLOP/s of an n x n matmul on all local CPU devices' cores (an attainable-peak proxy)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(iters))
  return 2 * n ** 3 / best


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def bench(size: str, batch: int, seq: int, iters: int) -> dict:
  torch_model, config, params = build(size)
  t = config.train
  t.batch_size, t.seq_len, t.steps, t.warmup_steps, t.lr, t.grad_clip_norm = batch, seq, 1000, 10, 1e-4, 1.0
  t.weight_decay = 0.01
  mesh = sharding.make_mesh(dict(data=1), devices=jax.devices()[:1])
  setup = state_lib.Setup(config, mesh)
  state = setup.init(jax.device_put(params, setup.param_shardings))
  vocab = config.model.thinker.text.vocab_size
  ids = np.random.default_rng(0).integers(16, vocab, size=(batch, seq)).astype(np.int32)
  host = dict(input_ids=ids, labels=ids, segment_ids=np.ones_like(ids), kind=np.zeros_like(ids))
  batch_dev = data_lib.to_global(host, mesh, config.sharding_rules, batch)
  step = step_lib.jit_train_step(setup)

  def ours():
    nonlocal state
    state, m = step(state, batch_dev)
    jax.block_until_ready(m)

  torch_model.train()
  opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
  tids = torch.tensor(ids, dtype=torch.long)

  def theirs():
    opt.zero_grad(set_to_none=True)
    hidden = torch_model.model(input_ids=tids).last_hidden_state
    logits = torch_model.lm_head(hidden)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), tids[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
    opt.step()

  ours()  # compile
  theirs()  # warm-up (allocates the optimizer state)
  # Interleaved, so that both sides see the same load on a shared machine; medians.
  times = np.asarray([(_timed(ours), _timed(theirs)) for _ in range(iters)])
  ours_s, theirs_s = (float(x) for x in np.median(times, axis=0))

  flops = metrics_lib.FlopCounter(config).towers["thinker"].text_flops(batch, seq)
  n = sum(np.size(x) for x in jax.tree.leaves(params))
  text_n = sum(np.size(v) for k, v in __import__("flax").traverse_util.flatten_dict(params).items()
               if k[1] in ("model", "lm_head"))
  return dict(size=size, params=n, text_params=text_n, batch=batch, seq=seq, flops=flops,
              ours_s=ours_s, theirs_s=theirs_s, ours_tok_s=batch * seq / ours_s, theirs_tok_s=batch * seq / theirs_s)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="tiny,100m")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--peak", type=float, default=None, help="peak FLOP/s per device (default: table, or measured)")
  args = p.parse_args()
  device = jax.devices()[0]
  peak = args.peak or datasheets.PEAK_FLOPS.get(device.device_kind)
  peak_src = "given" if args.peak else "table"
  measured = []
  if peak is None:  # CPU: the best matmul rate seen before and after each size (load on a shared machine)
    peak_src = "best measured float32 2048^3 matmul"
    measured.append(cpu_matmul_peak())
  print(f"device={device.device_kind} x{jax.local_device_count()} cores={os.cpu_count()} "
        f"torch_threads={torch.get_num_threads()} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  results = []
  for size in args.sizes.split(","):
    results.append(bench(size, args.batch, args.seq, args.iters))
    if measured:
      measured.append(cpu_matmul_peak())
  peak = peak or max(measured)
  print(f"peak {peak / 1e9:.1f} GFLOP/s per device ({peak_src})")
  for r in results:
    r["ours_mfu"], r["theirs_mfu"] = r["flops"] / r["ours_s"] / peak, r["flops"] / r["theirs_s"] / peak
    print(f"{r['size']}: {r['params'] / 1e6:.1f}M params ({r['text_params'] / 1e6:.1f}M LM), "
          f"batch {r['batch']}x{r['seq']}, "
          f"{r['flops'] / 1e9:.1f} GFLOP/step | omni_jax {r['ours_s'] * 1e3:.0f} ms/step {r['ours_tok_s']:,.0f} tok/s "
          f"MFU {r['ours_mfu']:.1%} | transformers {r['theirs_s'] * 1e3:.0f} ms/step {r['theirs_tok_s']:,.0f} tok/s "
          f"MFU {r['theirs_mfu']:.1%} | ratio omni_jax/transformers tok/s: {r['theirs_s'] / r['ours_s']:.2f}x")


if __name__ == "__main__":
  main()

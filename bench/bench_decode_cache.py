"""One decode step of the Thinker's decoder stack against the size of its KV cache, before and after a change.

  .venv/bin/python bench/bench_decode_cache.py                              # CPU: 100m-shaped stack, 4 rows
  .venv/bin/python bench/bench_decode_cache.py --baseline b2d25fa           # the same on revision b2d25fa first
  python bench/bench_decode_cache.py --size 7b --dtype bfloat16 --slots 2048,32768 --batch 1,32   # accelerator

A served conversation keeps a cache of thousands of slots (a session's max_len, the server's prompt + reply
budget), so what a decode step costs beyond reading the weights grows with the cache: attention reads every
slot, and any copy of the cache is paid at every token. Per cache size: ms per step (median of --iters runs of
--steps steps, cache donated), the cache's size, and the compiled step's bytes accessed (XLA's cost analysis).
--baseline REV measures revision REV's code first, in a child process, with this script.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SHAPES = {  # layers, hidden, intermediate, heads, kv heads (head_dim = hidden / heads)
    "tiny": (2, 64, 172, 4, 2),
    "100m": (12, 768, 2048, 12, 4),
    "7b": (28, 3584, 18944, 28, 4),
}


def measure(args) -> None:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from omni_jax.config import Runtime, TextConfig  # noqa: PLC0415
  from omni_jax.models.text import DecoderStack  # noqa: PLC0415

  layers, hidden, inter, heads, kv_heads = SHAPES[args.size]
  head_dim = hidden // heads
  third = head_dim // 2 // 4
  cfg = TextConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                   num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                   mrope_section=(head_dim // 2 - 2 * third, third, third))
  dtype = jnp.dtype(args.dtype)
  stack = DecoderStack(cfg, Runtime(dtype=dtype, param_dtype=dtype), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(stack)

  def step(state, cache, x, positions):
    out, cache = nnx.merge(graphdef, state)(x, positions, jnp.ones(x.shape[:2], jnp.int32), cache)
    return out, cache

  run = jax.jit(step, donate_argnums=(1,))
  weights = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state))
  print(f"{jax.devices()[0].device_kind}: {args.size}-shaped stack ({layers} layers, {heads}/{kv_heads} heads x "
        f"{head_dim}), {args.dtype}, weights {weights / 2**20:.0f} MiB, one token per row per step")
  print("| rows | cache slots | cache MiB | ms/step | bytes accessed MiB |")
  print("| --- | --- | --- | --- | --- |")
  for batch in (int(b) for b in args.batch.split(",")):
    for slots in (int(s) for s in args.slots.split(",")):
      cache = stack.init_cache(batch, slots)
      # distinct buffers (donated together), rows at different slots as the engine's are
      cache = cache._replace(k=jnp.zeros_like(cache.k), v=jnp.zeros_like(cache.v) + 0,
                             index=jnp.asarray(np.arange(batch) % 7 + 5, jnp.int32))
      x = jnp.ones((batch, 1, hidden), dtype)
      positions = jnp.full((3, batch, 1), 5, jnp.int32)
      compiled = run.lower(state, cache, x, positions).compile()
      cost = compiled.cost_analysis()
      cost = (cost[0] if isinstance(cost, list) else cost) or {}
      out, cache = compiled(state, cache, x, positions)
      jax.block_until_ready(out)
      times = []
      for _ in range(args.iters):
        start = time.perf_counter()
        for _ in range(args.steps):
          out, cache = compiled(state, cache, x, positions)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / args.steps)
      mib = 2 * cache.k.size * cache.k.dtype.itemsize / 2**20
      print(f"| {batch} | {slots} | {mib:.0f} | {sorted(times)[len(times) // 2] * 1e3:.2f} | "
            f"{cost.get('bytes accessed', 0) / 2**20:.0f} |", flush=True)


def baseline(args, argv) -> None:
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory() as code:
    tree = subprocess.run(["git", "-C", repo, "archive", args.baseline], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", code], input=tree, check=True)
    script = os.path.join(code, "bench", "bench_decode_cache_now.py")
    shutil.copy(os.path.abspath(__file__), script)
    print(f"== baseline: revision {args.baseline}", flush=True)
    rest = [a for i, a in enumerate(argv) if a != "--baseline" and (i == 0 or argv[i - 1] != "--baseline")
            and not a.startswith("--baseline=")]
    subprocess.run([sys.executable, script] + rest, check=True)
  print("== this checkout", flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", default="100m", choices=sorted(SHAPES))
  p.add_argument("--dtype", default="float32")
  p.add_argument("--batch", default="4", help="rows, comma-separated")
  p.add_argument("--slots", default="512,4096,16384", help="cache slots per row, comma-separated")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--baseline", default=None, metavar="REV", help="measure revision REV first, in this run")
  args = p.parse_args()
  if args.baseline:
    baseline(args, sys.argv[1:])
  measure(args)


if __name__ == "__main__":
  main()

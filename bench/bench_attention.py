"""Dense vs blocked (and, on their hardware, fused) attention: compiled memory and fwd+bwd time, as ratios.

  python bench/bench_attention.py                       # CPU: 2k, 8k, 32k tokens, one packed row
  python bench/bench_attention.py --impls blocked,splash --dtype bfloat16      # on a TPU
  python bench/bench_attention.py --impls blocked,pallas_gpu,flash_gpu,cudnn --dtype bfloat16   # on a GPU
  python bench/bench_attention.py --impls flash_gpu --tilings "wide:block_k=128,warps=8" --check 4096   # tiles, errors

Per length: one attention layer's forward + backward (q heads 4, KV heads 2, head_dim 64 by default) on a
packed row of samples of up to --segment tokens, causal within each. Memory is the compiled program's
temporaries (memory analysis). Time is the median of interleaved runs. Only programs that will run are
compiled: dense is compiled and timed where its [heads, L, L] float32 scores, probabilities and their gradients
(an estimate made before compiling: on a GPU, compiling a program autotunes it, which allocates what it needs)
fit under --max_dense_gib; otherwise its row gives that estimate. An implementation that fails to compile or
run (a mask its kernel does not support, too little memory) gets a row saying so and the bench goes on.

--tilings adds flash_gpu with other tile sizes / warps / stages (rows "flash_gpu:LABEL"); --check N compares
every implementation's output and gradients, in --dtype, with float32 dense attention at N tokens (relative
L2 error over the real tokens; bf16 rounding alone gives about 5e-3).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import time_alternating  # noqa: E402
from omni_jax.layers import flash_gpu, kernels  # noqa: E402
from omni_jax.layers.attention import SegmentMask, dot_product_attention  # noqa: E402


def packed_segments(length: int, segment: int, rng) -> np.ndarray:
  seg, at, sid = np.zeros((1, length), np.int32), 0, 1
  while at < length:
    n = int(rng.integers(segment // 4, segment + 1))
    seg[0, at:at + n] = sid
    at, sid = at + n, sid + 1
  return seg


def parse_tilings(text: str) -> dict:
  """"label:field=v,...;label2:..." -> {"flash_gpu:label": Tiling}."""
  tilings = {}
  for item in filter(None, text.split(";")):
    label, _, fields = item.partition(":")
    tilings[f"flash_gpu:{label.strip()}"] = flash_gpu.Tiling.parse(fields)
  return tilings


def attend(impl, tilings):
  """(q, k, v, seg) -> causal attention over packed samples, by implementation name or tiling label."""
  if impl in tilings:
    interpret = kernels.platform() != "gpu"
    return lambda q, k, v, seg: flash_gpu.flash_attention(q, k, v, seg, causal=True, tiling=tilings[impl],
                                                          interpret=interpret)
  return lambda q, k, v, seg: dot_product_attention(q, k, v, SegmentMask(seg, causal=True), implementation=impl)


def program(impl, length, heads, kv_heads, dim, dtype, tilings=None):
  fn = attend(impl, tilings or {})

  def loss(q, k, v, seg):
    return fn(q, k, v, seg).astype(jnp.float32).sum()

  shapes = [jax.ShapeDtypeStruct((1, length, h, dim), dtype) for h in (heads, kv_heads, kv_heads)]
  jitted = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  compiled = jitted.lower(*shapes, jax.ShapeDtypeStruct((1, length), jnp.int32)).compile()
  return compiled, compiled.memory_analysis().temp_size_in_bytes


def dense_estimate(length: int, heads: int) -> int:
  """Bytes of dense attention's largest temporaries for one row: float32 scores, probabilities and the gradient
  of each, [heads, L, L] apiece (a lower bound of what the compiled program holds)."""
  return 4 * heads * length * length * 4


def errors(impls, tilings, length, a, rng) -> None:
  """Relative L2 error of each implementation's output and q/k/v gradients in --dtype against float32 dense."""
  seg = jnp.asarray(packed_segments(length, a.segment, rng))
  args = [jnp.asarray(rng.normal(size=(1, length, h, a.dim)), jnp.float32) for h in (a.heads, a.kv_heads, a.kv_heads)]
  real = (seg > 0)[:, :, None, None]
  weights = jnp.asarray(rng.normal(size=args[0].shape), jnp.float32) * real

  def value_and_grads(impl, dtype):
    fn = attend(impl, tilings)
    run = jax.jit(lambda q, k, v: jax.value_and_grad(
        lambda *x: (fn(*x, seg).astype(jnp.float32) * weights).sum(), argnums=(0, 1, 2))(q, k, v)[1] +
        (fn(q, k, v, seg).astype(jnp.float32),))
    return [x.astype(jnp.float32) * real for x in run(*(x.astype(dtype) for x in args))]

  print(f"errors against float32 dense at {length} tokens ({a.dtype}; relative L2 over real tokens)")
  print("| check tokens | impl | out | dq | dk | dv |")
  print("| --- | --- | --- | --- | --- | --- |")
  reference = value_and_grads(None, jnp.float32)
  for impl in impls:
    try:
      grads = value_and_grads(impl, jnp.dtype(a.dtype))
    except Exception as e:  # noqa: BLE001
      print(f"| {length} | {impl} | failed ({_short(e)}) | - | - | - |")
      continue
    dq, dk, dv, out = (float(jnp.linalg.norm(x - r) / jnp.linalg.norm(r)) for x, r in zip(grads, reference))
    print(f"| {length} | {impl} | {out:.2e} | {dq:.2e} | {dk:.2e} | {dv:.2e} |")


def _short(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--lengths", default="2048,8192,32768")
  p.add_argument("--impls", default="blocked", help="compared against dense (None)")
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--segment", type=int, default=2048, help="longest packed sample")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--max_dense_gib", type=float, default=4.0, help="time dense only below this much temp memory")
  p.add_argument("--tilings", default="", help='flash_gpu tilings to add: "label:block_k=128,warps=8;label2:..."')
  p.add_argument("--check", type=int, default=0, help="tokens at which to compare with float32 dense (0: no check)")
  a = p.parse_args()
  dtype = jnp.dtype(a.dtype)
  rng = np.random.default_rng(0)
  tilings = parse_tilings(a.tilings)
  impls = a.impls.split(",") + list(tilings)
  print(f"device {jax.devices()[0].device_kind}; heads {a.heads}/{a.kv_heads} x {a.dim}, {a.dtype}, "
        f"packed samples of <= {a.segment} tokens")
  if a.check:  # first: a cut-short run still says whether each kernel is right
    errors(impls, tilings, a.check, a, rng)
    print()
  print("| tokens | impl | temp memory (MiB) | memory vs dense | fwd+bwd ms | time vs dense |")
  print("| --- | --- | --- | --- | --- | --- |")
  for length in (int(x) for x in a.lengths.split(",")):
    seg = jnp.asarray(packed_segments(length, a.segment, rng))
    args = [jnp.asarray(rng.normal(size=(1, length, h, a.dim)), dtype) for h in (a.heads, a.kv_heads, a.kv_heads)]
    estimate = dense_estimate(length, a.heads)
    dense_fits = estimate < a.max_dense_gib * 2**30
    dense, dense_mem, runs = None, None, []
    for impl in (["dense"] if dense_fits else []) + impls:
      try:
        compiled, mem = program(None if impl == "dense" else impl, length, a.heads, a.kv_heads, a.dim, dtype,
                                tilings)
        jax.block_until_ready(compiled(*args, seg))  # fails here, not in the timing, if it cannot run
      except Exception as e:  # noqa: BLE001 - one implementation's failure is a row of the table
        print(f"| {length} | {impl} | - | - | failed ({_short(e)}) | - |")
        continue
      if impl == "dense":
        dense, dense_mem = compiled, mem
      else:
        runs.append((impl, compiled, mem))
    fns = [lambda c=c: jax.block_until_ready(c(*args, seg)) for c in ([dense] if dense else []) + [r[1] for r in runs]]
    times = time_alternating(fns, a.iters) if fns else []
    dense_t = times[0] if dense else None
    own = times[1:] if dense else times
    if dense:
      print(f"| {length} | dense | {dense_mem / 2**20:.1f} | 1 | {dense_t * 1e3:.1f} | 1 |")
    elif not dense_fits:  # (a dense program that failed has its row already)
      print(f"| {length} | dense | >= {estimate / 2**20:.0f} (estimate; not compiled) | 1 | not run | 1 |")
    reference_mem = dense_mem if dense else estimate
    for (impl, _, mem), t in zip(runs, own):
      ratio = f"{dense_t / t:.2f}x faster" if dense_t else "-"
      print(f"| {length} | {impl} | {mem / 2**20:.1f} | {reference_mem / max(mem, 1):.1f}x less | {t * 1e3:.1f} | "
            f"{ratio} |")


if __name__ == "__main__":
  main()

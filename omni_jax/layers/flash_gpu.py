"""Flash attention for GPUs (Pallas / Triton) that visits only the tiles a packed row's segments can fill.

config.model.attention_impl="flash_gpu". Self-attention over [B, L, heads, D] with segment ids (0 = padding),
causal or not, forward and backward:
- Tiles that no pair of the same segment reaches are never loaded: each query tile loops over the key tiles
  from the first position of its earliest segment to the last position of its latest one (and, when causal,
  no further than its own last row); each key tile of the backward loops over the matching query tiles. A
  row packed with samples of at most S tokens costs about L x S instead of L^2 / 2, whatever the layout of
  the segments (the bounds are per segment id, so a segment split in several runs is still exact).
- Grouped KV heads are read in place: a query head reads its group's K/V through the grid's index map, and
  the backward accumulates dK / dV of a KV head over its query heads in one kernel (no K/V repeated to the
  query heads, no reduction of per-head gradients afterwards).
- Softmax in float32 base 2 with a finite mask value: a row that sees no key stays finite (its output is an
  average that callers ignore, as for padding), never NaN.
Off a GPU it runs in Pallas interpret mode, which is how CI checks it against dense float32 attention; the
Triton lowering itself is checked on a CPU host by lowering for CUDA.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from omni_jax.layers import flash

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Tile sizes and Triton launch settings: forward (q x k), dK/dV (k x q), dQ (q x k). Powers of two >= 16.

  The defaults use the tile shapes, warps and stages that jax's Pallas attention ran with on an H200 (so
  they are known to fit its registers and shared memory); bench/bench_attention.py --tilings sweeps others.
  """
  block_q: int = 128
  block_k: int = 64
  block_k_dkv: int = 64
  block_q_dkv: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  warps: int = 4
  warps_backward: int = 4
  stages: int = 2

  @property
  def multiple(self) -> int:
    """The sequence length must be a multiple of every tile."""
    return max(self.block_q, self.block_k, self.block_k_dkv, self.block_q_dkv, self.block_q_dq, self.block_k_dq)

  @classmethod
  def parse(cls, text: str) -> "Tiling":
    """'block_q=128,block_k=128,warps=8' -> Tiling (unnamed fields keep their defaults)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for item in filter(None, text.split(",")):
      name, _, value = item.partition("=")
      if name.strip() not in fields:
        raise ValueError(f"unknown tiling field {name.strip()!r} in {text!r}; fields: {sorted(fields)}")
      values[name.strip()] = int(value)
    return cls(**values)


def segment_spans(segments: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(first, last) [B, L]: the first and last position of each token's segment id in its row; a padding
  token (0), which attends nothing and is attended by nothing, spans only itself."""
  b, length = segments.shape
  order = jnp.argsort(segments, axis=1, stable=True)  # positions grouped by id, increasing within an id
  ids = jnp.take_along_axis(segments, order, axis=1)
  step = jnp.arange(length, dtype=jnp.int32)[None]
  run_start = jnp.concatenate([jnp.ones((b, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
  run_end = jnp.concatenate([ids[:, 1:] != ids[:, :-1], jnp.ones((b, 1), bool)], axis=1)
  start_at = lax.cummax(jnp.where(run_start, step, 0), axis=1)
  end_at = lax.cummin(jnp.where(run_end, step, length - 1), axis=1, reverse=True)
  first_sorted = jnp.take_along_axis(order, start_at, axis=1)
  last_sorted = jnp.take_along_axis(order, end_at, axis=1)
  rows = jnp.arange(b)[:, None]
  first = jnp.zeros_like(segments).at[rows, order].set(first_sorted.astype(segments.dtype))
  last = jnp.zeros_like(segments).at[rows, order].set(last_sorted.astype(segments.dtype))
  own = jnp.broadcast_to(step, segments.shape).astype(segments.dtype)
  return jnp.where(segments > 0, first, own), jnp.where(segments > 0, last, own)


def _query_tile_bounds(first, last, block_q: int, block_k: int, causal: bool):
  """[B, L / block_q] x 2: the key tiles [lo, hi) that each query tile may see."""
  b, length = first.shape
  lo = first.reshape(b, -1, block_q).min(axis=2) // block_k
  reach = last.reshape(b, -1, block_q).max(axis=2)
  if causal:
    reach = jnp.minimum(reach, jnp.arange(block_q - 1, length, block_q, dtype=reach.dtype)[None])
  return lo.astype(jnp.int32), (reach // block_k + 1).astype(jnp.int32)


def _key_tile_bounds(first, last, block_k: int, block_q: int, causal: bool):
  """[B, L / block_k] x 2: the query tiles [lo, hi) that may see each key tile."""
  b, length = first.shape
  start = first.reshape(b, -1, block_k).min(axis=2)
  if causal:
    start = jnp.maximum(start, jnp.arange(0, length, block_k, dtype=start.dtype)[None])
  reach = last.reshape(b, -1, block_k).max(axis=2)
  return (start // block_q).astype(jnp.int32), (reach // block_q + 1).astype(jnp.int32)


def _scores(q, k, q_seg, k_seg, q_start, k_start, *, scale: float, causal: bool):
  """[bq, bk] float32 scores in base 2 (scaled by log2 e), masked to the same segment > 0 and causality."""
  s = plgpu.dot(q, k, trans_b=True) * (scale * _LOG2E)
  allowed = (q_seg[:, None] == k_seg[None, :]) & (k_seg[None, :] > 0)
  if causal:
    rows = q_start + jnp.arange(q.shape[0])
    cols = k_start + jnp.arange(k.shape[0])
    allowed &= rows[:, None] >= cols[None, :]
  return jnp.where(allowed, s, _MASKED)


def _forward_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref, *, scale, causal, block_k):
  tile, row = pl.program_id(0), pl.program_id(1)
  block_q, d = q_ref.shape
  q = q_ref[...]
  q_start = tile * block_q
  q_seg = seg_ref[pl.ds(q_start, block_q)]

  def visit(j, carry):
    acc, m, l = carry
    keys = pl.ds(j * block_k, block_k)
    s = _scores(q, k_ref[keys, :], q_seg, seg_ref[keys], q_start, j * block_k, scale=scale, causal=causal)
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.exp2(s - m_new[:, None])
    correction = jnp.exp2(m - m_new)
    acc = acc * correction[:, None] + plgpu.dot(p.astype(v_ref.dtype), v_ref[keys, :])
    return acc, m_new, l * correction + p.sum(axis=1)

  init = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), _MASKED, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, l = lax.fori_loop(lo_ref[row, tile], hi_ref[row, tile], visit, init)
  l = jnp.maximum(l, 1e-30)  # a tile whose loop is empty (never for a real row) writes zeros
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)


def _dkv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                scale, causal, block_q, group):
  tile, row, kv_head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  block_k, d = k_ref.shape
  k, v = k_ref[...], v_ref[...]
  k_start = tile * block_k
  k_seg = seg_ref[pl.ds(k_start, block_k)]
  lo, hi = lo_ref[row, tile], hi_ref[row, tile]

  def head(g, carry):
    h = kv_head * group + g

    def visit(i, carry):
      dk, dv = carry
      queries = pl.ds(i * block_q, block_q)
      q, do = q_ref[queries, h, :], do_ref[queries, h, :]
      s = _scores(q, k, seg_ref[queries], k_seg, i * block_q, k_start, scale=scale, causal=causal)
      p = jnp.exp2(s - lse_ref[h, queries][:, None])
      dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
      ds = p * (plgpu.dot(do, v, trans_b=True) - delta_ref[h, queries][:, None])
      return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True), dv

    return lax.fori_loop(lo, hi, visit, carry)

  zeros = jnp.zeros((block_k, d), jnp.float32)
  dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               scale, causal, block_k):
  tile, row = pl.program_id(0), pl.program_id(1)
  block_q, d = q_ref.shape
  q, do = q_ref[...], do_ref[...]
  q_start = tile * block_q
  q_seg = seg_ref[pl.ds(q_start, block_q)]
  lse, delta = lse_ref[...], delta_ref[...]

  def visit(j, dq):
    keys = pl.ds(j * block_k, block_k)
    k = k_ref[keys, :]
    s = _scores(q, k, q_seg, seg_ref[keys], q_start, j * block_k, scale=scale, causal=causal)
    p = jnp.exp2(s - lse[:, None])
    ds = p * (plgpu.dot(do, v_ref[keys, :], trans_b=True) - delta[:, None])
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(lo_ref[row, tile], hi_ref[row, tile], visit, jnp.zeros((block_q, d), jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _params(warps: int, stages: int):
  return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


def _forward(q, k, v, segments, scale, causal, tiling, interpret):
  b, length, heads, d = q.shape
  group = heads // k.shape[2]
  bq, bk = tiling.block_q, tiling.block_k
  first, last = segment_spans(segments)
  lo, hi = _query_tile_bounds(first, last, bq, bk, causal)
  full = lambda shape: pl.BlockSpec(shape, lambda i, r, h: (0,) * len(shape))
  kernel = functools.partial(_forward_kernel, scale=scale, causal=causal, block_k=bk)
  out, lse = pl.pallas_call(
      kernel,
      grid=(length // bq, b, heads),
      in_specs=[
          full(lo.shape), full(hi.shape),
          pl.BlockSpec((None, bq, None, d), lambda i, r, h: (r, i, h, 0)),
          pl.BlockSpec((None, length, None, d), lambda i, r, h: (r, 0, h // group, 0)),
          pl.BlockSpec((None, length, None, d), lambda i, r, h: (r, 0, h // group, 0)),
          pl.BlockSpec((None, length), lambda i, r, h: (r, 0)),
      ],
      out_specs=[pl.BlockSpec((None, bq, None, d), lambda i, r, h: (r, i, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, r, h: (r, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, heads, length), jnp.float32)],
      compiler_params=_params(tiling.warps, tiling.stages),
      interpret=interpret,
      name="flash_gpu_forward",
  )(lo, hi, q, k, v, segments)
  return out, lse


def _backward(q, k, v, segments, out, lse, do, scale, causal, tiling, interpret):
  b, length, heads, d = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  first, last = segment_spans(segments)
  delta = jnp.einsum("blhd,blhd->bhl", out.astype(jnp.float32), do.astype(jnp.float32))
  full = lambda shape: pl.BlockSpec(shape, lambda i, r, h: (0,) * len(shape))
  row_of = lambda *shape: pl.BlockSpec((None,) + shape, lambda i, r, h: (r,) + (0,) * len(shape))

  bk, bq = tiling.block_k_dkv, tiling.block_q_dkv
  lo, hi = _key_tile_bounds(first, last, bk, bq, causal)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, causal=causal, block_q=bq, group=group),
      grid=(length // bk, b, kv_heads),
      in_specs=[
          full(lo.shape), full(hi.shape),
          row_of(length, heads, d),
          pl.BlockSpec((None, bk, None, d), lambda i, r, h: (r, i, h, 0)),
          pl.BlockSpec((None, bk, None, d), lambda i, r, h: (r, i, h, 0)),
          row_of(length), row_of(length, heads, d), row_of(heads, length), row_of(heads, length),
      ],
      out_specs=[pl.BlockSpec((None, bk, None, d), lambda i, r, h: (r, i, h, 0))] * 2,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(tiling.warps_backward, tiling.stages),
      interpret=interpret,
      name="flash_gpu_dkv",
  )(lo, hi, q, k, v, segments, do, lse, delta)

  bq, bk = tiling.block_q_dq, tiling.block_k_dq
  lo, hi = _query_tile_bounds(first, last, bq, bk, causal)
  q_tile = pl.BlockSpec((None, bq, None, d), lambda i, r, h: (r, i, h, 0))
  kv_row = pl.BlockSpec((None, length, None, d), lambda i, r, h: (r, 0, h // group, 0))
  stats = pl.BlockSpec((None, None, bq), lambda i, r, h: (r, h, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, causal=causal, block_k=bk),
      grid=(length // bq, b, heads),
      in_specs=[full(lo.shape), full(hi.shape), q_tile, kv_row, kv_row, row_of(length), q_tile, stats, stats],
      out_specs=q_tile,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(tiling.warps_backward, tiling.stages),
      interpret=interpret,
      name="flash_gpu_dq",
  )(lo, hi, q, k, v, segments, do, lse, delta)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(q, k, v, segments, scale, causal, tiling, interpret):
  return _forward(q, k, v, segments, scale, causal, tiling, interpret)[0]


def _attention_fwd(q, k, v, segments, scale, causal, tiling, interpret):
  out, lse = checkpoint_name(_forward(q, k, v, segments, scale, causal, tiling, interpret), flash.RESIDUALS)
  return out, (q, k, v, segments, out, lse)


def _attention_bwd(scale, causal, tiling, interpret, residuals, do):
  q, k, v, segments, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, segments, out, lse, do, scale, causal, tiling, interpret)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q, k, v, segments, *, causal: bool, tiling: Tiling = Tiling(),
                    interpret: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v for q [B, L, H, D], k / v [B, L, K, D] (H a multiple of K), segments [B, L].

  Pads L to the tiling's multiple (with segment 0) and D to a power of two (zeros change no score); returns
  [B, L, H, D] in q's dtype.
  """
  b, length, heads, d = q.shape
  if k.shape[1] != length or heads % k.shape[2]:
    raise ValueError(f"flash_gpu needs self-attention with grouped heads: q {q.shape}, k {k.shape}")
  padded_length = -(-length // tiling.multiple) * tiling.multiple
  padded_d = max(16, pl.next_power_of_2(d))

  def pad(a, axis, size):
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, widths) if size != a.shape[axis] else a

  q, k, v = (pad(pad(a, 1, padded_length), 3, padded_d) for a in (q, k, v))
  segments = pad(jnp.asarray(segments, jnp.int32), 1, padded_length)
  out = _attention(q, k, v, segments, 1.0 / math.sqrt(d), causal, tiling, interpret)
  return out[:, :length, :, :d]

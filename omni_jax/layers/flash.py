"""Blocked ("flash") attention in plain XLA: never materialises the L x L scores.

softmax(q k^T / sqrt(d)) v is computed over tiles of `block_q` queries x `block_k` keys with an online
softmax (running max and sum per query), the mask of each tile is computed from segment ids and token
indices (never a dense [L, L] array), and a custom backward pass recomputes each tile's probabilities from
the saved log-sum-exp, as FlashAttention does. Memory is O(L * block) instead of the dense path's O(L^2).
Tiles that the mask leaves empty (other samples of a packed row, the future of a causal one, padding) are
never visited (a while loop over each tile's non-empty partners), so a packed row of many short samples costs about the sum of their own squares.

This is the CPU implementation and the reference that the fused kernels (omni_jax/layers/kernels.py) are
checked against; it is selected with config.model.attention_impl="blocked".
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

# The name an attention kernel's forward gives what its backward reads (its output and log-sum-exp), so that a
# rematerialisation policy can keep them (models/scan.py, "dots_and_attention") instead of running the
# kernel's forward again in the backward pass: a custom VJP's residuals are otherwise recomputed whole.
RESIDUALS = "attention_kernel_residuals"

_NEG = -1e30  # a finite "minus infinity": rows that see no key stay finite (out 0, never NaN)


def _allowed(q_seg, q_idx, k_seg, k_idx, causal: bool) -> jax.Array:
  """[B, bq, bk]: query i may attend key j (same segment > 0; j not after i when causal)."""
  ok = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] > 0)
  if causal:
    ok &= q_idx[:, :, None] >= k_idx[:, None, :]
  return ok


def _tiles(a: jax.Array, block: int, axis: int, fill=0) -> jax.Array:
  """Pad `axis` to a multiple of block and move the tile index to the front: [..., L, ...] -> [n, ..., block, ...]."""
  length = a.shape[axis]
  pad = -length % block
  if pad:
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, pad)
    a = jnp.pad(a, widths, constant_values=fill)
  n = a.shape[axis] // block
  a = a.reshape(a.shape[:axis] + (n, block) + a.shape[axis + 1:])
  return jnp.moveaxis(a, axis, 0)


def _layout(q, k, v, q_seg, k_seg, q_idx, k_idx, bq: int, bk: int):
  """Tiles: q [nq, B, K, G, bq, D], k/v [nk, B, K, bk, D], segments/indices [n, B, block]."""
  b, lq, h, d = q.shape
  kh = k.shape[2]
  q5 = jnp.moveaxis(q.reshape(b, lq, kh, h // kh, d), 1, 3)  # [B, K, G, Lq, D]
  qt = _tiles(q5, bq, 3)
  kt, vt = (_tiles(jnp.moveaxis(a, 1, 2), bk, 2) for a in (k, v))  # [nk, B, K, bk, D]
  # Padded queries and keys get segment 0: they attend to and are attended by nothing.
  return (qt, kt, vt, _tiles(q_seg, bq, 1), _tiles(k_seg, bk, 1), _tiles(q_idx, bq, 1), _tiles(k_idx, bk, 1))


def _tile_table(qst, kst, qxt, kxt, causal: bool) -> jax.Array:
  """[nq, nk] bool: tile (i, j) may hold an allowed pair (a superset test from each tile's segment range and
  index bounds, exact for packed rows, whose segments are contiguous). Costs O(n^2) booleans, not O(L^2)."""
  big = jnp.iinfo(jnp.int32).max

  def summary(seg, idx):  # [n, B, block] -> per tile and row: min/max real segment, min/max index
    real = seg > 0
    return (jnp.where(real, seg, big).min(-1), jnp.where(real, seg, 0).max(-1), real.any(-1),
            jnp.where(real, idx, big).min(-1), jnp.where(real, idx, -big).max(-1))

  q_lo, q_hi, q_any, _, q_last = summary(qst, qxt)
  k_lo, k_hi, k_any, k_first, _ = summary(kst, kxt)
  pair = lambda a, b: (a[:, None], b[None, :])
  ok = (pair(q_any, k_any)[0] & pair(q_any, k_any)[1] & (q_hi[:, None] >= k_lo[None]) & (k_hi[None] >= q_lo[:, None]))
  if causal:
    ok &= q_last[:, None] >= k_first[None]
  return ok.any(-1)  # any row of the batch


def _visit_order(table: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per row of `table` ([n, m] bool): the column indices with True first, and their count."""
  return jnp.argsort(~table, axis=1, stable=True).astype(jnp.int32), table.sum(1).astype(jnp.int32)


def _scores(qi, kj, scale):
  return jnp.einsum("bkgqd,bkcd->bkgqc", qi, kj, preferred_element_type=jnp.float32) * scale


def _forward(causal, bq, bk, q, k, v, q_seg, k_seg, q_idx, k_idx):
  b, lq, h, d = q.shape
  kh = k.shape[2]
  scale = 1.0 / np.sqrt(d)
  qt, kt, vt, qst, kst, qxt, kxt = _layout(q, k, v, q_seg, k_seg, q_idx, k_idx, bq, bk)

  # Only the tiles the mask leaves non-empty are visited (a while loop per query tile, not lax.cond: a cond
  # inside a scanned, differentiated layer makes JAX keep every tile's scores as residuals).
  order, count = _visit_order(_tile_table(qst, kst, qxt, kxt, causal))

  def one_query_tile(tile):
    qi, qs, qx, visit, n = tile

    def step(t, carry):
      m, l, acc = carry
      j = visit[t]
      kj, vj, ks, kx = kt[j], vt[j], kst[j], kxt[j]
      ok = _allowed(qs, qx, ks, kx, causal)[:, None, None]  # [B, 1, 1, bq, bk]
      s = jnp.where(ok, _scores(qi, kj, scale), _NEG)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
      correction = jnp.exp(m - m_new)
      acc = acc * correction[..., None] + jnp.einsum("bkgqc,bkcd->bkgqd", p.astype(vj.dtype), vj,
                                                     preferred_element_type=jnp.float32)
      return m_new, l * correction + p.sum(-1), acc

    shape = (b, kh, h // kh, bq)
    init = (jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape + (d,), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, n, step, init)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    return out, jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), _NEG)

  out_t, lse_t = jax.lax.map(one_query_tile, (qt, qst, qxt, order, count))  # [nq, B, K, G, bq, D], [nq, B, K, G, bq]
  return out_t, lse_t


def _untile_q(t: jax.Array, lq: int) -> jax.Array:
  """[nq, B, K, G, bq, D] -> [B, Lq, K * G, D]."""
  nq, b, kh, g, bq, d = t.shape
  t = jnp.moveaxis(t, 0, 3).reshape(b, kh, g, nq * bq, d)[:, :, :, :lq]
  return jnp.moveaxis(t, 3, 1).reshape(b, lq, kh * g, d)


def _untile_kv(t: jax.Array, lk: int) -> jax.Array:
  """[nk, B, K, bk, D] -> [B, Lk, K, D]."""
  nk, b, kh, bk, d = t.shape
  return jnp.moveaxis(jnp.moveaxis(t, 0, 2).reshape(b, kh, nk * bk, d)[:, :, :lk], 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(causal, bq, bk, q, k, v, q_seg, k_seg, q_idx, k_idx):
  out_t, _ = _forward(causal, bq, bk, q, k, v, q_seg, k_seg, q_idx, k_idx)
  return _untile_q(out_t, q.shape[1]).astype(q.dtype)


def _flash_fwd(causal, bq, bk, q, k, v, q_seg, k_seg, q_idx, k_idx):
  out_t, lse_t = checkpoint_name(_forward(causal, bq, bk, q, k, v, q_seg, k_seg, q_idx, k_idx), RESIDUALS)
  out = _untile_q(out_t, q.shape[1]).astype(q.dtype)
  return out, (q, k, v, q_seg, k_seg, q_idx, k_idx, out_t, lse_t)


def _flash_bwd(causal, bq, bk, residuals, d_out):
  q, k, v, q_seg, k_seg, q_idx, k_idx, out_t, lse_t = residuals
  b, lq, h, d = q.shape
  kh = k.shape[2]
  scale = 1.0 / np.sqrt(d)
  qt, kt, vt, qst, kst, qxt, kxt = _layout(q, k, v, q_seg, k_seg, q_idx, k_idx, bq, bk)
  dot = _tiles(jnp.moveaxis(d_out.reshape(b, lq, kh, h // kh, d), 1, 3), bq, 3).astype(jnp.float32)
  delta = (dot * out_t).sum(-1)  # rowsum(dO * O) [nq, B, K, G, bq]

  order, count = _visit_order(_tile_table(qst, kst, qxt, kxt, causal).T)  # per key tile: its query tiles

  def one_key_tile(dq_t, tile):
    kj, vj, ks, kx, visit, n = tile

    def step(t, carry):
      dk, dv, dq_t = carry
      i = visit[t]
      qi, doi, lse, dl, qs, qx = qt[i], dot[i], lse_t[i], delta[i], qst[i], qxt[i]
      ok = _allowed(qs, qx, ks, kx, causal)[:, None, None]
      p = jnp.where(ok, jnp.exp(_scores(qi, kj, scale) - lse[..., None]), 0.0)
      dv = dv + jnp.einsum("bkgqc,bkgqd->bkcd", p, doi)
      ds = p * (jnp.einsum("bkgqd,bkcd->bkgqc", doi, vj, preferred_element_type=jnp.float32) - dl[..., None])
      dk = dk + jnp.einsum("bkgqc,bkgqd->bkcd", ds, qi, preferred_element_type=jnp.float32) * scale
      dq = jnp.einsum("bkgqc,bkcd->bkgqd", ds, kj, preferred_element_type=jnp.float32) * scale
      return dk, dv, dq_t.at[i].add(dq)

    zeros = jnp.zeros(kj.shape, jnp.float32)
    dk, dv, dq_t = jax.lax.fori_loop(0, n, step, (zeros, zeros, dq_t))
    return dq_t, (dk, dv)

  dq_t, (dk_t, dv_t) = jax.lax.scan(one_key_tile, jnp.zeros(qt.shape, jnp.float32),
                                    (kt, vt, kst, kxt, order, count))
  no_grad = lambda a: np.zeros(a.shape, jax.dtypes.float0)
  return (_untile_q(dq_t, lq).astype(q.dtype), _untile_kv(dk_t, k.shape[1]).astype(k.dtype),
          _untile_kv(dv_t, v.shape[1]).astype(v.dtype), no_grad(q_seg), no_grad(k_seg), no_grad(q_idx),
          no_grad(k_idx))


_flash.defvjp(_flash_fwd, _flash_bwd)


def _round_block(block: int, length: int) -> int:
  return max(1, min(block, length))


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segments: jax.Array,
                      kv_segments: jax.Array, *, causal: bool, q_index: Optional[jax.Array] = None,
                      kv_index: Optional[jax.Array] = None, block_q: int = 512, block_k: int = 512) -> jax.Array:
  """[B, Lq, H, D] attention of q over k/v [B, Lk, K, D] (K divides H: grouped KV heads).

  q_segments [B, Lq], kv_segments [B, Lk]: equal ids > 0 attend to each other, 0 is padding. Causal masks
  compare token indices: q_index [B, Lq] / kv_index [B, Lk] (defaults: the last Lq of Lk positions, as
  omni_jax.layers.attention.attention_mask does); context parallelism passes the global indices of its
  load-balanced chunks. Rows that see no key return 0.
  """
  b, lq = q.shape[:2]
  lk = k.shape[1]
  if q_index is None:
    q_index = jnp.broadcast_to(jnp.arange(lq, dtype=jnp.int32) + (lk - lq), (b, lq))
  if kv_index is None:
    kv_index = jnp.broadcast_to(jnp.arange(lk, dtype=jnp.int32), (b, lk))
  as_int = lambda a, n: jnp.broadcast_to(jnp.asarray(a, jnp.int32), (b, n))
  return _flash(bool(causal), _round_block(block_q, lq), _round_block(block_k, lk), q, k, v,
                as_int(q_segments, lq), as_int(kv_segments, lk), as_int(q_index, lq), as_int(kv_index, lk))

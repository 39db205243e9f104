"""Context parallelism: a sequence split over the mesh's `context` axis.

Every op but attention is per position, so sharding the sequence (logical axis `activation_length` ->
`context`) splits them for free. Attention needs every key: each device keeps its own queries and
all-gathers the keys, values, segment ids and token indices of the row (K/V are small next to Q with
grouped heads; the gather's transpose is a reduce-scatter of dK/dV), then attends with the chosen
implementation (the blocked path never holds more than a tile of scores).

Causal load balance: with contiguous chunks the last device's queries see the whole row and the first's
almost nothing. `balanced_order` permutes a causal stack's positions so that device r holds chunks r and
2n-1-r of 2n, the same work everywhere; causality then follows the original token indices, which the
SegmentMask carries. TMRoPE positions and segment ids are computed on the unpermuted row, before the split.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from omni_jax import sharding

AXIS = "context"

_Q = ("activation_batch", "activation_length", "activation_heads", None)
_KV = ("activation_batch", "activation_length", "activation_kv_heads", None)
_ROWS = ("activation_batch", "activation_length")


def degree(length: int) -> int:
  """How many devices split a sequence of `length` inside the active mesh (1: no context parallelism)."""
  active = sharding.active()
  if active is None:
    return 1
  n = active[0].shape.get(AXIS, 1)
  return n if n > 1 and length % n == 0 else 1


def per_shard(length: int, kernel: bool) -> bool:
  """Whether attention runs per shard (`attention`): context parallelism, or a Pallas kernel on a mesh."""
  active = sharding.active()
  return active is not None and active[0].size > 1 and (degree(length) > 1 or kernel)


def balanced_order(length: int, n: int) -> Optional[np.ndarray]:
  """A permutation of range(length) putting chunks r and 2n-1-r of 2n next to each other (device r's
  share), or None when the length does not split into 2n chunks (contiguous chunks are used then)."""
  if n <= 1 or length % (2 * n):
    return None
  chunks = np.arange(length).reshape(2 * n, length // (2 * n))
  return np.concatenate([np.concatenate([chunks[r], chunks[2 * n - 1 - r]]) for r in range(n)])


def _axis_index(axes) -> jax.Array:
  """This device's linear index over mesh axes `axes` (a name or a tuple of names; None: 0)."""
  if axes is None:
    return jnp.int32(0)
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  index = jnp.int32(0)
  for a in axes:
    index = index * jax.lax.axis_size(a) + jax.lax.axis_index(a)
  return index


def attention(q, k, v, mask, attend, *, heads: int, kv_heads: int):
  """Attention of sharded q/k/v [B, L, H|K, D] under the active mesh, per shard (shard_map): all-gather
  K/V over `context` (a no-op without context parallelism), keep this shard's rows and heads, attend
  locally with `attend(q, k, v, mask)` (mask: a SegmentMask for the local queries and all keys). Also how
  the Pallas kernels run on a mesh, since XLA cannot partition a kernel call."""
  from omni_jax.layers.attention import SegmentMask  # noqa: PLC0415 - attention imports this module

  mesh, rules = sharding.active()
  b, length = q.shape[:2]
  spec = lambda names, shape: sharding.logical_to_spec(names, shape, mesh, rules, strict=False)
  q_spec, kv_spec, row_spec = spec(_Q, q.shape), spec(_KV, k.shape), spec(_ROWS, (b, length))
  q_index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) if mask.q_index is None else mask.q_index,
                             (b, length)).astype(jnp.int32)
  kv_index = q_index if mask.kv_index is None else jnp.broadcast_to(mask.kv_index, (b, length)).astype(jnp.int32)
  group = heads // kv_heads
  q_axes, kv_axes = q_spec[2], kv_spec[2]

  # Token indices matter only when rows are split (global causality); without them the fused kernels apply.
  split = degree(length) > 1
  with_index = split or mask.q_index is not None or mask.kv_index is not None

  def local(q, k, v, q_seg, kv_seg, q_idx, kv_idx):
    gather = lambda a: jax.lax.all_gather(a, AXIS, axis=1, tiled=True) if split else a
    k, v, kv_seg, kv_idx = gather(k), gather(v), gather(kv_seg), gather(kv_idx)
    if not with_index:
      q_idx = kv_idx = None
    local_heads, local_kv = q.shape[2], k.shape[2]
    if local_kv * group != local_heads:  # q heads split over `tensor`, k/v whole: take this shard's kv heads
      first = _axis_index(q_axes) * local_heads // group
      take = max(local_heads // group, 1)
      k, v = (jax.lax.dynamic_slice_in_dim(a, first, take, axis=2) for a in (k, v))
    return attend(q, k, v, SegmentMask(q_seg, kv_seg, causal=mask.causal, q_index=q_idx, kv_index=kv_idx))

  del kv_axes
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, row_spec, row_spec, row_spec, row_spec),
                       out_specs=q_spec, check_vma=False)(q, k, v, mask.q_segments, mask.kv_segments, q_index,
                                                          kv_index)

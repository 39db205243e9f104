"""Multi-head attention with grouped KV heads, rotary embeddings and segment/causal masks.

One module serves every tower: the Thinker and Talker decoders (causal + segment masks), the vision tower
(window / per-image block-diagonal masks) and the audio tower (per-chunk block-diagonal masks).
"""

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx

from omni_jax.layers import context_parallel
from omni_jax.layers import flash
from omni_jax.layers import flash_gpu
from omni_jax.layers import kernels
from omni_jax.layers.linear import Linear
from omni_jax.layers.rotary import apply_rotary
from omni_jax import sharding
from omni_jax.errors import ConfigError

# config.model.attention_impl: None / "xla" / "cudnn" build the dense mask for jax.nn.dot_product_attention;
# the others never materialise L x L (omni_jax/layers/flash.py, flash_gpu.py, kernels.py).
DENSE_IMPLS = (None, "xla", "cudnn")
IMPLEMENTATIONS = DENSE_IMPLS + ("blocked", "splash", "pallas_gpu", "flash_gpu", "auto")
KERNELS = ("splash", "pallas_gpu", "flash_gpu")  # Pallas calls: XLA cannot partition them, so they run per shard
# "auto" (the default): the platform's fused kernel; on a platform without one (the CPU), dense attention while
# a call's float32 scores [B, heads, Lq, Lk] stay under _AUTO_DENSE_BYTES (faster there, and exact), else blocked.
# On a GPU flash_gpu rather than jax's Pallas kernel (pallas_gpu): it skips the tiles other samples of a packed
# row would fill and reads grouped K/V in place.
_AUTO = {"tpu": "splash", "gpu": "flash_gpu"}
_AUTO_DENSE_BYTES = 256 << 20


def attention_mask(q_segments: jax.Array, kv_segments: Optional[jax.Array] = None, *,
                   causal: bool) -> jax.Array:
  """Boolean mask [B, 1, Lq, Lk]: True where query i may attend to key j.

  Segment ids > 0 name the sample (packed rows), window or chunk a token belongs to; 0 marks padding,
  which attends to and is attended by nothing. Padding query rows are all False; dot_product_attention
  keeps them finite and callers ignore them.
  """
  kv_segments = q_segments if kv_segments is None else kv_segments
  mask = (q_segments[:, :, None] == kv_segments[:, None, :]) & (kv_segments[:, None, :] > 0)
  if causal:
    lq, lk = q_segments.shape[1], kv_segments.shape[1]
    mask &= jnp.tril(jnp.ones((lq, lk), dtype=bool), k=lk - lq)[None]
  return mask[:, None]


@jax.tree_util.register_pytree_node_class
class SegmentMask:
  """A mask described by segment ids, never a dense array: query i attends key j when both carry the
  same segment id > 0 (a sample of a packed row, an image, an audio chunk) and, if causal, j is not after i.

  q_index / kv_index ([B, Lq] / [B, Lk], optional): the token indices causality compares (default: the last
  Lq of Lk positions); context parallelism passes the global indices of its chunks. `causal` is static.
  """

  def __init__(self, q_segments: jax.Array, kv_segments: Optional[jax.Array] = None, *, causal: bool,
               q_index: Optional[jax.Array] = None, kv_index: Optional[jax.Array] = None):
    self.q_segments = q_segments
    self.kv_segments = q_segments if kv_segments is None else kv_segments
    self.causal, self.q_index, self.kv_index = bool(causal), q_index, kv_index

  def tree_flatten(self):
    return (self.q_segments, self.kv_segments, self.q_index, self.kv_index), self.causal

  @classmethod
  def tree_unflatten(cls, causal, children):
    q_seg, kv_seg, q_index, kv_index = children
    return cls(q_seg, kv_seg, causal=causal, q_index=q_index, kv_index=kv_index)

  def dense(self) -> jax.Array:
    """The boolean [B, 1, Lq, Lk] mask (for the dense XLA / cuDNN paths)."""
    if self.q_index is None and self.kv_index is None:
      return attention_mask(self.q_segments, self.kv_segments, causal=self.causal)
    mask = attention_mask(self.q_segments, self.kv_segments, causal=False)
    if self.causal:
      b, lq = self.q_segments.shape
      lk = self.kv_segments.shape[1]
      qi = jnp.arange(lq) + (lk - lq) if self.q_index is None else self.q_index
      ki = jnp.arange(lk) if self.kv_index is None else self.kv_index
      qi, ki = jnp.broadcast_to(qi, (b, lq)), jnp.broadcast_to(ki, (b, lk))
      mask &= (qi[:, :, None] >= ki[:, None, :])[:, None]
    return mask


class LocalSegments(NamedTuple):
  """A non-causal segment mask whose segments are contiguous runs of at most `block` positions (the vision
  windows once reordered window by window). Attention then needs only the neighbouring blocks: cost
  O(L * 3 * block) instead of O(L^2), same result as attention_mask(segments, causal=False)."""
  segments: jax.Array  # [B, L], 0 = padding
  block: int


def _local_attention(q, k, v, local: LocalSegments, implementation: Optional[str]):
  """Each block of `block` queries attends to its own and the two adjacent key blocks, masked by segment.

  A contiguous segment of at most `block` positions lies within those three blocks for each of its queries.
  """
  b, length, heads, dim = q.shape
  size = local.block
  pad = -length % size
  n = (length + pad) // size
  padded = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))

  def neighbours(a):  # [B, n * size, ...] -> [B * n, 3 * size, ...]: blocks i - 1, i, i + 1
    a = padded(a).reshape(b, n, size, *a.shape[2:])
    a = jnp.pad(a, [(0, 0), (1, 1)] + [(0, 0)] * (a.ndim - 2))
    return jnp.concatenate([a[:, :-2], a[:, 1:-1], a[:, 2:]], axis=2).reshape(b * n, 3 * size, *a.shape[3:])

  q_seg = padded(local.segments).reshape(b * n, size)
  k_seg = neighbours(local.segments)
  mask = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] > 0)
  out = jax.nn.dot_product_attention(padded(q).reshape(b * n, size, heads, dim), neighbours(k), neighbours(v),
                                     mask=mask[:, None], implementation=implementation)
  return out.reshape(b, n * size, heads, dim)[:, :length]


def check_implementation(implementation: Optional[str]) -> None:
  """Raise a ConfigError naming config.model.attention_impl unless it is one of IMPLEMENTATIONS."""
  if implementation not in IMPLEMENTATIONS:
    raise ConfigError(f"config.model.attention_impl: must be one of {IMPLEMENTATIONS}, got {implementation!r}")


def resolve(implementation: Optional[str], scores: int = 0) -> Optional[str]:
  """Check an attention_impl and turn "auto" into the compiling platform's choice for a call with `scores`
  query-key pairs (B x heads x Lq x Lk)."""
  check_implementation(implementation)
  if implementation != "auto":
    return implementation
  fused = _AUTO.get(kernels.platform())
  if fused is not None:
    return fused
  return dense_or_blocked(scores)


def auto_kernel(platform: str) -> Optional[str]:
  """The fused kernel "auto" picks on a platform ("tpu", "gpu"; None elsewhere: dense or blocked by size)."""
  return _AUTO.get(platform)


# Implementations whose backward reads residuals named flash.RESIDUALS, which the "dots_and_attention"
# rematerialisation policy keeps: under it their forward runs once (others' run again in the backward pass).
NAMES_RESIDUALS = ("flash_gpu", "blocked")


def dense_or_blocked(scores: int) -> str:
  """"xla" (dense, exact) while a call's float32 scores fit _AUTO_DENSE_BYTES, else "blocked" (O(L) memory)."""
  return "xla" if 4 * scores <= _AUTO_DENSE_BYTES else "blocked"


def reads_windows_as_segments(implementation: Optional[str]) -> bool:
  """Whether a (resolved) implementation attends to LocalSegments as to a SegmentMask of the same segments:
  flash_gpu bounds each tile's loop by where its segments lie, so windows cost it no more than that."""
  return implementation == "flash_gpu"


def kernel_mask(mask, implementation: Optional[str]):
  """The mask a kernel takes: flash_gpu reads vision windows (LocalSegments, contiguous runs) as segments."""
  if reads_windows_as_segments(implementation) and isinstance(mask, LocalSegments):
    return SegmentMask(mask.segments, causal=False)
  return mask


def _segment_attention(q, k, v, mask: SegmentMask, implementation: Optional[str]):
  plain = mask.q_index is None and mask.kv_index is None
  if implementation == "splash" and plain:
    return kernels.splash_attention(q, k, v, mask.q_segments, mask.kv_segments, causal=mask.causal)
  if implementation == "pallas_gpu" and plain and q.shape[1] == k.shape[1]:
    return kernels.pallas_gpu_attention(q, k, v, mask.q_segments, mask.kv_segments, causal=mask.causal)
  if implementation == "flash_gpu" and plain and q.shape[1] == k.shape[1]:  # self-attention: one id per position
    return flash_gpu.flash_attention(q, k, v, mask.q_segments, causal=mask.causal,
                                     interpret=kernels.platform() != "gpu")
  # "blocked", and the kernels' cases they do not cover (explicit token indices, cross-length attention)
  return flash.blocked_attention(q, k, v, mask.q_segments, mask.kv_segments, causal=mask.causal,
                                 q_index=mask.q_index, kv_index=mask.kv_index)


def dot_product_attention(q, k, v, mask: Union[jax.Array, SegmentMask, LocalSegments], *,
                          implementation: Optional[str] = None):
  """softmax(q k^T / sqrt(d) + mask) v with [B, L, heads, head_dim] inputs; kv heads may be fewer (GQA).

  Query head n uses kv head n // (heads / kv_heads), as transformers' repeat_kv does. The softmax runs in
  float32 whatever the input dtype. mask: a SegmentMask (dense, blocked or a fused kernel, by
  `implementation`), LocalSegments (neighbouring blocks only), or a boolean [B, 1, Lq, Lk] array.
  """
  implementation = resolve(implementation, q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1])
  jax_impl = implementation if implementation in DENSE_IMPLS else None
  mask = kernel_mask(mask, implementation)
  if isinstance(mask, SegmentMask):
    if implementation in DENSE_IMPLS:
      return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), implementation=jax_impl)
    return _segment_attention(q, k, v, mask, implementation)
  if isinstance(mask, LocalSegments):
    return _local_attention(q, k, v, mask, jax_impl)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=jax_impl)


class KVCache(NamedTuple):
  """Functional key/value cache of a decoder stack (a pytree; it flows through the layer scan).

  Slots are written left to right. With a scalar `index` every row writes at the same slot: prefill writes
  [0, L) (left-padded prompts), each decode step the next slot(s). With an index per row ([B]: the engine's
  slots, where each row is its own conversation) row b writes at index[b] and advances by its valid tokens
  only, so a row that is not fed this step keeps its slot. `valid` marks the slots that hold a real token, so
  padding and per-row lengths never leak into attention.

  Heads come before slots in k and v: a decode step's attention is then one batched matrix-vector product
  per (row, KV head) over contiguous slots, read where the cache lies (slots before heads would make XLA
  transpose every layer's cache at every step to get there).

  k and v are one [layers, ...] array each, or (per_layer: a stack that runs unrolled over weights held one
  buffer per layer, models.scan.caches_per_layer) a tuple of one [1, ...] array per layer, so that a layer
  reads its slots from a buffer of its own rather than from a slice of the stacked array, which a compiler
  may copy before the attention's matmuls.
  """
  k: Any  # [layers, B, kv_heads, max_len, head_dim], cache dtype; or a tuple of [1, B, ...] per layer
  v: Any  # same
  valid: jax.Array  # [B, max_len] bool
  index: jax.Array  # int32 scalar, or [B]: the next slot to write (of every row, or of each)

  NAMES = ("layers", "activation_batch", "activation_kv_heads", "cache_length", None)  # logical axes of k, v

  @classmethod
  def create(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
             dtype=jnp.float32, per_layer: bool = False) -> "KVCache":
    zeros = jnp.zeros((1 if per_layer else num_layers, batch, kv_heads, max_len, head_dim), dtype)
    kv = (zeros,) * num_layers if per_layer else zeros
    return cls(kv, kv, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.valid.shape[1]

  def map_kv(self, fn=lambda x: x) -> "KVCache":
    """The cache with `fn` applied to each k / v array (the stacked one, or every layer's), laid out by the rule
    table (rows over data/fsdp, KV heads over tensor)."""
    laid_out = lambda x: sharding.constrain(fn(x), KVCache.NAMES)  # noqa: E731
    return self._replace(k=jax.tree.map(laid_out, self.k), v=jax.tree.map(laid_out, self.v))

  def append(self, valid: jax.Array) -> tuple["KVCache", SegmentMask]:
    """(the cache with the slots of L new tokens marked by `valid` [B, L] and its index advanced, mask).

    mask: new token i (slot index + i) attends to the valid slots <= its own; a SegmentMask over the slots
    (valid slots and new tokens are segment 1, the rest 0; token indices = slots), so that a long prefill can
    attend tile by tile instead of through [B, heads, L, max_len] scores. k and v of the new tokens are written
    per layer by Attention.
    """
    b, lq = valid.shape
    all_valid = write_slots(self.valid, valid.astype(bool), self.index)
    slots = jnp.arange(self.max_len, dtype=jnp.int32)
    new = jnp.arange(lq, dtype=jnp.int32)
    if jnp.ndim(self.index) == 0:
      q_index = jnp.broadcast_to(self.index + new, (b, lq))
      index = self.index + lq
    else:
      q_index = self.index[:, None] + new[None]
      index = self.index + valid.sum(axis=1, dtype=jnp.int32)
    mask = SegmentMask(valid.astype(jnp.int32), all_valid.astype(jnp.int32), causal=True, q_index=q_index,
                       kv_index=jnp.broadcast_to(slots, (b, self.max_len)))
    return self._replace(valid=all_valid, index=index), mask


def write_layer_slots(cache: jax.Array, new: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
  """cache [layers, B, kv_heads, max_len, D] with new [B, L, kv_heads, D] written at row `layer` from slot
  `index` (scalar: every row; [B]: each row its own), touching only the new slots. Writes past max_len are
  dropped."""
  zero = jnp.zeros((), jnp.int32)
  if jnp.ndim(index) == 0:
    return jax.lax.dynamic_update_slice(cache, jnp.swapaxes(new, 1, 2)[None], (layer, zero, zero, index, zero))
  b, lq = new.shape[:2]
  if b == 1 and lq <= cache.shape[3]:
    # One row (a single conversation decoding): its index is a scalar, and a slice update writes in place,
    # where XLA:GPU turns the one-row scatter below into a transpose of the whole cache at every step.
    # dynamic_update_slice moves a start past max_len - lq back; the slots before the row's index keep
    # their values, so that writes past max_len are dropped as the scatter drops them.
    start = jnp.minimum(index[0], cache.shape[3] - lq)
    old = jax.lax.dynamic_slice(cache, (layer, zero, zero, start, zero), (1, 1, cache.shape[2], lq, cache.shape[4]))
    offset = start + jnp.arange(lq) - index[0]  # the new slot each written slot takes
    moved = jnp.swapaxes(new, 1, 2)[None]
    if lq > 1:  # a prefill chunk running past the end: its first slots shift to where the row's index lies
      moved = jnp.take(moved, jnp.clip(offset, 0, lq - 1), axis=3)
    update = jnp.where((offset >= 0)[:, None], moved, old)
    return jax.lax.dynamic_update_slice(cache, update, (layer, zero, zero, start, zero))
  rows = jnp.arange(b)[:, None]
  # Advanced indices around a slice: the indexed dims [B, L] come first, then the heads and head_dim.
  return cache.at[layer, rows, :, index[:, None] + jnp.arange(lq)[None]].set(new, mode="drop")


def write_slots(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """cache [B, max_len, ...] with new [B, L, ...] written from slot `index` (scalar: every row; [B]: each row
  its own). Writes past max_len are dropped (a full row's masked-out step)."""
  if jnp.ndim(index) == 0:
    return jax.lax.dynamic_update_slice_in_dim(cache, new, index, axis=1)
  b, lq = new.shape[:2]
  rows = jnp.arange(b)[:, None]
  return cache.at[rows, index[:, None] + jnp.arange(lq)[None]].set(new, mode="drop")


def _one_row_over_cache(q, k, v, mask, implementation: Optional[str]):
  """Dense attention of one row's queries q [1, L, heads, D] over its cache k, v [1, kv_heads, slots, D] (the
  cache's own layout), mask [1, 1, L, slots], a dense implementation: each KV head is a batch row holding its
  group of query heads.

  Read through the [B, slots, kv_heads, D] view of every other call, a single row's cache is laid out by
  XLA:GPU for the attention's matmuls instead: each layer's slots are copied out before them, and the whole
  cache changes layout on its way in and out of the decode loop. This view reads the layer's slots where they
  lie. (With more rows XLA keeps the cache's layout through the usual view, and this one would move it.)"""
  _, l, heads, d = q.shape
  kv_heads, slots = k.shape[1], k.shape[2]
  group = heads // kv_heads
  q = q.reshape(l, kv_heads, group, d).transpose(1, 0, 2, 3)  # [kv_heads, L, group, D]
  mask = jnp.broadcast_to(mask, (kv_heads, 1, l, slots))
  out = jax.nn.dot_product_attention(q, k.reshape(kv_heads, slots, 1, d), v.reshape(kv_heads, slots, 1, d),
                                     mask=mask, implementation=implementation)
  return out.transpose(1, 0, 2, 3).reshape(1, l, heads, d)


class Attention(nnx.Module):
  """q/k/v/o projections around dot_product_attention.

  bias: which of (q, k, v, o) carry a bias (Qwen text: q,k,v; vision: all; Whisper audio: q,v,o).
  """

  def __init__(self, features: int, *, num_heads: int, num_kv_heads: int, head_dim: int,
               bias: tuple[bool, bool, bool, bool], rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               implementation: Optional[str] = None, rotary_dtype=None):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    # Shard units of head_dim: `tensor` splits whole heads; with fewer KV heads than the axis, k/v stay
    # replicated (as their activations must), instead of a split inside a head that forces an all-gather.
    kw.update(units=(1, head_dim))
    self.q_proj = Linear(features, num_heads * head_dim, use_bias=bias[0], names=("embed", "heads"), **kw)
    self.k_proj = Linear(features, num_kv_heads * head_dim, use_bias=bias[1], names=("embed", "kv_heads"), **kw)
    self.v_proj = Linear(features, num_kv_heads * head_dim, use_bias=bias[2], names=("embed", "kv_heads"), **kw)
    kw.update(units=(head_dim, 1))
    self.o_proj = Linear(num_heads * head_dim, features, use_bias=bias[3], names=("heads", "embed"), **kw)
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.implementation = implementation
    self.rotary_dtype = rotary_dtype

  def __call__(self, x: jax.Array, mask: Union[jax.Array, SegmentMask, LocalSegments],
               rotary: Optional[tuple[jax.Array, jax.Array]] = None, kv_cache=None):
    """x [B, L, D] -> [B, L, D].

    kv_cache: None, or (k, v, layer, index): the stack's caches ([layers, B, kv_heads, max_len, head_dim]
    each, or KVCache's per-layer tuples, indexed by `layer` as a Python int), this layer's row and the write
    slot. The new keys/values are written at row `layer`, slots [index, index + L) (in place: only the new
    slots are written), attention reads the layer's cache under `mask` (KVCache.append's), and the call
    returns (out, (k, v)) with the updated arrays.
    """
    b, l, _ = x.shape
    q = self.q_proj(x).reshape(b, l, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
    if rotary is not None:
      q = apply_rotary(q, *rotary, compute_dtype=self.rotary_dtype)
      k = apply_rotary(k, *rotary, compute_dtype=self.rotary_dtype)
    q = sharding.constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
    k = sharding.constrain(k, ("activation_batch", "activation_length", "activation_kv_heads", None))
    v = sharding.constrain(v, ("activation_batch", "activation_length", "activation_kv_heads", None))
    if kv_cache is not None:
      k_stack, v_stack, layer, index = kv_cache
      per_layer = isinstance(k_stack, tuple)  # KVCache.create(per_layer=True): this layer's own buffers
      k_cache, v_cache, row = (k_stack[layer], v_stack[layer], 0) if per_layer else (k_stack, v_stack, layer)
      k_cache = sharding.constrain(write_layer_slots(k_cache, k.astype(k_cache.dtype), row, index), KVCache.NAMES)
      v_cache = sharding.constrain(write_layer_slots(v_cache, v.astype(v_cache.dtype), row, index), KVCache.NAMES)
      k, v = (jax.lax.dynamic_index_in_dim(a, row, keepdims=False).astype(q.dtype) for a in (k_cache, v_cache))
      if per_layer:
        k_cache, v_cache = (s[:layer] + (c,) + s[layer + 1:] for s, c in ((k_stack, k_cache), (v_stack, v_cache)))
      impl = resolve(self.implementation, b * self.num_heads * l * k.shape[2])
      if impl not in DENSE_IMPLS:
        # Attention over the cache (Lq != Lk, slot indices): the fused kernels do not take it. Dense while the
        # scores are small (a decode step), else tile by tile (a long prefill never holds L x max_len scores).
        impl = dense_or_blocked(b * self.num_heads * l * k.shape[2])
      if b == 1 and impl in DENSE_IMPLS and isinstance(mask, SegmentMask):
        out = _one_row_over_cache(q, k, v, mask.dense(), impl)
        return self.o_proj(out.reshape(b, l, self.num_heads * self.head_dim)), (k_cache, v_cache)
      k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    else:
      impl = resolve(self.implementation, b * self.num_heads * l * k.shape[1])
    mask = kernel_mask(mask, impl)  # before the per-shard choice below, which takes SegmentMasks
    attend = lambda q, k, v, mask: dot_product_attention(q, k, v, mask, implementation=impl)
    if kv_cache is None and isinstance(mask, SegmentMask) and context_parallel.per_shard(l, impl in KERNELS):
      out = context_parallel.attention(q, k, v, mask, attend, heads=self.num_heads, kv_heads=self.num_kv_heads)
    else:
      out = attend(q, k, v, mask)
    out = self.o_proj(out.reshape(b, l, self.num_heads * self.head_dim))
    return out if kv_cache is None else (out, (k_cache, v_cache))

"""Fused attention kernels that take segment ids, for packed rows (config.model.attention_impl).

- "splash" (TPU): Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention) with
  `SegmentIds` and a causal or full block-sparse mask; grouped KV heads natively.
- "pallas_gpu" (GPU): Pallas/Triton flash attention (jax.experimental.pallas.ops.gpu.attention.mha) with
  segment ids. Chosen over cuDNN through jax.nn.dot_product_attention because cuDNN's mask support
  covers causal and per-row lengths but not several segments in a row, which packing needs; KV heads are
  repeated to the query heads (the kernel has no GQA). Every tile under the causal diagonal is computed.
- "flash_gpu" (GPU, the default there): our own Pallas/Triton kernel (omni_jax/layers/flash_gpu.py), which
  skips the tiles no pair of the same segment reaches and reads grouped K/V in place.
All run in Pallas interpret mode off their hardware, which is how CI checks them on CPU against the
blocked XLA implementation (omni_jax/layers/flash.py) and dense attention. Sequences are padded to the
kernels' block multiple with segment 0 (attends nothing real, attended by nothing real).
"""

import jax
import jax.numpy as jnp
import numpy as np

_BLOCK_MULTIPLE = 128  # both kernels tile sequences in multiples of this


def platform() -> str:
  """The platform the computation is compiled for: the active mesh's devices (an AOT compile on a CPU host
  for a TPU topology compiles for TPU), else the default backend's."""
  from omni_jax import sharding  # noqa: PLC0415 - sharding imports nothing from layers, but keep it local

  active = sharding.active()
  devices = active[0].devices.flat if active is not None else jax.devices()
  return next(iter(devices)).platform


def _pad_to(a: jax.Array, length: int, axis: int) -> jax.Array:
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, length - a.shape[axis])
  return jnp.pad(a, widths)


def _padded_length(length: int, block: int) -> tuple[int, int]:
  block = max(_BLOCK_MULTIPLE, min(block, -(-length // _BLOCK_MULTIPLE) * _BLOCK_MULTIPLE))
  return -(-length // block) * block, block


def splash_attention(q, k, v, q_segments, kv_segments, *, causal: bool, block: int = 512) -> jax.Array:
  """[B, Lq, H, D] over k/v [B, Lk, K, D] with segment ids (0 = padding); causal aligns the last Lq of Lk."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  b, lq, h, d = q.shape
  lk = k.shape[1]
  lq_p, bq = _padded_length(lq, block)
  lk_p, bk = _padded_length(lk, block)
  shape = (lq_p, lk_p)
  head_mask = masks.CausalMask(shape, offset=lk - lq) if causal else masks.FullMask(shape)
  sizes = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                            block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  kernel = splash.make_splash_mha(masks.MultiHeadMask([head_mask] * h), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=platform() != "tpu")
  heads_first = lambda a, n: jnp.moveaxis(_pad_to(a, n, 1), 2, 1)  # [B, H, L, D]
  qh = heads_first(q * jnp.asarray(1.0 / np.sqrt(d), q.dtype), lq_p)
  kh, vh = heads_first(k, lk_p), heads_first(v, lk_p)
  seg = lambda s, n: _pad_to(jnp.asarray(s, jnp.int32), n, 1)
  ids = splash.SegmentIds(q=seg(q_segments, lq_p), kv=seg(kv_segments, lk_p))
  out = jax.vmap(kernel)(qh, kh, vh, segment_ids=ids)
  return jnp.moveaxis(out, 1, 2)[:, :lq].astype(q.dtype)


def pallas_gpu_attention(q, k, v, q_segments, kv_segments, *, causal: bool, block: int = 128) -> jax.Array:
  """[B, L, H, D] self-attention with segment ids (query and key rows are the same tokens)."""
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention

  b, lq, h, d = q.shape
  if k.shape[1] != lq:
    raise ValueError(f"attention_impl='pallas_gpu' needs as many keys as queries (got {lq} and {k.shape[1]}); "
                     "decoding with a KV cache uses the XLA path")
  length, blk = _padded_length(lq, block)
  group = h // k.shape[2]
  k, v = (jnp.repeat(a, group, axis=2) for a in (k, v))
  pad = lambda a: _pad_to(a, length, 1)
  segments = pad(jnp.asarray(q_segments, jnp.int32))
  del kv_segments  # the same tokens: one segment id per row position
  sizes = gpu_attention.BlockSizes(block_q=blk, block_k=blk, block_q_dkv=min(blk, 64), block_kv_dkv=min(blk, 64),
                                   block_q_dq=min(blk, 64), block_kv_dq=min(blk, 64))
  out = gpu_attention.mha(pad(q), pad(k), pad(v), segments, sm_scale=float(1.0 / np.sqrt(d)), causal=causal,
                          block_sizes=sizes, interpret=platform() != "gpu")
  return out[:, :lq].astype(q.dtype)

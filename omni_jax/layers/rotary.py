"""Rotary position embeddings: inverse frequencies, sectioned multimodal RoPE (M-RoPE) and application."""

from typing import Sequence

import jax
import jax.numpy as jnp


def inv_frequencies(rotary_dim: int, theta: float) -> jax.Array:
  """1 / theta^(2i / rotary_dim) for i < rotary_dim / 2, in float32."""
  return 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))


def mrope_cos_sin(positions: jax.Array, inv_freq: jax.Array, sections: Sequence[int]):
  """cos/sin tables for sectioned multimodal RoPE (Qwen2.5-Omni's; not the interleaved Qwen3 variant).

  positions: [R, B, L] integer ids, one row per position axis (R = len(sections); text uses R = 3 with
    identical rows). Frequency slot i takes its angle from the row whose section contains i.
  Returns cos, sin of shape [B, L, 2 * len(inv_freq)] in float32 (the half-split layout: slots duplicated).
  """
  if sum(sections) != inv_freq.shape[0]:
    raise ValueError(f"rotary sections {tuple(sections)} must sum to {inv_freq.shape[0]} (head_dim / 2)")
  row_of_slot = jnp.repeat(jnp.arange(len(sections)), jnp.asarray(sections), total_repeat_length=inv_freq.shape[0])
  pos = positions.astype(jnp.float32)[row_of_slot]  # [S, B, L]: the position row each slot reads
  angles = jnp.moveaxis(pos, 0, -1) * inv_freq  # [B, L, S]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array, *, compute_dtype=None) -> jax.Array:
  """Half-split rotation x*cos + rotate_half(x)*sin. x: [B, L, H, D]; cos/sin: [B, L, D].

  compute_dtype: dtype of the rotation (None: the dtype of x, with cos/sin cast to it as transformers does
  for the language model; the vision tower rotates in float32).
  """
  dtype = compute_dtype or x.dtype
  xc = x.astype(dtype)
  cos = cos[:, :, None, :].astype(dtype)
  sin = sin[:, :, None, :].astype(dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xc[..., half:], xc[..., :half]], axis=-1)
  return (xc * cos + rotated * sin).astype(x.dtype)

"""Sizes the data pipeline and the model must agree on, in one place (pure Python + numpy, no jax: the
pipeline's worker processes import this)."""

from typing import Sequence, Union

import numpy as np


def audio_conv_frames(mel_frames):
  """Audio encoder positions after its stride-2 conv: (L - 1) // 2 + 1 (any int or numpy / jax array)."""
  return (mel_frames - 1) // 2 + 1


def audio_token_count(mel_frames: Union[int, Sequence[int], np.ndarray]):
  """Audio encoder output tokens (= AUDIO placeholders) for `mel_frames` mel frames: the stride-2 conv, then
  pooling by 2: ((L - 1) // 2 + 1 - 2) // 2 + 1. An int for an int (or a 0-d numpy array); an
  array of the same kind for a numpy or jax array (jittable)."""
  if isinstance(mel_frames, (list, tuple)) or (isinstance(mel_frames, np.ndarray) and mel_frames.ndim == 0):
    mel_frames = np.asarray(mel_frames)
  out = (audio_conv_frames(mel_frames) - 2) // 2 + 1
  return int(out) if isinstance(out, (int, np.integer)) or (isinstance(out, np.ndarray) and out.ndim == 0) else out


def patch_dim(in_channels: int, temporal_patch_size: int, patch_size: int) -> int:
  """Values per vision patch row: a (C, T, p, p) block flattened."""
  return int(in_channels) * int(temporal_patch_size) * int(patch_size) * int(patch_size)


def causal_attention_flops(rows: int, seq_len: int, layers: int, heads: int, head_dim: int) -> float:
  """Forward FLOPs of causal self-attention over rows x seq_len tokens: QK^T and AV cost 2 * L * heads *
  head_dim each per token and layer, halved by the causal mask. The model-FLOPs formulas (docs/training.md,
  "MFU") count it 3 times (forward + backward); the AOT roofline counts a flash kernel's passes."""
  return rows * seq_len * layers * 2 * 2 * seq_len * heads * head_dim / 2

"""Sizes the data pipeline and the model must agree on, in one place (pure Python + numpy, no jax: the
pipeline's worker processes import this)."""

from typing import Union

import numpy as np


def audio_token_count(mel_frames: Union[int, np.ndarray]):
  """Audio encoder output tokens (= AUDIO placeholders) for `mel_frames` mel frames: the stride-2 conv, then
  pooling by 2: ((L - 1) // 2 + 1 - 2) // 2 + 1 (spec §5.1). An int for an int, an array for an array."""
  after_conv = (np.asarray(mel_frames) - 1) // 2 + 1
  out = (after_conv - 2) // 2 + 1
  return int(out) if np.ndim(out) == 0 else out


def patch_dim(in_channels: int, temporal_patch_size: int, patch_size: int) -> int:
  """Values per vision patch row: a (C, T, p, p) block flattened."""
  return int(in_channels) * int(temporal_patch_size) * int(patch_size) * int(patch_size)

"""The converter's exceptions for the Thinker (omni_jax.convert.rules): its vision and audio encoders name some
weights differently from transformers' checkpoint, and their convolutions keep another layout."""

from typing import Optional

import ml_collections
import numpy as np

from omni_jax import sizes
from omni_jax.convert.rules import CheckpointMismatch, Rule, dense, transpose


def _conv_to_disk(x):
  return np.ascontiguousarray(np.transpose(x, (2, 1, 0)))  # [k, in, out] -> torch Conv1d [out, in, k]


def _patch_embed_shape(config: Optional[ml_collections.ConfigDict], shape: tuple) -> tuple:
  """[out, C*T*p*p] -> the Conv3d weight [out, C, T, p, p] (without a config: the released 3, 2, p layout)."""
  vision = config.model.thinker.get("vision") if config is not None else None
  c, t = (vision.in_channels, vision.temporal_patch_size) if vision is not None else (3, 2)
  p = vision.patch_size if vision is not None else int(round((shape[1] / (c * t)) ** 0.5))
  if sizes.patch_dim(c, t, p) != shape[1]:
    raise CheckpointMismatch(f"patch embedding with {shape[1]} inputs is not (C={c}, T={t}, {p}, {p})")
  return (shape[0], c, t, p, p)


def _conv3d_from_disk(x):
  return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)  # Conv3d [out, C, T, p, p] -> kernel [C*T*p*p, out]


_AUDIO, _AUDIO_DISK = r"thinker\.audio_tower\.", "thinker.audio_tower."
_VISION, _VISION_DISK = r"thinker\.visual\.", "thinker.visual."
RULES = [
    # Audio tower: the shared Attention names its output projection o_proj and the shared MLP holds fc1/fc2.
    *dense(_AUDIO + r"layers\.self_attn\.o_proj", _AUDIO_DISK + "layers.self_attn.out_proj"),
    *dense(_AUDIO + r"layers\.mlp\.(fc1|fc2)", _AUDIO_DISK + r"layers.\1"),
    Rule(_AUDIO + r"(conv1|conv2)\.kernel", _AUDIO_DISK + r"\1.weight", _conv_to_disk, _conv_to_disk),
    # Vision tower: the shared Attention names q/k/v/proj q_proj/k_proj/v_proj/o_proj; the merger's
    # nn.Sequential indices 0 and 2 are fc1 and fc2; the Conv3d patch embedding is a Linear over patch rows.
    *dense(_VISION + r"blocks\.attn\.(q|k|v)_proj", _VISION_DISK + r"blocks.attn.\1"),
    *dense(_VISION + r"blocks\.attn\.o_proj", _VISION_DISK + "blocks.attn.proj"),
    *dense(_VISION + r"merger\.fc1", _VISION_DISK + "merger.mlp.0"),
    *dense(_VISION + r"merger\.fc2", _VISION_DISK + "merger.mlp.2"),
    Rule(_VISION + r"patch_embed\.proj\.kernel", _VISION_DISK + "patch_embed.proj.weight", transpose,
         _conv3d_from_disk, _patch_embed_shape),
]


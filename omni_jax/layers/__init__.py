"""Building blocks written once and shared by every tower (text, vision, audio, talker, DiT)."""

from omni_jax.layers.attention import (Attention, KVCache, LocalSegments, SegmentMask, attention_mask,
                                      dot_product_attention)
from omni_jax.layers.conv import Conv1d, ConvTranspose1d
from omni_jax.layers.linear import Embed, Linear, param
from omni_jax.layers.mlp import GatedMLP, MLP, activation
from omni_jax.layers.norms import LayerNorm, RMSNorm
from omni_jax.layers.rotary import apply_rotary, inv_frequencies, mrope_cos_sin

__all__ = [
    "Attention", "KVCache", "LocalSegments", "SegmentMask", "attention_mask", "dot_product_attention", "Conv1d", "ConvTranspose1d", "Embed", "Linear", "param",
    "GatedMLP", "MLP", "activation", "LayerNorm", "RMSNorm", "apply_rotary", "inv_frequencies", "mrope_cos_sin",
]

"""The Qwen2.5 decoder: the Thinker's language model (and, with other sizes, the Talker's body)."""

from typing import Optional

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import nnx

from omni_jax import sharding
from omni_jax.config import Runtime, TextConfig
from omni_jax.layers import Attention, Embed, GatedMLP, RMSNorm, attention_mask, inv_frequencies, mrope_cos_sin
from omni_jax.models.scan import create_stacked, run_stacked

ACT = ("activation_batch", "activation_length", "activation_embed")


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). q/k/v with bias, o and MLP without."""

  def __init__(self, cfg: TextConfig, rt: Runtime, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, param_dtype=rt.param_dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.self_attn = Attention(cfg.hidden_size, num_heads=cfg.num_attention_heads,
                               num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                               bias=(True, True, True, False), dtype=rt.dtype, implementation=rt.attention_impl,
                               **kw)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, use_bias=False,
                        dtype=rt.dtype, **kw)

  def __call__(self, x, mask, cos, sin):
    h = self.self_attn(self.input_layernorm(x), mask, rotary=(cos, sin))
    x = sharding.constrain(x + checkpoint_name(h, "attention_out"), ACT)
    x = x + self.mlp(self.post_attention_layernorm(x))
    return sharding.constrain(x, ACT)


class TextDecoder(nnx.Module):
  """embed_tokens -> N DecoderLayers (stacked, scanned) -> final RMSNorm. Returns hidden states."""

  def __init__(self, cfg: TextConfig, rt: Runtime, *, rngs: nnx.Rngs):
    self.cfg, self.rt = cfg, rt
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, names=("vocab", "embed"), rngs=rngs,
                              dtype=rt.dtype, param_dtype=rt.param_dtype)
    self.layers = create_stacked(lambda r: DecoderLayer(cfg, rt, rngs=r), cfg.num_hidden_layers, rngs)
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, param_dtype=rt.param_dtype)

  def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """inputs_embeds [B, L, D]; positions [3, B, L] (TMRoPE rows t, h, w); segment_ids [B, L] (0 = padding).

    Attention is causal within each segment, so packed samples never see each other.
    """
    cos, sin = mrope_cos_sin(positions, inv_frequencies(self.cfg.head_dim, self.cfg.rope_theta),
                             self.cfg.mrope_section)
    mask = attention_mask(segment_ids, causal=True)
    x = sharding.constrain(inputs_embeds.astype(self.rt.dtype), ACT)
    x = run_stacked(self.layers, x, mask, cos, sin, scan=self.rt.scan_layers, remat_policy=self.rt.remat_policy)
    return self.norm(x)

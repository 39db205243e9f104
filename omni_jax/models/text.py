"""The Qwen2.5 decoder: the Thinker's language model (and, with other sizes, the Talker's body)."""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from flax import nnx

from omni_jax import sharding
from omni_jax.config import Runtime, TextConfig
from omni_jax.layers import context_parallel
from omni_jax.layers.attention import Attention, KVCache, SegmentMask
from omni_jax.layers.linear import Embed
from omni_jax.layers.mlp import GatedMLP
from omni_jax.layers.norms import RMSNorm
from omni_jax.layers.rotary import inv_frequencies, mrope_cos_sin
from omni_jax.models.scan import caches_per_layer, create_stacked, run_stacked

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

  def __call__(self, x, mask, cos, sin, index=None, carry=None, layer=None):
    """x [B, L, D] -> x; with carry (the stack's cached k, v, [layers, B, kv_heads, max_len, head_dim]) this
    layer's keys and values are written at row `layer` from slot `index`: (x, (k, v))."""
    kv_cache = None if carry is None else (*carry, layer, index)
    h = self.self_attn(self.input_layernorm(x), mask, rotary=(cos, sin), kv_cache=kv_cache)
    if kv_cache is not None:
      h, carry = h
    x = sharding.constrain(x + checkpoint_name(h, "attention_out"), ACT)
    x = x + self.mlp(self.post_attention_layernorm(x))
    x = sharding.constrain(x, ACT)
    return x if kv_cache is None else (x, carry)


class DecoderStack(nnx.Module):
  """N DecoderLayers (stacked, scanned) -> final RMSNorm; the token embedding is not part of it.

  (x, positions, segment_ids, cache) -> (x, cache). Without a cache (training, scoring) attention is causal
  within each packed segment; with a KVCache the new tokens are appended to it (prefill: the whole
  left-padded prompt, decode: one token per row) and attend to every valid slot before them.
  Used by the Thinker's language model; the Talker's body is the same stack with its own sizes.
  """

  def __init__(self, cfg: TextConfig, rt: Runtime, *, rngs: nnx.Rngs):
    self.cfg, self.rt = cfg, rt
    self.layers = create_stacked(lambda r: DecoderLayer(cfg, rt, rngs=r), cfg.num_hidden_layers, rngs)
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, param_dtype=rt.param_dtype)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens (dtype: default the compute dtype); one buffer
    per layer where scan.caches_per_layer says so."""
    c = self.cfg
    return KVCache.create(c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim,
                          dtype or self.rt.dtype, per_layer=caches_per_layer(nnx.state(self.layers)))

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: Optional[KVCache] = None) -> tuple[jax.Array, Optional[KVCache]]:
    """x [B, L, D]; positions [3, B, L] (TMRoPE rows t, h, w); segment_ids [B, L] (0 = padding).

    Returns the final-norm hidden states [B, L, D] and the updated cache (None without one).
    """
    cos, sin = mrope_cos_sin(positions, inv_frequencies(self.cfg.head_dim, self.cfg.rope_theta),
                             self.cfg.mrope_section)
    # The layers rotate in the compute dtype: cast once here, not in every layer (whose casts a scanned,
    # differentiated stack would keep per layer for the backward pass).
    cos, sin = cos.astype(self.rt.dtype), sin.astype(self.rt.dtype)
    x = sharding.constrain(x.astype(self.rt.dtype), ACT)
    if cache is None:
      # Context parallelism: the row in load-balanced causal order (layers.context_parallel), positions and
      # segments computed before; causality follows the original token indices. Undone after the stack.
      order = context_parallel.balanced_order(x.shape[1], context_parallel.degree(x.shape[1]))
      if order is None:
        mask = SegmentMask(segment_ids, causal=True)
      else:
        x, cos, sin, segment_ids = (a[:, order] for a in (x, cos, sin, segment_ids))
        x = sharding.constrain(x, ACT)
        index = jnp.asarray(order, jnp.int32)[None]
        mask = SegmentMask(segment_ids, causal=True, q_index=index, kv_index=index)
      x = run_stacked(self.layers, x, mask, cos, sin, scan=self.rt.scan_layers, remat_policy=self.rt.remat_policy)
      if order is not None:
        x = sharding.constrain(x[:, np.argsort(order)], ACT)
      return self.norm(x), None
    index = cache.index
    cache, mask = cache.append(segment_ids > 0)
    x, (k, v) = run_stacked(self.layers, x, mask, cos, sin, index, scan=self.rt.scan_layers, remat_policy="none",
                            carry=(cache.k, cache.v))
    return self.norm(x), cache._replace(k=k, v=v)


class TextDecoder(DecoderStack):
  """embed_tokens + the DecoderStack: the Thinker's language model (checkpoint prefix thinker.model), and the
  Talker's (talker.model), whose codec embeddings live in the Thinker's width (embed_dim) and are projected to
  its own hidden size before the stack."""

  def __init__(self, cfg: TextConfig, rt: Runtime, *, rngs: nnx.Rngs, embed_dim: Optional[int] = None):
    # Created first: the random initialisation draws in the same order as before the stack was split out.
    width = (cfg.hidden_size, "embed") if embed_dim is None else (embed_dim, "thinker_embed")
    self.embed_tokens = Embed(cfg.vocab_size, width[0], names=("vocab", width[1]), rngs=rngs,
                              dtype=rt.dtype, param_dtype=rt.param_dtype)
    super().__init__(cfg, rt, rngs=rngs)

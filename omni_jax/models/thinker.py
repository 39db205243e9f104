"""The Thinker: encoders (added by the vision/audio towers) + the Qwen2.5 language model + LM head."""

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from omni_jax import sharding
from omni_jax.config import Runtime, TextConfig
from omni_jax.layers import Linear
from omni_jax.models.text import TextDecoder


def merge_media(embeds: jax.Array, input_ids: jax.Array, token_id: int, features: jax.Array) -> jax.Array:
  """Replace the embeddings at `token_id` placeholders by `features`, in row-major (batch, then sequence) order.

  features: [N, D] with N >= the number of placeholders (extra rows are padding and are ignored), so the
  shapes stay static under jit. This is transformers' masked_scatter with padding allowed.
  """
  is_slot = input_ids == token_id
  index = jnp.cumsum(is_slot.reshape(-1)).reshape(is_slot.shape) - 1
  gathered = jnp.take(features.astype(embeds.dtype), jnp.clip(index, 0, features.shape[0] - 1), axis=0)
  return jnp.where(is_slot[..., None], gathered, embeds)


class Thinker(nnx.Module):
  """Attribute names follow the checkpoint (thinker.model.*, thinker.lm_head) so conversion is a table."""

  def __init__(self, text: TextConfig, rt: Runtime, *, rngs: nnx.Rngs):
    self.model = TextDecoder(text, rt, rngs=rngs)
    self.lm_head = (None if text.tie_word_embeddings else
                    Linear(text.hidden_size, text.vocab_size, use_bias=False, names=("embed", "vocab"), rngs=rngs,
                           dtype=rt.dtype, param_dtype=rt.param_dtype))

  def embed(self, input_ids: jax.Array) -> jax.Array:
    return self.model.embed_tokens(input_ids)

  def logits(self, hidden: jax.Array) -> jax.Array:
    if self.lm_head is None:
      table = self.model.embed_tokens.embedding[...].astype(hidden.dtype)
      out = jnp.einsum("bld,vd->blv", hidden, table)
    else:
      out = self.lm_head(hidden)
    return sharding.constrain(out, ("activation_batch", "activation_length", "activation_vocab"))

  def __call__(self, input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               inputs_embeds: Optional[jax.Array] = None, return_hidden: bool = False):
    """Logits [B, L, V] (and the final-norm hidden states if return_hidden, for the Talker).

    positions: [3, B, L] TMRoPE ids (omni_jax.positions); segment_ids: [B, L], 0 = padding.
    """
    embeds = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
    hidden = self.model(embeds, positions, segment_ids)
    logits = self.logits(hidden)
    return (logits, hidden) if return_hidden else logits

"""The Thinker: encoders (added by the vision/audio towers) + the Qwen2.5 language model + LM head."""

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from omni_jax import sharding
from omni_jax.config import Runtime, TextConfig, TokenIds
from omni_jax.layers import head_loss
from omni_jax.layers.attention import KVCache
from omni_jax.layers.linear import Linear
from omni_jax.models.audio import AudioConfig, AudioEncoder
from omni_jax.models.text import TextDecoder
from omni_jax.models.vision import VisionConfig, VisionEncoder


def merge_media(embeds: jax.Array, input_ids: jax.Array, token_id: int, features: jax.Array) -> jax.Array:
  """Replace the embeddings at `token_id` placeholders by `features`, in row-major (batch, then sequence) order.

  features: [N, D] with N >= the number of placeholders (extra rows are padding and are ignored), so the
  shapes stay static under jit. This is transformers' masked_scatter with padding allowed.
  features [B, N, D] (one buffer per sample): row b fills the placeholders of input_ids[b] only.
  """
  is_slot = input_ids == token_id
  features = features.astype(embeds.dtype)
  if features.ndim == 3:
    index = jnp.clip(jnp.cumsum(is_slot, axis=1) - 1, 0, features.shape[1] - 1)
    gathered = jnp.take_along_axis(features, index[..., None], axis=1)
  else:
    index = jnp.cumsum(is_slot.reshape(-1)).reshape(is_slot.shape) - 1
    gathered = jnp.take(features, jnp.clip(index, 0, features.shape[0] - 1), axis=0)
  return jnp.where(is_slot[..., None], gathered, embeds)


class Thinker(nnx.Module):
  """Attribute names follow the checkpoint (thinker.model.*, thinker.lm_head) so conversion is a table."""

  def __init__(self, text: TextConfig, rt: Runtime, *, rngs: nnx.Rngs, audio: Optional[AudioConfig] = None,
               ids: Optional[TokenIds] = None, vision: Optional[VisionConfig] = None):
    self.ids = TokenIds() if ids is None else ids
    self.model = TextDecoder(text, rt, rngs=rngs)
    self.visual = None if vision is None else VisionEncoder(vision, rt, rngs=rngs)
    self.audio_tower = None if audio is None else AudioEncoder(audio, rt, rngs=rngs)
    self.lm_head = (None if text.tie_word_embeddings else
                    Linear(text.hidden_size, text.vocab_size, use_bias=False, names=("embed", "vocab"), rngs=rngs,
                           dtype=rt.dtype, param_dtype=rt.param_dtype))

  def embed(self, input_ids: jax.Array) -> jax.Array:
    return self.model.embed_tokens(input_ids)

  def head_weight(self, dtype) -> Optional[tuple[jax.Array, tuple[str, str]]]:
    """(weight, its logical names) of the LM head as one matrix in the dtype `logits` computes in for hidden
    states of `dtype`: the tied embedding table [V, D] or lm_head's kernel [D, V]. None where the head is more
    than a matrix (an adapter, an int8 scale), which only `logits` applies."""
    if self.lm_head is None:
      return self.model.embed_tokens.embedding[...].astype(dtype), ("vocab", "embed")
    head = self.lm_head
    if head.lora is not None or head.kernel_scale is not None or head.bias is not None:
      return None
    return head.kernel[...].astype(head.dtype), ("embed", "vocab")

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, L, V] in the compute dtype: the same product the fused training loss takes."""
    head = self.head_weight(hidden.dtype)
    if head is None:  # an adapter or an int8 scale, which the Linear applies
      return sharding.constrain(self.lm_head(hidden), head_loss.LOGITS_NAMES)
    return head_loss.logits(hidden, *head)

  def merge_audio(self, embeds: jax.Array, input_ids: jax.Array, audio_features: jax.Array,
                  audio_lengths: jax.Array, **sizes) -> jax.Array:
    """Encode [A, mels, T] features (+ lengths) and write the tokens into the AUDIO placeholders."""
    if self.audio_tower is None:
      raise ValueError("audio inputs given, but the config has no model.thinker.audio section")
    tokens, _ = self.audio_tower(audio_features, audio_lengths, **sizes)
    return merge_media(embeds, input_ids, self.ids.audio_token_id, tokens)

  def merge_vision(self, embeds: jax.Array, input_ids: jax.Array, token_id: int, pixel_values: jax.Array,
                   grid_thw: jax.Array) -> jax.Array:
    """Encode a patch buffer (+ grids) and write the merged tokens into the `token_id` placeholders."""
    if self.visual is None:
      raise ValueError("image/video inputs given, but the config has no model.thinker.vision section")
    return merge_media(embeds, input_ids, token_id, self.visual(pixel_values, grid_thw))

  def embed_inputs(self, input_ids: jax.Array, *, audio_features: Optional[jax.Array] = None,
                   audio_lengths: Optional[jax.Array] = None, pixel_values: Optional[jax.Array] = None,
                   image_grid_thw: Optional[jax.Array] = None, pixel_values_videos: Optional[jax.Array] = None,
                   video_grid_thw: Optional[jax.Array] = None) -> jax.Array:
    """Token embeddings [B, L, D] with the encoded media written into their placeholders (see __call__)."""
    embeds = self.embed(input_ids)
    if audio_features is not None:
      embeds = self.merge_audio(embeds, input_ids, audio_features, audio_lengths)
    if pixel_values is not None:
      embeds = self.merge_vision(embeds, input_ids, self.ids.image_token_id, pixel_values, image_grid_thw)
    if pixel_values_videos is not None:
      embeds = self.merge_vision(embeds, input_ids, self.ids.video_token_id, pixel_values_videos, video_grid_thw)
    return embeds

  def __call__(self, input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               inputs_embeds: Optional[jax.Array] = None, return_hidden: bool = False,
               cache: Optional[KVCache] = None, **media):
    """Logits [B, L, V] (and the final-norm hidden states if return_hidden, for the Talker).

    positions: [3, B, L] TMRoPE ids (omni_jax.positions); segment_ids: [B, L], 0 = padding.
    audio_features [A, mels, T] + audio_lengths [A] (mel frames; 0 for unused rows): the audios of the whole
    batch in placeholder order (row-major over input_ids), as omni_jax.input.media.audio.pad_batch builds.
    pixel_values [P, patch_dim] + image_grid_thw [N, 3] (unused rows 0): the images of the whole batch in
    placeholder order, as omni_jax.input.media.patches.pack builds; or [B, P, patch_dim] + [B, N, 3], one
    buffer per sample (no attention across samples; shards over the batch). Videos likewise.
    cache: a KVCache (omni_jax.models.text.DecoderStack.init_cache) the tokens are appended to; the
    updated cache is then returned last: (logits[, hidden], cache).
    """
    embeds = self.embed_inputs(input_ids, **media) if inputs_embeds is None else inputs_embeds
    hidden, new_cache = self.model(embeds, positions, segment_ids, cache)
    logits = self.logits(hidden)
    out = (logits, hidden) if return_hidden else (logits,)
    if cache is not None:
      out += (new_cache,)
    return out if len(out) > 1 else out[0]

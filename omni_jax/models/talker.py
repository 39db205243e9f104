"""The Talker: a dual-track decoder that turns the Thinker's reply into speech codes.

Each input vector is the sum of two tracks in the Thinker's width: the text track (the Thinker's final-norm
hidden state + its input embedding of a reply token, or the bare embedding of a special row) and the codec
track (the embedding of the previous speech code). `thinker_to_talker_proj` maps the sum to the Talker's own
width, the shared Qwen2 decoder stack (omni_jax.models.text) runs with the Talker's TMRoPE ids, and
`codec_head` gives float32 logits over the codec vocabulary (speech codes, then pad / bos / eos / mask).
How the sequence is laid out (prompt rows, the speaker row, the reply queue) is in omni_jax.talker.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from omni_jax import special_tokens
from omni_jax.config import Runtime, TextConfig, from_config_dict
from omni_jax.errors import ConfigError
from omni_jax.layers.attention import KVCache
from omni_jax.layers.linear import Linear
from omni_jax.models.text import TextDecoder


@dataclasses.dataclass(frozen=True)
class TalkerConfig:
  """config.model.talker: the decoder's sizes (`text`, transformers' Qwen2_5OmniTalkerConfig names), the
  Thinker width of its codec table (`embedding_size`), the codec and text-stream ids, and training switches.

  num_codes: the speech codes 0 .. num_codes - 1 (8192 at release; the unit set's vocabulary); the special
    codec ids (pad / bos / eos / mask) lie above them, inside text.vocab_size.
  thinker_gradient: True trains end to end (the code loss reaches the Thinker through its hidden states and
    embeddings); False stops the gradient at the Talker's inputs.
  units_version: the hash of the speech-unit set the codes come from (omni_jax.units); training refuses codes
    of another set. None: not trained on units yet (e.g. converted released weights).
  """
  text: TextConfig
  embedding_size: int
  num_codes: int = 8192
  tts_codec_start_token_id: int = 8293
  tts_codec_end_token_id: int = 8294
  tts_codec_pad_token_id: int = 8292
  tts_codec_mask_token_id: int = 8296
  tts_text_start_token_id: int = special_tokens.TTS_BOS
  tts_text_end_token_id: int = special_tokens.TTS_EOS
  tts_text_pad_token_id: int = special_tokens.TTS_PAD
  thinker_gradient: bool = True
  units_version: Optional[str] = None
  # Voices: name -> the Thinker-vocabulary id whose embedding opens the text track (spk_dict.pt's bos_token;
  # released: Chelsie 151872, Ethan 151870). A new voice is a new name with an otherwise unused row.
  speakers: tuple[tuple[str, int], ...] = (("Chelsie", 151872), ("Ethan", 151870))
  default_speaker: str = "Chelsie"

  def speaker_token(self, name: Optional[str] = None, key: str = "model.talker") -> int:
    name = self.default_speaker if name is None else name
    table = dict(self.speakers)
    if name not in table:
      raise ConfigError(f"config.{key}.speakers: no speaker {name!r}; known: {sorted(table)}")
    return table[name]

  @property
  def codec_ids(self) -> dict:
    return dict(bos=self.tts_codec_start_token_id, eos=self.tts_codec_end_token_id,
                pad=self.tts_codec_pad_token_id, mask=self.tts_codec_mask_token_id)

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, key: str = "model.talker") -> "TalkerConfig":
    if "text" not in cfg:
      raise ConfigError(f"config.{key}.text: is missing (the Talker decoder's sizes)")
    text = TextConfig.from_config(cfg.text, f"{key}.text")
    rest = ml_collections.ConfigDict({k: v for k, v in cfg.items() if k not in ("text", "speakers")})
    speakers = cfg.get("speakers", None)
    if speakers is not None:  # a {name: bos id} mapping in the config; a sorted tuple of pairs here (hashable)
      rest.speakers = tuple(sorted((str(k), int(v)) for k, v in dict(speakers).items()))
    return from_config_dict(cls, rest, key, text=lambda _: text)

  def validate(self, key: str):
    if not isinstance(self.embedding_size, int) or self.embedding_size <= 0:
      raise ConfigError(f"config.{key}.embedding_size: must be a positive integer, got {self.embedding_size!r}")
    vocab = self.text.vocab_size
    if not 0 < self.num_codes <= vocab:
      raise ConfigError(f"config.{key}.num_codes: {self.num_codes} must be in [1, text.vocab_size={vocab}]")
    for name, value in self.codec_ids.items():
      field = {"bos": "tts_codec_start_token_id", "eos": "tts_codec_end_token_id",
               "pad": "tts_codec_pad_token_id", "mask": "tts_codec_mask_token_id"}[name]
      if not self.num_codes <= value < vocab:
        raise ConfigError(f"config.{key}.{field}: {value} must lie above the speech codes (num_codes="
                          f"{self.num_codes}) and inside the codec vocabulary (text.vocab_size={vocab})")
    if self.default_speaker not in dict(self.speakers):
      raise ConfigError(f"config.{key}.default_speaker: {self.default_speaker!r} is not in speakers "
                        f"{sorted(dict(self.speakers))}")


def talker_config(config: ml_collections.ConfigDict) -> Optional[TalkerConfig]:
  """The typed config.model.talker (None when the config builds no Talker)."""
  cfg = config.model.get("talker", None)
  return None if cfg is None else TalkerConfig.from_config(cfg)


def zero_media_rows(embeds: jax.Array, input_ids: jax.Array, media_ids) -> jax.Array:
  """The Thinker's input embeddings with the rows of media placeholders zeroed: the Talker sees
  media only through the Thinker's hidden states."""
  is_media = jnp.isin(input_ids, jnp.asarray(tuple(media_ids), input_ids.dtype))
  return jnp.where(is_media[..., None], jnp.zeros((), embeds.dtype), embeds)


class Talker(nnx.Module):
  """Attribute names follow the checkpoint (talker.thinker_to_talker_proj, talker.model.*, talker.codec_head)."""

  def __init__(self, cfg: TalkerConfig, rt: Runtime, *, rngs: nnx.Rngs):
    self.cfg = cfg
    kw = dict(rngs=rngs, dtype=rt.dtype, param_dtype=rt.param_dtype)
    self.thinker_to_talker_proj = Linear(cfg.embedding_size, cfg.text.hidden_size, use_bias=True,
                                         names=("thinker_embed", "embed"), **kw)
    self.model = TextDecoder(cfg.text, rt, rngs=rngs, embed_dim=cfg.embedding_size)
    self.codec_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, use_bias=False, names=("embed", "vocab"),
                             **kw)

  def codec_embed(self, codes: jax.Array) -> jax.Array:
    """Codec-track vectors [..., embedding_size] (the Thinker's width) of codec ids."""
    return self.model.embed_tokens(codes)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    return self.model.init_cache(batch, max_len, dtype)

  def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: Optional[KVCache] = None):
    """inputs_embeds [B, L, embedding_size]: text track + codec track, summed; positions [3, B, L];
    segment_ids [B, L] (0 = padding). Returns float32 codec logits [B, L, vocab] (and the cache, if given)."""
    x = self.thinker_to_talker_proj(inputs_embeds)
    hidden, new_cache = self.model(x, positions, segment_ids, cache)
    logits = self.codec_head(hidden).astype(jnp.float32)
    return logits if cache is None else (logits, new_cache)

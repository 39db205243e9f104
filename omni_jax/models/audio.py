"""The Whisper-style audio encoder of the Thinker, with static shapes.

Input is a padded buffer [A, mels, T] of A audios (rows may be unused) plus their frame counts; output is
a padded [N, output_dim] buffer of encoder tokens, audio after audio in row order (the order of the AUDIO
placeholders), plus the number of real tokens. Every index below is derived from the lengths inside jit,
so one compiled program serves any mix of lengths that fits the static sizes:

* Chunking: each audio is cut into chunks of 2 * n_window frames; the chunks of all audios are compacted
  into R rows (R = max_chunks, default A * ceil(T / chunk)). Each row is an independent zero-padded
  sequence through conv1 + GELU (frames past the chunk's end zeroed), conv2 (stride 2) + GELU and the
  sinusoid positions, which restart per chunk.
* Attention is block-diagonal per chunk: the rows are the batch dimension, so a chunk attends to itself
  only, at O(R * chunk^2) cost instead of a packed sequence's O((R * chunk)^2).
* Output token i of audio a averages tokens 2i and 2i + 1 of the audio's concatenated valid frames (pairs
  may straddle chunks when n_window is odd, as in transformers), then ln_post and proj.

Sizing: the caller picks max_chunks >= omni_jax.input.media.audio.chunk_count(lengths) (e.g. per batch
bucket); chunks beyond it are dropped without an error (jit cannot raise), so check on the host.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from omni_jax import sharding, sizes
from omni_jax.config import Runtime, from_config_dict, require_positive_ints
from omni_jax.errors import ConfigError
from omni_jax.layers.attention import Attention, SegmentMask
from omni_jax.layers.conv import Conv1d
from omni_jax.layers.linear import Embed, Linear
from omni_jax.layers.mlp import MLP, activation
from omni_jax.layers.norms import LayerNorm
from omni_jax.models.scan import create_stacked, run_stacked

ACT = ("activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class AudioConfig:
  """Qwen2_5OmniAudioEncoderConfig fields (transformers' names) + `freeze` (stop gradients at the output)."""
  num_mel_bins: int = 128
  encoder_layers: int = 32
  encoder_attention_heads: int = 20
  encoder_ffn_dim: int = 5120
  d_model: int = 1280
  activation_function: str = "gelu"
  max_source_positions: int = 1500
  n_window: int = 100
  output_dim: int = 3584
  freeze: bool = False

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, key: str) -> "AudioConfig":
    return from_config_dict(cls, cfg, key)

  def validate(self, key: str):
    require_positive_ints(self, ("num_mel_bins", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                                 "d_model", "max_source_positions", "n_window", "output_dim"), key)
    if self.d_model % self.encoder_attention_heads:
      raise ConfigError(f"config.{key}.encoder_attention_heads: d_model={self.d_model} is not divisible by "
                        f"{self.encoder_attention_heads} heads")
    if self.d_model % 2:
      raise ConfigError(f"config.{key}.d_model: must be even for the sinusoid positions, got {self.d_model}")
    if self.n_window > self.max_source_positions:
      raise ConfigError(f"config.{key}.n_window: a chunk has n_window={self.n_window} positions after the "
                        f"stride-2 conv, more than max_source_positions={self.max_source_positions}")
    try:
      activation(self.activation_function)
    except ValueError as e:
      raise ConfigError(f"config.{key}.activation_function: {e}") from None
    if not isinstance(self.freeze, bool):
      raise ConfigError(f"config.{key}.freeze: must be a bool, got {self.freeze!r}")

  @property
  def chunk_frames(self) -> int:
    return 2 * self.n_window


def thinker_audio(config: ml_collections.ConfigDict) -> Optional[AudioConfig]:
  """The audio tower's config, or None when config.model.thinker has no `audio` section."""
  thinker = config.model.thinker
  if "audio" not in thinker or thinker.audio is None:
    return None
  return AudioConfig.from_config(thinker.audio, "model.thinker.audio")


def sinusoids(length: int, channels: int) -> np.ndarray:
  """[length, channels] float32: sin in the first half, cos in the second, timescales 1 .. 10000."""
  increment = np.log(10000.0) / (channels // 2 - 1)
  inv = np.exp(-increment * np.arange(channels // 2, dtype=np.float32)).astype(np.float32)
  angles = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


class AudioEncoderLayer(nnx.Module):
  """Pre-LN Whisper block. fc1/fc2 live in the shared MLP (`mlp.fc1`); the converter maps them to `fc1`."""

  def __init__(self, cfg: AudioConfig, rt: Runtime, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, param_dtype=rt.param_dtype)
    d = cfg.d_model
    heads = cfg.encoder_attention_heads
    self.self_attn_layer_norm = LayerNorm(d, eps=1e-5, **kw)
    self.self_attn = Attention(d, num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
                               bias=(True, False, True, True), dtype=rt.dtype, implementation=rt.attention_impl,
                               **kw)
    self.final_layer_norm = LayerNorm(d, eps=1e-5, **kw)
    self.mlp = MLP(d, cfg.encoder_ffn_dim, act=cfg.activation_function, use_bias=True, dtype=rt.dtype, **kw)

  def __call__(self, x, mask):
    x = sharding.constrain(x + self.self_attn(self.self_attn_layer_norm(x), mask), ACT)
    x = x + self.mlp(self.final_layer_norm(x))
    if x.dtype == jnp.float16:  # transformers clamps fp16 activations after every layer
      limit = float(jnp.finfo(jnp.float16).max) - 1000.0
      x = jnp.clip(x, -limit, limit)
    return sharding.constrain(x, ACT)


class AudioEncoder(nnx.Module):
  """conv1 -> conv2 -> positions -> layers (per-chunk attention) -> pair pooling -> ln_post -> proj."""

  def __init__(self, cfg: AudioConfig, rt: Runtime, *, rngs: nnx.Rngs):
    self.cfg, self.rt = cfg, rt
    kw = dict(rngs=rngs, dtype=rt.dtype, param_dtype=rt.param_dtype)
    d = cfg.d_model
    self.conv1 = Conv1d(cfg.num_mel_bins, d, 3, padding=1, names=("mel", "embed"), **kw)
    self.conv2 = Conv1d(d, d, 3, stride=2, padding=1, names=("embed", "conv_out"), **kw)
    # Stored in the checkpoint but unused by the forward pass; kept for round trips.
    self.audio_bos_eos_token = Embed(2, cfg.output_dim, names=(None, "embed"), **kw)
    self.layers = create_stacked(lambda r: AudioEncoderLayer(cfg, rt, rngs=r), cfg.encoder_layers, rngs)
    self.ln_post = LayerNorm(d, eps=1e-5, rngs=rngs, param_dtype=rt.param_dtype)
    self.proj = Linear(d, cfg.output_dim, use_bias=True, names=("embed", "mlp"), **kw)

  def frames(self, features: jax.Array, lengths: jax.Array, *,
             max_chunks: Optional[int] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The 50 Hz stream before pooling: (x [R, n_window, d] after conv2 and every layer, row_tokens [R]
    valid frames per row, chunk_start [A] first row of each audio). Row r holds one chunk; an audio's frames
    are the valid frames of its rows in order (speech units read them; an encoder built with fewer
    `encoder_layers` gives the activations after that many layers)."""
    cfg = self.cfg
    n_audio, mels, frames = features.shape
    if mels != cfg.num_mel_bins:
      raise ValueError(f"audio features have {mels} mel bins, the encoder expects {cfg.num_mel_bins}")
    chunk = cfg.chunk_frames
    per_row = chunk // 2  # tokens of a full chunk after the stride-2 conv
    k_max = -(-frames // chunk)
    rows = n_audio * k_max if max_chunks is None else max_chunks

    lengths = jnp.clip(lengths.astype(jnp.int32), 0, frames)
    chunks = (lengths + chunk - 1) // chunk
    chunk_end = jnp.cumsum(chunks)
    chunk_start = chunk_end - chunks

    # Row r holds chunk k of audio a (chunks compacted in audio order; rows past the last chunk are empty).
    r = jnp.arange(rows)
    a = jnp.clip(jnp.searchsorted(chunk_end, r, side="right"), 0, n_audio - 1)
    k = jnp.clip(r - chunk_start[a], 0, k_max - 1)
    row_len = jnp.where(r < chunk_end[-1], jnp.clip(lengths[a] - k * chunk, 0, chunk), 0)
    padded = jnp.pad(features, ((0, 0), (0, 0), (0, k_max * chunk - frames)))
    by_chunk = padded.reshape(n_audio, mels, k_max, chunk).transpose(0, 2, 3, 1).reshape(n_audio * k_max, chunk, mels)
    x = jnp.take(by_chunk, a * k_max + k, axis=0)  # [rows, chunk, mels]
    frame_ok = (jnp.arange(chunk)[None, :] < row_len[:, None])[..., None]
    x = jnp.where(frame_ok, x, 0).astype(self.rt.dtype)

    act = activation(cfg.activation_function)
    x = act(self.conv1(x)) * frame_ok.astype(self.rt.dtype)
    x = act(self.conv2(x))  # [rows, per_row, d]
    x = (x.astype(jnp.float32) + sinusoids(per_row, cfg.d_model)[None]).astype(self.rt.dtype)
    row_tokens = sizes.audio_conv_frames(row_len)  # 0 for an empty row
    segments = (jnp.arange(per_row)[None, :] < row_tokens[:, None]).astype(jnp.int32)
    x = sharding.constrain(x, ACT)
    x = run_stacked(self.layers, x, SegmentMask(segments, causal=False), scan=self.rt.scan_layers,
                    remat_policy=self.rt.remat_policy)
    return x, row_tokens, chunk_start

  def __call__(self, features: jax.Array, lengths: jax.Array, *, max_chunks: Optional[int] = None,
               max_tokens: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
    """features [A, mels, T] (frames past each length are ignored), lengths [A] -> ([N, output_dim], count).

    max_chunks / max_tokens are static sizes (defaults: every chunk the buffer can hold, and all the
    tokens they can produce). Rows of the output past `count` are zero.
    """
    n_audio, _, frames = features.shape
    x, _, chunk_start = self.frames(features, lengths, max_chunks=max_chunks)
    rows, per_row = x.shape[:2]
    n_out = rows * per_row // 2 if max_tokens is None else max_tokens
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, frames)

    # Output token i: audio b, local index j; it pools frames 2j, 2j + 1 of that audio's token sequence.
    tokens = sizes.audio_token_count(lengths)
    token_end = jnp.cumsum(tokens)
    i = jnp.arange(n_out)
    b = jnp.clip(jnp.searchsorted(token_end, i, side="right"), 0, n_audio - 1)
    j = i - (token_end - tokens)[b]
    flat = x.reshape(rows * per_row, -1)

    def frame(p):
      return jnp.take(flat, jnp.clip((chunk_start[b] + p // per_row) * per_row + p % per_row, 0, rows * per_row - 1),
                      axis=0)

    pooled = (frame(2 * j) + frame(2 * j + 1)) / 2
    out = self.proj(self.ln_post(pooled))
    count = token_end[-1]
    out = jnp.where((i < count)[:, None], out, 0)
    if self.cfg.freeze:
      out = jax.lax.stop_gradient(out)
    return out, count

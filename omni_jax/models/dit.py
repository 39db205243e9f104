"""The Token2Wav flow-matching DiT: the velocity of a noisy mel given speech codes and a speaker.

velocity = DiT(x [B, T, mel], reference_mel [B, T_ref, mel], speaker [B, enc_emb_dim], codes [B, T / repeats], t)

- time: sinusoidal features of 1000 t -> time_mlp -> c, which modulates every block (AdaLN-Zero);
- codes: embedded and repeated `repeats` times to the mel rate (ids outside the table read row 0, as Qwen's
  own code does; transformers would crash);
- input: proj(cat[x, ECAPA(reference_mel), code embedding, speaker]) in the reference's order;
- blocks: AdaLN -> attention (RoPE on head 0 only, interleaved pairs; a frame of block i = frame // block_size
  sees blocks i - back .. i + ahead, back / ahead = 1 on the look-back / look-ahead layers) -> gated residual,
  then the same with the feed-forward;
- final AdaLN (scale first) and proj_out.

Guidance doubles the batch as transformers does: the unconditional rows see code id 0, a zero speaker vector
and a zero reference mel run through ECAPA. Attribute names follow the checkpoint
(token2wav.code2wav_dit_model.*); the blocks are stacked along a leading `layers` axis (models.scan).
Float32 by default, as the reference always runs it. Dropout (config.dropout) is not applied yet (inference).
"""

import dataclasses
import math
from typing import Optional, Union

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from omni_jax import sharding
from omni_jax.config import Runtime, from_config_dict, require_positive_ints
from omni_jax.errors import ConfigError
from omni_jax.layers.attention import dot_product_attention
from omni_jax.layers.linear import Embed, Linear
from omni_jax.layers.norms import LayerNorm
from omni_jax.layers.rotary import apply_rotary, inv_frequencies, mrope_cos_sin
from omni_jax.models.ecapa import EcapaTimeDelayNet
from omni_jax.models.scan import create_stacked, run_stacked

FEATURES = "dit_features"  # logical name of the DiT's input-feature axes (timestep frequencies, the concat)
ACT = ("activation_batch", "activation_length", "activation_embed")
TIME_FEATURES = 256  # sinusoidal timestep features (transformers' DiTTimestepEmbedding freq_embed_dim)


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """config.model.token2wav.dit: transformers' Qwen2_5OmniDiTConfig field names; defaults = the released 7B.

  rope_theta is rope_parameters["rope_theta"] there (the only rope type is the default one).
  """
  hidden_size: int = 1024
  num_hidden_layers: int = 22
  num_attention_heads: int = 16
  head_dim: int = 64
  ff_mult: int = 2
  emb_dim: int = 512
  rope_theta: float = 10000.0
  max_position_embeddings: int = 32768
  block_size: int = 24
  look_ahead_layers: tuple = (10,)
  look_backward_layers: tuple = (0, 20)
  repeats: int = 2
  num_embeds: int = 8193  # the code table has num_embeds + 1 rows
  mel_dim: int = 80
  dropout: float = 0.1
  enc_emb_dim: int = 192
  enc_dim: int = 128
  enc_channels: tuple = (256, 256, 256, 256, 768)
  enc_kernel_sizes: tuple = (5, 3, 3, 3, 1)
  enc_dilations: tuple = (1, 2, 3, 4, 1)
  enc_attention_channels: int = 64
  enc_res2net_scale: int = 2
  enc_se_channels: int = 64

  @property
  def num_codes(self) -> int:
    """Rows of the code table (codes 0 .. num_embeds)."""
    return self.num_embeds + 1

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, key: str = "model.token2wav.dit") -> "DiTConfig":
    return from_config_dict(cls, cfg, key)

  @classmethod
  def from_hf(cls, hf: dict, key: str = "token2wav_config.dit_config") -> "DiTConfig":
    """From transformers' dit_config dict (config.json); its other keys (dim/depth/heads aliases, model_type,
    attention implementation, ...) are not ours."""
    names = {f.name for f in dataclasses.fields(cls)} - {"rope_theta"}
    values = {k: v for k, v in hf.items() if k in names}
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
      raise ConfigError(f"{key}.rope_parameters: rope_type {rope['rope_type']!r} is not supported (default only)")
    values["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", cls.rope_theta)))
    return from_config_dict(cls, ml_collections.ConfigDict(values), key)

  def validate(self, key: str):
    require_positive_ints(self, ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "ff_mult",
                                 "emb_dim", "max_position_embeddings", "block_size", "repeats", "num_embeds",
                                 "mel_dim", "enc_emb_dim", "enc_dim", "enc_attention_channels",
                                 "enc_res2net_scale", "enc_se_channels"), key)
    if self.head_dim % 2:
      raise ConfigError(f"config.{key}.head_dim: {self.head_dim} must be even (rotary pairs)")
    for name in ("look_ahead_layers", "look_backward_layers"):
      bad = [i for i in getattr(self, name) if not 0 <= i < self.num_hidden_layers]
      if bad:
        raise ConfigError(f"config.{key}.{name}: layers {bad} outside [0, num_hidden_layers={self.num_hidden_layers})")
    if not len(self.enc_channels) == len(self.enc_kernel_sizes) == len(self.enc_dilations) >= 3:
      raise ConfigError(f"config.{key}.enc_channels / enc_kernel_sizes / enc_dilations: need one entry per ECAPA "
                        f"block (>= 3, equal lengths), got {len(self.enc_channels)}, {len(self.enc_kernel_sizes)}, "
                        f"{len(self.enc_dilations)}")
    if sum(self.enc_channels[1:-1]) != self.enc_channels[-1]:
      raise ConfigError(f"config.{key}.enc_channels: the last entry ({self.enc_channels[-1]}) must be the sum of the "
                        f"SE-Res2Net widths {list(self.enc_channels[1:-1])} (multi-layer feature aggregation)")
    if any(c % self.enc_res2net_scale for c in self.enc_channels[1:-1]):
      raise ConfigError(f"config.{key}.enc_channels: SE-Res2Net widths {list(self.enc_channels[1:-1])} must be "
                        f"multiples of enc_res2net_scale={self.enc_res2net_scale}")


def config_dict(**overrides) -> ml_collections.ConfigDict:
  """A config.model.token2wav.dit section: the released sizes with `overrides` (DiTConfig field names)."""
  values = {f.name: f.default for f in dataclasses.fields(DiTConfig)}
  unknown = set(overrides) - set(values)
  if unknown:
    raise ConfigError(f"config.model.token2wav.dit: unknown keys {sorted(unknown)}; known: {sorted(values)}")
  values.update(overrides)
  return ml_collections.ConfigDict({k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})


def dit_config(config: ml_collections.ConfigDict) -> Optional[DiTConfig]:
  """The typed config.model.token2wav.dit (None when the config builds no Token2Wav)."""
  section = config.model.get("token2wav", None)
  return None if section is None or section.get("dit", None) is None else DiTConfig.from_config(section.dit)


def timestep_features(t: jax.Array, dim: int = TIME_FEATURES) -> jax.Array:
  """[sin(1000 t f_k), cos(1000 t f_k)], f_k = 10000^(-k / (dim/2 - 1)) (transformers' SinusPositionEmbedding)."""
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000) / (half - 1)))
  angles = (1000.0 * t.astype(jnp.float32))[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class TimestepEmbedding(nnx.Module):
  """time_mlp = [Linear, SiLU, Linear] (indices 0 and 2 in the checkpoint)."""

  def __init__(self, cfg: DiTConfig, rt: Runtime, *, rngs: nnx.Rngs):
    kw = dict(use_bias=True, rngs=rngs, dtype=rt.dtype, param_dtype=rt.param_dtype)
    self.time_mlp = nnx.List([Linear(TIME_FEATURES, cfg.hidden_size, names=(FEATURES, "embed"), **kw), None,
                              Linear(cfg.hidden_size, cfg.hidden_size, names=("embed", "mlp"), **kw)])

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.time_mlp[2](jax.nn.silu(self.time_mlp[0](timestep_features(t))))


class CodecEmbedding(nnx.Module):
  """codec_embed (num_embeds + 1 rows), repeated `repeats` times along time."""

  def __init__(self, cfg: DiTConfig, rt: Runtime, *, rngs: nnx.Rngs):
    self.codec_embed = Embed(cfg.num_codes, cfg.emb_dim, names=("vocab", "embed"), rngs=rngs, dtype=rt.dtype,
                             param_dtype=rt.param_dtype)
    self.repeats = cfg.repeats

  def __call__(self, codes: jax.Array) -> jax.Array:
    table = self.codec_embed.embedding.shape[0]
    codes = jnp.where((codes >= 0) & (codes < table), codes, 0)  # Qwen's code maps unknown ids to 0
    return jnp.repeat(self.codec_embed(codes), self.repeats, axis=1)


class InputEmbedding(nnx.Module):
  """proj(cat[x, ECAPA(reference mel) repeated over time, code embedding, speaker vector repeated])."""

  def __init__(self, cfg: DiTConfig, rt: Runtime, *, rngs: nnx.Rngs):
    width = cfg.mel_dim + cfg.enc_dim + cfg.emb_dim + cfg.enc_emb_dim
    self.proj = Linear(width, cfg.hidden_size, use_bias=True, names=(FEATURES, "embed"), rngs=rngs, dtype=rt.dtype,
                       param_dtype=rt.param_dtype)
    self.spk_encoder = EcapaTimeDelayNet(cfg, rt, rngs=rngs)

  def __call__(self, x, encoded_reference, code_embed, speaker):
    """encoded_reference: the reference mel through spk_encoder (ECAPA), [B, enc_dim]."""
    over_time = lambda v: jnp.broadcast_to(v[:, None].astype(x.dtype), x.shape[:2] + v.shape[-1:])
    voice = over_time(encoded_reference)
    return self.proj(jnp.concatenate([x, voice, code_embed.astype(x.dtype), over_time(speaker)], axis=-1))


class AdaLayerNormZero(nnx.Module):
  """linear(SiLU(c)) -> 6 modulations; returns (LN(x) (1 + scale_msa) + shift_msa, the other five)."""

  def __init__(self, cfg: DiTConfig, rt: Runtime, *, rngs: nnx.Rngs, chunks: int = 6):
    # The modulations are not split over `tensor`: XLA's partitioner mis-computed the 6-way split of a
    # tensor-sharded output with the batch over data x fsdp (observed on CPU, jax 0.10.2).
    self.linear = Linear(cfg.hidden_size, chunks * cfg.hidden_size, use_bias=True, names=("embed", None),
                         rngs=rngs, dtype=rt.dtype, param_dtype=rt.param_dtype)
    self.norm = LayerNorm(cfg.hidden_size, eps=1e-6, affine=False, rngs=rngs)
    self.chunks = chunks

  def modulations(self, c: jax.Array):
    return jnp.split(self.linear(jax.nn.silu(c)), self.chunks, axis=-1)

  def __call__(self, x: jax.Array, c: jax.Array):
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.modulations(c)
    return self.norm(x) * (1 + scale[:, None]) + shift[:, None], gate, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroFinal(AdaLayerNormZero):
  """linear(SiLU(c)) -> (scale, shift) in that order; LN(x) (1 + scale) + shift."""

  def __init__(self, cfg: DiTConfig, rt: Runtime, *, rngs: nnx.Rngs):
    super().__init__(cfg, rt, rngs=rngs, chunks=2)

  def __call__(self, x: jax.Array, c: jax.Array):
    scale, shift = self.modulations(c)
    return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class FeedForward(nnx.Module):
  """ff = [Linear, GELU(tanh), Dropout, Linear] (indices 0 and 3 in the checkpoint)."""

  def __init__(self, cfg: DiTConfig, rt: Runtime, *, rngs: nnx.Rngs):
    kw = dict(use_bias=True, rngs=rngs, dtype=rt.dtype, param_dtype=rt.param_dtype)
    inner = cfg.hidden_size * cfg.ff_mult
    self.ff = nnx.List([Linear(cfg.hidden_size, inner, names=("embed", "mlp"), **kw), None, None,
                        Linear(inner, cfg.hidden_size, names=("mlp", "embed"), **kw)])

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.ff[3](jax.nn.gelu(self.ff[0](x), approximate=True))


def deinterleave(x: jax.Array) -> jax.Array:
  """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): interleaved-pair RoPE through the half-split rotation."""
  return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def block_attention(q, k, v, block: int, back: jax.Array, ahead: jax.Array, implementation=None,
                    frames: Optional[jax.Array] = None) -> jax.Array:
  """Attention in which a frame of block i (= frame // block) sees the frames of blocks i - back .. i + ahead
  (back, ahead in {0, 1}; may be traced). [B, L, heads, head_dim] in and out. frames [B] (optional): each row's
  real frames; keys past them are masked (right padding that no real frame sees).

  The query blocks attend to their own and the two adjacent key blocks only: O(L * 3 * block) instead of the
  reference's dense [L, L] block mask, with the same result (the same keys enter each softmax).
  """
  b, length, heads, dim = q.shape
  pad = -length % block
  n = (length + pad) // block
  padded = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))

  def neighbours(a):  # [B, n * block, ...] -> [B * n, 3 * block, ...]: blocks i - 1, i, i + 1
    rows = a.shape[0]
    a = padded(a).reshape(rows, n, block, *a.shape[2:])
    a = jnp.pad(a, [(0, 0), (1, 1)] + [(0, 0)] * (a.ndim - 2))
    return jnp.concatenate([a[:, :-2], a[:, 1:-1], a[:, 2:]], axis=2).reshape(rows * n, 3 * block, *a.shape[3:])

  valid = jnp.ones((1, length), bool) if frames is None else jnp.arange(length)[None] < frames[:, None]
  real = neighbours(valid).reshape(valid.shape[0], n, 3 * block)  # keys that are frames, not padding
  offset = jnp.repeat(jnp.arange(-1, 2), block)  # key block - query block
  allowed = real & (offset >= -back) & (offset <= ahead)  # [1 or B, n, 3 * block]
  mask = jnp.broadcast_to(allowed[:, :, None, None], (b, n, 1, block, 3 * block)).reshape(b * n, 1, block,
                                                                                         3 * block)
  out = dot_product_attention(padded(q).reshape(b * n, block, heads, dim), neighbours(k), neighbours(v), mask,
                              implementation=implementation)
  return out.reshape(b, n * block, heads, dim)[:, :length]


class DiTAttention(nnx.Module):
  """to_q / to_k / to_v / to_out.0 with biases; RoPE on head 0 only (the released model was trained so)."""

  def __init__(self, cfg: DiTConfig, rt: Runtime, *, rngs: nnx.Rngs):
    kw = dict(use_bias=True, rngs=rngs, dtype=rt.dtype, param_dtype=rt.param_dtype)
    inner = cfg.num_attention_heads * cfg.head_dim
    heads_out = dict(kw, units=(1, cfg.head_dim))  # tensor parallelism splits whole heads (layers.Attention)
    self.to_q = Linear(cfg.hidden_size, inner, names=("embed", "heads"), **heads_out)
    self.to_k = Linear(cfg.hidden_size, inner, names=("embed", "heads"), **heads_out)
    self.to_v = Linear(cfg.hidden_size, inner, names=("embed", "heads"), **heads_out)
    self.to_out = nnx.List([Linear(inner, cfg.hidden_size, names=("heads", "embed"),
                                   **dict(kw, units=(cfg.head_dim, 1)))])
    self.heads, self.head_dim, self.block_size = cfg.num_attention_heads, cfg.head_dim, cfg.block_size
    self.implementation = rt.attention_impl if rt.attention_impl != "xla" else None

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, back: jax.Array, ahead: jax.Array,
               frames: Optional[jax.Array] = None) -> jax.Array:
    b, length, _ = x.shape
    shape = (b, length, self.heads, self.head_dim)
    q, k, v = self.to_q(x).reshape(shape), self.to_k(x).reshape(shape), self.to_v(x).reshape(shape)
    # Head 0 is stored de-interleaved after rotation, as transformers does; q and k alike, so scores are equal.
    q = jnp.concatenate([apply_rotary(deinterleave(q[:, :, :1]), cos, sin), q[:, :, 1:]], axis=2)
    k = jnp.concatenate([apply_rotary(deinterleave(k[:, :, :1]), cos, sin), k[:, :, 1:]], axis=2)
    q = sharding.constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
    k = sharding.constrain(k, ("activation_batch", "activation_length", "activation_heads", None))
    out = block_attention(q, k, v, self.block_size, back, ahead, self.implementation, frames)
    return self.to_out[0](out.reshape(b, length, self.heads * self.head_dim))


class DiTBlock(nnx.Module):
  """x += gate_msa * attn(AdaLN(x)); x += gate_mlp * ff(LN(x) (1 + scale_mlp) + shift_mlp)."""

  def __init__(self, cfg: DiTConfig, rt: Runtime, *, rngs: nnx.Rngs):
    self.attn_norm = AdaLayerNormZero(cfg, rt, rngs=rngs)
    self.attn = DiTAttention(cfg, rt, rngs=rngs)
    self.ff_norm = LayerNorm(cfg.hidden_size, eps=1e-6, affine=False, rngs=rngs)
    self.ff = FeedForward(cfg, rt, rngs=rngs)

  def __call__(self, x, c, cos, sin, frames, back, ahead):
    """frames: real frames per row (None: all); back / ahead: this layer's look-back / look-ahead blocks (0 or 1)."""
    h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.attn_norm(x, c)
    x = x + gate_msa[:, None] * self.attn(h, cos, sin, back, ahead, frames)
    h = self.ff_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return sharding.constrain(x + gate_mlp[:, None] * self.ff(h), ACT)


def _per_row(flag: Union[bool, jax.Array], batch: int) -> jax.Array:
  return jnp.broadcast_to(jnp.asarray(flag, bool), (batch,))


class DiT(nnx.Module):
  """transformers' Qwen2_5OmniToken2WavDiTModel (token2wav.code2wav_dit_model.*)."""

  def __init__(self, cfg: DiTConfig, rt: Runtime = Runtime(), *, rngs: nnx.Rngs):
    self.cfg, self.rt = cfg, rt
    self.time_embed = TimestepEmbedding(cfg, rt, rngs=rngs)
    self.text_embed = CodecEmbedding(cfg, rt, rngs=rngs)
    self.input_embed = InputEmbedding(cfg, rt, rngs=rngs)
    self.transformer_blocks = create_stacked(lambda r: DiTBlock(cfg, rt, rngs=r), cfg.num_hidden_layers, rngs)
    self.norm_out = AdaLayerNormZeroFinal(cfg, rt, rngs=rngs)
    self.proj_out = Linear(cfg.hidden_size, cfg.mel_dim, use_bias=True, names=("embed", "mel"), rngs=rngs,
                           dtype=rt.dtype, param_dtype=rt.param_dtype)

  def check_inputs(self, x, reference_mel, speaker, codes):
    cfg = self.cfg
    b, length, mel = x.shape
    if mel != cfg.mel_dim or reference_mel.shape[-1] != cfg.mel_dim:
      raise ValueError(f"DiT: x {x.shape} and reference_mel {reference_mel.shape} need mel_dim={cfg.mel_dim} bins")
    if codes.shape != (b, length // cfg.repeats) or length % cfg.repeats:
      raise ValueError(f"DiT: codes {codes.shape} must be [B, T / repeats] for x {x.shape} (repeats={cfg.repeats})")
    if speaker.shape != (b, cfg.enc_emb_dim):
      raise ValueError(f"DiT: speaker {speaker.shape} must be [B, enc_emb_dim={cfg.enc_emb_dim}]")
    if reference_mel.shape[0] != b:
      raise ValueError(f"DiT: reference_mel {reference_mel.shape} and x {x.shape} have different batch sizes")
    if length > cfg.max_position_embeddings:
      raise ValueError(f"DiT: mel length {length} exceeds max_position_embeddings={cfg.max_position_embeddings} "
                       f"(config.model.token2wav.dit); give fewer codes")

  def __call__(self, x: jax.Array, reference_mel: jax.Array, speaker: jax.Array, codes: jax.Array, t: jax.Array,
               *, guidance: bool = False, drop_audio: Union[bool, jax.Array] = False,
               drop_code: Union[bool, jax.Array] = False, frames: Optional[jax.Array] = None,
               encoded_reference: Optional[jax.Array] = None) -> jax.Array:
    """The velocity [B, T, mel] of x [B, T, mel] at time t (scalar or [B]).

    reference_mel [B, T_ref, mel] feeds ECAPA (transformers' `condition_vector`); speaker [B, enc_emb_dim] is
    the speaker's `cond` vector (transformers' `speaker_embedding`, there repeated over time); codes [B, T/repeats].
    guidance: rows [conditional; unconditional] -> [2B, T, mel] (transformers' apply_cfg=True).
    drop_audio / drop_code (per row or for all; without guidance): zero speaker vector and reference mel /
    code id 0 (condition dropout for training).
    frames (scalar or [B], may be traced): real frames per row; the frames after them are right padding that
    no real frame attends to, so a padded row equals the unpadded one (fixed shapes for streaming windows).
    encoded_reference: encode_reference(reference_mel, guidance=guidance), where the caller evaluates the
    velocity many times for one voice (a sampler): ECAPA then runs once, not at every evaluation (and
    drop_audio leaves it as given).
    """
    self.check_inputs(x, reference_mel, speaker, codes)
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    if frames is not None:
      frames = jnp.broadcast_to(jnp.asarray(frames, jnp.int32), (b,))
    if guidance:
      x, t = jnp.concatenate([x, x]), jnp.concatenate([t, t])
      frames = None if frames is None else jnp.concatenate([frames, frames])
      speaker = jnp.concatenate([speaker, jnp.zeros_like(speaker)])
      codes = jnp.concatenate([codes, jnp.zeros_like(codes)])
    else:
      drop_audio, drop_code = _per_row(drop_audio, b), _per_row(drop_code, b)
      reference_mel = jnp.where(drop_audio[:, None, None], 0, reference_mel)
      speaker = jnp.where(drop_audio[:, None], 0, speaker)
      codes = jnp.where(drop_code[:, None], 0, codes)
    if encoded_reference is None:
      encoded_reference = self.encode_reference(reference_mel, guidance=guidance)
    x = x.astype(self.rt.dtype)
    c = self.time_embed(t)
    h = sharding.constrain(self.input_embed(x, encoded_reference, self.text_embed(codes), speaker), ACT)
    length = x.shape[1]
    positions = jnp.arange(length, dtype=jnp.int32)[None, None]  # [1 row, 1, L]: broadcast over the batch
    cos, sin = mrope_cos_sin(positions, inv_frequencies(self.cfg.head_dim, self.cfg.rope_theta),
                             (self.cfg.head_dim // 2,))
    layers = range(self.cfg.num_hidden_layers)
    back = jnp.asarray([int(i in self.cfg.look_backward_layers) for i in layers], jnp.int32)
    ahead = jnp.asarray([int(i in self.cfg.look_ahead_layers) for i in layers], jnp.int32)
    h = run_stacked(self.transformer_blocks, h, c, cos, sin, frames, per_layer=(back, ahead),
                    scan=self.rt.scan_layers, remat_policy=self.rt.remat_policy)
    return self.proj_out(self.norm_out(h, c)).astype(jnp.float32)

  def speaker_embedding(self, reference_mel: jax.Array) -> jax.Array:
    """ECAPA-TDNN embedding [B, enc_dim] of a reference mel [B, T_ref, mel]."""
    return self.input_embed.spk_encoder(reference_mel.astype(self.rt.dtype))

  def encode_reference(self, reference_mel: jax.Array, *, guidance: bool = False) -> jax.Array:
    """What __call__ computes of reference_mel [B, T_ref, mel] whatever x and t are (its `encoded_reference`):
    the ECAPA embedding of each row, and with guidance of the unconditional rows' zero mel after them."""
    if guidance:
      reference_mel = jnp.concatenate([reference_mel, jnp.zeros_like(reference_mel)])
    return self.speaker_embedding(reference_mel)

"""The Token2Wav vocoder: BigVGAN from an 80-bin log-mel at 100 frames/s to a 24 kHz waveform.

transformers' Qwen2_5OmniToken2WavBigVGANModel, in [B, T, C] layout, with its on-disk attribute names (conversion
is a table: omni_jax/token2wav/bigvgan_weights.py):

  mel -> exp -> dB (floor -115, offset -20) -> [-1, 1] -> conv_pre -> 6 stages of (ups.i.0 transposed conv,
  the stage's AMP blocks averaged) -> activation_post -> conv_post -> clamp to [-1, 1].

Every activation is an anti-aliased SnakeBeta: x2 Kaiser-sinc upsampling, SnakeBeta with log-scale alpha/beta,
x2 Kaiser-sinc downsampling. The filters are not parameters: they are recomputed from (cutoff, half width,
taps) at trace time, as transformers recomputes its non-persistent buffers. Float32 by default (the reference
forces Token2Wav to float32); Runtime.dtype = bfloat16 computes the convolutions in bfloat16.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from omni_jax.config import Runtime, from_config_dict, require_positive_ints
from omni_jax.errors import ConfigError
from omni_jax.layers.conv import Conv1d, ConvTranspose1d
from omni_jax.layers.linear import param

SAMPLE_RATE = 24000  # not in transformers' config: the released examples write the waveform at 24 kHz
CHANNELS = "vocoder_channels"
# The anti-aliased activation's resampling (transformers' defaults, the only values the checkpoint uses).
RESAMPLE_RATIO, RESAMPLE_TAPS = 2, 12
# Mel pre-processing inside the vocoder (process_mel_spectrogram): the dB floor and offset of its training mels.
MIN_DB, DB_OFFSET = -115.0, -20.0


@dataclasses.dataclass(frozen=True)
class BigVGANConfig:
  """Qwen2_5OmniBigVGANConfig fields (transformers' names; defaults = the released 3B/7B vocoder)."""
  mel_dim: int = 80
  upsample_initial_channel: int = 1536
  resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
  resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
  upsample_rates: tuple[int, ...] = (5, 3, 2, 2, 2, 2)
  upsample_kernel_sizes: tuple[int, ...] = (11, 7, 4, 4, 4, 4)

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, key: str) -> "BigVGANConfig":
    out = from_config_dict(cls, cfg, key)
    return dataclasses.replace(out, resblock_dilation_sizes=tuple(tuple(d) for d in out.resblock_dilation_sizes))

  @classmethod
  def from_hf(cls, bigvgan_config: dict, key: str = "token2wav_config.bigvgan_config") -> "BigVGANConfig":
    """From transformers' bigvgan_config dict (keys it does not model, e.g. model_type, are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls.from_config(ml_collections.ConfigDict({k: v for k, v in bigvgan_config.items() if k in names}), key)

  def validate(self, key: str):
    require_positive_ints(self, ("mel_dim", "upsample_initial_channel"), key)
    if len(self.upsample_rates) != len(self.upsample_kernel_sizes) or not self.upsample_rates:
      raise ConfigError(f"config.{key}.upsample_kernel_sizes: {len(self.upsample_kernel_sizes)} kernels for "
                        f"{len(self.upsample_rates)} upsample_rates; one per stage, at least one stage")
    if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes) or not self.resblock_kernel_sizes:
      raise ConfigError(f"config.{key}.resblock_dilation_sizes: {len(self.resblock_dilation_sizes)} entries for "
                        f"{len(self.resblock_kernel_sizes)} resblock_kernel_sizes; one per AMP block")
    for rate, kernel in zip(self.upsample_rates, self.upsample_kernel_sizes):
      # (k - r) // 2 padding gives exactly r output samples per input sample only when k - r is even.
      if rate < 1 or kernel < rate or (kernel - rate) % 2:
        raise ConfigError(f"config.{key}.upsample_kernel_sizes: kernel {kernel} for rate {rate} must be >= the "
                          f"rate with an even difference (so each stage multiplies the length by its rate)")
    for kernel, dilations in zip(self.resblock_kernel_sizes, self.resblock_dilation_sizes):
      if kernel < 1 or kernel % 2 == 0 or not dilations or any(d < 1 for d in dilations):
        raise ConfigError(f"config.{key}.resblock_kernel_sizes: AMP kernel {kernel} must be odd and its dilations "
                          f"{list(dilations)} positive (length-preserving convolutions)")
    if self.upsample_initial_channel % (2 ** len(self.upsample_rates)):
      raise ConfigError(f"config.{key}.upsample_initial_channel: {self.upsample_initial_channel} must be divisible "
                        f"by 2**{len(self.upsample_rates)} (the channels halve at every stage)")

  @property
  def hop_length(self) -> int:
    """Waveform samples per mel frame (240 for the released vocoder: 24 kHz / 100 frames per second)."""
    return math.prod(self.upsample_rates)

  def channels(self, stage: int) -> int:
    """Channels after upsampling stage `stage` (stage -1: conv_pre's output)."""
    return self.upsample_initial_channel // (2 ** (stage + 1))


@functools.lru_cache(maxsize=None)
def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> np.ndarray:
  """transformers' kaiser_sinc_filter1d: a Kaiser-windowed sinc low-pass, [kernel_size] float32 summing to 1."""
  half = kernel_size // 2
  attenuation = 2.285 * (half - 1) * math.pi * (4 * half_width) + 7.95
  if attenuation > 50.0:
    beta = 0.1102 * (attenuation - 8.7)
  elif attenuation >= 21.0:
    beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
  else:
    beta = 0.0
  window = np.kaiser(kernel_size, beta)  # symmetric, as torch.kaiser_window(periodic=False)
  n = np.arange(-half, half) + 0.5 if kernel_size % 2 == 0 else np.arange(kernel_size) - half
  taps = 2 * cutoff * window * np.sinc(2 * cutoff * n)
  out = (taps / taps.sum()).astype(np.float32)
  out.flags.writeable = False  # cached: shared by every call
  return out


def _resampling_taps(ratio: int, kernel_size: int) -> np.ndarray:
  return kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, kernel_size)


def _fir_sum(windows, weights, dtype) -> jax.Array:
  """sum_i weights[i] * windows[i], accumulated in float32 and rounded to `dtype` once (as a conv kernel does)."""
  acc = None
  for window, w in zip(windows, weights):
    term = window.astype(jnp.float32) * np.float32(w)
    acc = term if acc is None else acc + term
  return acc.astype(dtype)


def _depthwise(x: jax.Array, taps: np.ndarray, *, stride: int = 1, lhs_dilation: int = 1,
               padding: tuple[int, int] = (0, 0)) -> jax.Array:
  """The same filter over every channel of x [B, T, C] (a grouped convolution with C groups)."""
  channels = x.shape[-1]
  kernel = jnp.broadcast_to(jnp.asarray(taps, x.dtype)[:, None, None], (taps.shape[0], 1, channels))
  return jax.lax.conv_general_dilated(x, kernel, window_strides=(stride,), padding=[padding],
                                      lhs_dilation=(lhs_dilation,), feature_group_count=channels,
                                      dimension_numbers=("NWC", "WIO", "NWC"))


def _upsample_geometry(ratio: int, kernel_size: int) -> tuple[int, int, int]:
  """(edge padding of the input, samples cropped left, right) of Qwen2_5OmniUpSample1d's transposed conv."""
  pad = kernel_size // ratio - 1
  return pad, pad * ratio + (kernel_size - ratio) // 2, pad * ratio + (kernel_size - ratio + 1) // 2


def _upsample_by_convolution(x: jax.Array, ratio: int, kernel_size: int) -> jax.Array:
  taps = _resampling_taps(ratio, kernel_size)
  pad, crop_left, crop_right = _upsample_geometry(ratio, kernel_size)
  x = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)), mode="edge")
  # A transposed conv = the input dilated by the stride, correlated with the reversed filter, padded k - 1.
  y = ratio * _depthwise(x, taps[::-1].copy(), lhs_dilation=ratio, padding=(kernel_size - 1, kernel_size - 1))
  return y[:, crop_left:y.shape[1] - crop_right]


def _upsample_by_slices(x: jax.Array, ratio: int, kernel_size: int) -> jax.Array:
  # By phases: output ratio * q + r of the cropped transposed conv is sum_j taps[ratio j + p] xp[q + base - j]
  # (xp: the padded input), with p and base fixed by r and the crop.
  taps = ratio * _resampling_taps(ratio, kernel_size)
  pad, crop_left, _ = _upsample_geometry(ratio, kernel_size)
  length = x.shape[1]
  xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)), mode="edge")
  phases = []
  for r in range(ratio):
    p, base = (r + crop_left) % ratio, (r + crop_left) // ratio
    js = range((kernel_size - p + ratio - 1) // ratio)
    phases.append(_fir_sum([jax.lax.slice_in_dim(xp, base - j, base - j + length, axis=1) for j in js],
                           [taps[ratio * j + p] for j in js], x.dtype))
  return jnp.stack(phases, axis=2).reshape(x.shape[0], ratio * length, x.shape[2])


def _downsample_padding(kernel_size: int) -> tuple[int, int]:
  return kernel_size // 2 - int(kernel_size % 2 == 0), kernel_size // 2


def _downsample_by_convolution(x: jax.Array, ratio: int, kernel_size: int) -> jax.Array:
  x = jnp.pad(x, ((0, 0), _downsample_padding(kernel_size), (0, 0)), mode="edge")
  return _depthwise(x, _resampling_taps(ratio, kernel_size), stride=ratio)


def _downsample_by_slices(x: jax.Array, ratio: int, kernel_size: int) -> jax.Array:
  xp = jnp.pad(x, ((0, 0), _downsample_padding(kernel_size), (0, 0)), mode="edge")
  n = (xp.shape[1] - kernel_size) // ratio + 1
  return _fir_sum([jax.lax.slice_in_dim(xp, i, i + ratio * (n - 1) + 1, stride=ratio, axis=1)
                   for i in range(kernel_size)], _resampling_taps(ratio, kernel_size), x.dtype)


# The resampling filter is fixed and the same for every channel. On CPUs and GPUs it runs as a sum of shifted
# slices that XLA fuses into elementwise loops: as a grouped convolution (one group per channel) it was ~8x
# slower on CPU, and on a GPU every one was a cuDNN call of its own for the compiler to autotune (two per
# activation, 218 in the released vocoder). The TPU compiler runs the grouped convolution well and compiles the
# slices twice as long, so TPUs keep it. Both are traced; lowering keeps the lowering platform's.
def _per_platform(by_slices, by_convolution, x, ratio, kernel_size):
  slices = lambda x: by_slices(x, ratio, kernel_size)  # noqa: E731
  return jax.lax.platform_dependent(x, cpu=slices, cuda=slices, rocm=slices,
                                    default=lambda x: by_convolution(x, ratio, kernel_size))


def upsample(x: jax.Array, ratio: int = RESAMPLE_RATIO, kernel_size: int = RESAMPLE_TAPS) -> jax.Array:
  """Qwen2_5OmniUpSample1d: replicate-pad, depthwise transposed conv (stride `ratio`), x ratio, crop; [B, T, C]
  -> [B, ratio * T, C]."""
  return _per_platform(_upsample_by_slices, _upsample_by_convolution, x, ratio, kernel_size)


def downsample(x: jax.Array, ratio: int = RESAMPLE_RATIO, kernel_size: int = RESAMPLE_TAPS) -> jax.Array:
  """Qwen2_5OmniDownSample1d: replicate-pad (k/2 - 1 left for even k, k/2 right), depthwise conv, stride `ratio`."""
  return _per_platform(_downsample_by_slices, _downsample_by_convolution, x, ratio, kernel_size)


class SnakeBeta(nnx.Module):
  """x + sin^2(x e^alpha) / (e^beta + 1e-9), per channel; alpha and beta are stored in log scale."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.alpha = param(rngs, jax.nn.initializers.zeros, (channels,), (CHANNELS,), param_dtype)
    self.beta = param(rngs, jax.nn.initializers.zeros, (channels,), (CHANNELS,), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    alpha = jnp.exp(self.alpha[...].astype(jnp.float32)).astype(x.dtype)
    inv_beta = (1.0 / (jnp.exp(self.beta[...].astype(jnp.float32)) + 1e-9)).astype(x.dtype)
    return x + inv_beta * jnp.square(jnp.sin(x * alpha))


class AntiAliasedActivation(nnx.Module):
  """Qwen2_5OmniAntiAliasedActivation1d: upsample x2 -> SnakeBeta (`act`) -> downsample x2."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.act = SnakeBeta(channels, rngs=rngs, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return downsample(self.act(upsample(x)))


class AMPBlock(nnx.Module):
  """Per dilation d: x += conv2(act(conv1_d(act(x)))); activations[2j] precede convs1[j], [2j + 1] convs2[j]."""

  def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...], *, rt: Runtime, rngs: nnx.Rngs):
    kw = dict(use_bias=True, names=(CHANNELS, CHANNELS), rngs=rngs, dtype=rt.dtype, param_dtype=rt.param_dtype)
    self.convs1 = nnx.List([Conv1d(channels, channels, kernel_size, dilation=d, padding=(kernel_size * d - d) // 2,
                                   **kw) for d in dilations])
    self.convs2 = nnx.List([Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2, **kw)
                            for _ in dilations])
    self.activations = nnx.List([AntiAliasedActivation(channels, rngs=rngs, param_dtype=rt.param_dtype)
                                 for _ in range(2 * len(dilations))])

  def __call__(self, x: jax.Array) -> jax.Array:
    for j, (conv1, conv2) in enumerate(zip(self.convs1, self.convs2)):
      x = x + conv2(self.activations[2 * j + 1](conv1(self.activations[2 * j](x))))
    return x


def normalize_mel(mel: jax.Array) -> jax.Array:
  """process_mel_spectrogram: natural-log mel -> amplitude -> dB (floor -115, offset -20) -> [-1, 1] (float32)."""
  amplitude = jnp.exp(mel.astype(jnp.float32))
  db = 20.0 * jnp.log10(jnp.maximum(amplitude, np.float32(10.0 ** (MIN_DB / 20.0)))) + DB_OFFSET
  return jnp.clip(2.0 * (db - MIN_DB) / (-MIN_DB) - 1.0, -1.0, 1.0)


class BigVGAN(nnx.Module):
  """mel [B, T, mel_dim] (natural-log mel, 100 frames/s) -> waveform [B, T * hop_length] in [-1, 1], float32.

  transformers' forward takes [B, mel_dim, T] and squeezes the batch away; ours keeps [B, T] layouts.
  """

  def __init__(self, cfg: BigVGANConfig, rt: Runtime = Runtime(), *, rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, rt.dtype
    kw = dict(rngs=rngs, dtype=rt.dtype, param_dtype=rt.param_dtype)
    self.conv_pre = Conv1d(cfg.mel_dim, cfg.upsample_initial_channel, 7, padding=3, names=("mel", CHANNELS), **kw)
    # The extra one-element level (`ups.i.0`) is the released state dict's layout.
    self.ups = nnx.List([
        nnx.List([ConvTranspose1d(cfg.channels(i - 1), cfg.channels(i), kernel, stride=rate,
                                  padding=(kernel - rate) // 2, names=(CHANNELS, CHANNELS), **kw)])
        for i, (rate, kernel) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))])
    self.resblocks = nnx.List([
        AMPBlock(cfg.channels(i), kernel, dilations, rt=rt, rngs=rngs)
        for i in range(len(cfg.upsample_rates))
        for kernel, dilations in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)])
    last = cfg.channels(len(cfg.upsample_rates) - 1)
    self.activation_post = AntiAliasedActivation(last, rngs=rngs, param_dtype=rt.param_dtype)
    self.conv_post = Conv1d(last, 1, 7, padding=3, use_bias=False, names=(CHANNELS, None), **kw)

  def __call__(self, mel: jax.Array) -> jax.Array:
    cfg = self.cfg
    if mel.ndim != 3 or mel.shape[-1] != cfg.mel_dim:
      raise ValueError(f"BigVGAN: mel must be [batch, frames, {cfg.mel_dim}], got shape {tuple(mel.shape)}")
    x = self.conv_pre(normalize_mel(mel).astype(self.dtype))
    per_stage = len(cfg.resblock_kernel_sizes)
    for i, up in enumerate(self.ups):
      x = up[0](x)  # no activation before the transposed conv, as in transformers
      x = sum(self.resblocks[i * per_stage + j](x) for j in range(per_stage)) / per_stage
    wave = self.conv_post(self.activation_post(x))
    return jnp.clip(wave[..., 0].astype(jnp.float32), -1.0, 1.0)

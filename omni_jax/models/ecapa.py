"""ECAPA-TDNN speaker encoder of the Token2Wav DiT: reference mel [B, T_ref, mel] -> [B, enc_dim].

TDNN blocks (reflect-padded "same" convolution + ReLU), three SE-Res2Net blocks, multi-layer feature
aggregation, attentive statistics pooling and a final 1x1 convolution. Attribute names follow the checkpoint
(token2wav.code2wav_dit_model.input_embed.spk_encoder.*); sequences are [B, T, C] (torch's are [B, C, T]).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from omni_jax.config import Runtime
from omni_jax.layers.conv import Conv1d

CHANNELS = "speaker_channels"  # logical name of every ECAPA channel axis (a small encoder: replicated)


def reflect_same(x: jax.Array, kernel_size: int, dilation: int) -> jax.Array:
  """The padding of torch Conv1d(padding="same", padding_mode="reflect"): dilation * (k - 1) frames mirrored,
  the extra one on the right when the total is odd."""
  total = dilation * (kernel_size - 1)
  if total == 0:
    return x
  left = total // 2
  if x.shape[1] <= total - left:
    raise ValueError(f"speaker encoder: the reference mel has {x.shape[1]} frames; reflect padding by "
                     f"{total - left} needs more (torch refuses it too)")
  return jnp.pad(x, ((0, 0), (left, total - left), (0, 0)), mode="reflect")


class TimeDelayNetBlock(nnx.Module):
  """ReLU(Conv1d(reflect_same(x))); the convolution is `conv` as in the checkpoint."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int, dilation: int, rt: Runtime, *,
               rngs: nnx.Rngs):
    self.conv = Conv1d(in_features, out_features, kernel_size, dilation=dilation, names=(CHANNELS, CHANNELS),
                       rngs=rngs, dtype=rt.dtype, param_dtype=rt.param_dtype)
    self.kernel_size, self.dilation = kernel_size, dilation

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.conv(reflect_same(x, self.kernel_size, self.dilation)))


class Res2NetBlock(nnx.Module):
  """Channels split into `scale` groups: y0 = x0, y1 = tdnn(x1), yi = tdnn(xi + y(i-1)); concatenated."""

  def __init__(self, channels: int, scale: int, kernel_size: int, dilation: int, rt: Runtime, *, rngs: nnx.Rngs):
    width = channels // scale
    self.blocks = nnx.List([TimeDelayNetBlock(width, width, kernel_size, dilation, rt, rngs=rngs)
                            for _ in range(scale - 1)])
    self.scale = scale

  def __call__(self, x: jax.Array) -> jax.Array:
    parts = jnp.split(x, self.scale, axis=-1)
    outputs = [parts[0]]
    for i, part in enumerate(parts[1:], start=1):
      outputs.append(self.blocks[i - 1](part if i == 1 else part + outputs[-1]))
    return jnp.concatenate(outputs, axis=-1)


class SqueezeExcitationBlock(nnx.Module):
  """x * sigmoid(conv2(relu(conv1(mean over time of x))))."""

  def __init__(self, channels: int, se_channels: int, rt: Runtime, *, rngs: nnx.Rngs):
    kw = dict(names=(CHANNELS, CHANNELS), rngs=rngs, dtype=rt.dtype, param_dtype=rt.param_dtype)
    self.conv1 = Conv1d(channels, se_channels, 1, **kw)
    self.conv2 = Conv1d(se_channels, channels, 1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = jax.nn.sigmoid(self.conv2(jax.nn.relu(self.conv1(jnp.mean(x, axis=1, keepdims=True)))))
    return x * gate


class SqueezeExcitationRes2NetBlock(nnx.Module):
  """x + se(tdnn2(res2net(tdnn1(x))))."""

  def __init__(self, in_features: int, out_features: int, *, res2net_scale: int, se_channels: int,
               kernel_size: int, dilation: int, rt: Runtime, rngs: nnx.Rngs):
    self.tdnn1 = TimeDelayNetBlock(in_features, out_features, 1, 1, rt, rngs=rngs)
    self.res2net_block = Res2NetBlock(out_features, res2net_scale, kernel_size, dilation, rt, rngs=rngs)
    self.tdnn2 = TimeDelayNetBlock(out_features, out_features, 1, 1, rt, rngs=rngs)
    self.se_block = SqueezeExcitationBlock(out_features, se_channels, rt, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x)))) + x


def _statistics(x: jax.Array, weights: jax.Array, eps: float = 1e-12):
  """Weighted mean and std over time ([B, T, C] -> [B, C] each); std = sqrt(max(var, eps)) as the reference."""
  mean = jnp.sum(weights * x, axis=1)
  std = jnp.sqrt(jnp.maximum(jnp.sum(weights * jnp.square(x - mean[:, None]), axis=1), eps))
  return mean, std


class AttentiveStatisticsPooling(nnx.Module):
  """Channel-wise attention over time from [x, global mean, global std]; returns [attentive mean, std]."""

  def __init__(self, channels: int, attention_channels: int, rt: Runtime, *, rngs: nnx.Rngs):
    self.tdnn = TimeDelayNetBlock(3 * channels, attention_channels, 1, 1, rt, rngs=rngs)
    self.conv = Conv1d(attention_channels, channels, 1, names=(CHANNELS, CHANNELS), rngs=rngs, dtype=rt.dtype,
                       param_dtype=rt.param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    length = x.shape[1]
    mean, std = _statistics(x, jnp.full((1, length, 1), 1.0 / length, x.dtype))  # no padding: uniform weights
    context = jnp.concatenate([x, jnp.broadcast_to(mean[:, None], x.shape), jnp.broadcast_to(std[:, None], x.shape)],
                              axis=-1)
    attention = jax.nn.softmax(self.conv(jnp.tanh(self.tdnn(context))), axis=1)
    mean, std = _statistics(x, attention)
    return jnp.concatenate([mean, std], axis=-1)  # [B, 2C]


class EcapaTimeDelayNet(nnx.Module):
  """transformers' ECAPA_TimeDelayNet: [B, T_ref, mel_dim] -> [B, enc_dim]."""

  def __init__(self, cfg, rt: Runtime, *, rngs: nnx.Rngs):
    ch, ks, dil = cfg.enc_channels, cfg.enc_kernel_sizes, cfg.enc_dilations
    blocks = [TimeDelayNetBlock(cfg.mel_dim, ch[0], ks[0], dil[0], rt, rngs=rngs)]
    for i in range(1, len(ch) - 1):
      blocks.append(SqueezeExcitationRes2NetBlock(
          ch[i - 1], ch[i], res2net_scale=cfg.enc_res2net_scale, se_channels=cfg.enc_se_channels,
          kernel_size=ks[i], dilation=dil[i], rt=rt, rngs=rngs))
    self.blocks = nnx.List(blocks)
    self.mfa = TimeDelayNetBlock(ch[-1], ch[-1], ks[-1], dil[-1], rt, rngs=rngs)
    self.asp = AttentiveStatisticsPooling(ch[-1], cfg.enc_attention_channels, rt, rngs=rngs)
    self.fc = Conv1d(2 * ch[-1], cfg.enc_dim, 1, names=(CHANNELS, CHANNELS), rngs=rngs, dtype=rt.dtype,
                     param_dtype=rt.param_dtype)

  def __call__(self, mel: jax.Array) -> jax.Array:
    outputs, x = [], mel
    for block in self.blocks:
      x = block(x)
      outputs.append(x)
    x = self.mfa(jnp.concatenate(outputs[1:], axis=-1))  # multi-layer feature aggregation
    return self.fc(self.asp(x)[:, None])[:, 0]

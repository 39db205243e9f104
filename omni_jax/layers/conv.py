"""1-D convolutions over [B, L, C] sequences (audio encoder stem, vocoder; later the speaker encoder)."""

import jax
import jax.numpy as jnp
from flax import nnx

from omni_jax.layers.linear import param


class Conv1d(nnx.Module):
  """y[b, t] = sum_k x[b, stride * t + dilation * k - padding] @ kernel[k] (+ bias), zero padding at both ends.

  kernel is [k, in, out] (torch Conv1d weights are [out, in, k]). names: logical names of (in, out).
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
               dilation: int = 1, use_bias: bool = True, names: tuple[str, str], rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, init_std: float = 0.02):
    self.kernel = param(rngs, jax.nn.initializers.normal(init_std), (kernel_size, in_features, out_features),
                        ("conv_width",) + tuple(names), param_dtype)
    self.bias = (param(rngs, jax.nn.initializers.zeros, (out_features,), names[1:], param_dtype)
                 if use_bias else None)
    self.stride, self.padding, self.dilation, self.dtype = stride, padding, dilation, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), window_strides=(self.stride,),
        padding=[(self.padding, self.padding)], rhs_dilation=(self.dilation,),
        dimension_numbers=("NWC", "WIO", "NWC"))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class ConvTranspose1d(nnx.Module):
  """torch's ConvTranspose1d: output length (L - 1) * stride - 2 * padding + kernel_size (the vocoder's upsampling).

  kernel is [k, in, out] (torch ConvTranspose1d weights are [in, out, k]). It is the gradient of a strided
  convolution: the input dilated by `stride`, convolved with the kernel reversed along k and padded by
  k - 1 - padding on both sides. names: logical names of (in, out).
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
               use_bias: bool = True, names: tuple[str, str], rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, init_std: float = 0.02):
    if not 0 <= padding <= kernel_size - 1:
      raise ValueError(f"ConvTranspose1d: padding={padding} must be in [0, kernel_size - 1 = {kernel_size - 1}]")
    self.kernel = param(rngs, jax.nn.initializers.normal(init_std), (kernel_size, in_features, out_features),
                        ("conv_width",) + tuple(names), param_dtype)
    self.bias = (param(rngs, jax.nn.initializers.zeros, (out_features,), names[1:], param_dtype)
                 if use_bias else None)
    self.stride, self.padding, self.dtype = stride, padding, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    edge = self.kernel.shape[0] - 1 - self.padding
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...][::-1].astype(self.dtype), window_strides=(1,),
        padding=[(edge, edge)], lhs_dilation=(self.stride,), dimension_numbers=("NWC", "WIO", "NWC"))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y

"""1-D convolution over [B, L, C] sequences (audio encoder stem; later the speaker encoder and vocoder)."""

import jax
import jax.numpy as jnp
from flax import nnx

from omni_jax.layers.linear import param


class Conv1d(nnx.Module):
  """y[b, t] = sum_k x[b, stride * t + k - padding] @ kernel[k] (+ bias), zero padding at both ends.

  kernel is [k, in, out] (torch Conv1d weights are [out, in, k]). names: logical names of (in, out).
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
               use_bias: bool = True, names: tuple[str, str], rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, init_std: float = 0.02):
    self.kernel = param(rngs, jax.nn.initializers.normal(init_std), (kernel_size, in_features, out_features),
                        ("conv_width",) + tuple(names), param_dtype)
    self.bias = (param(rngs, jax.nn.initializers.zeros, (out_features,), names[1:], param_dtype)
                 if use_bias else None)
    self.stride, self.padding, self.dtype = stride, padding, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), window_strides=(self.stride,),
        padding=[(self.padding, self.padding)], dimension_numbers=("NWC", "WIO", "NWC"))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y

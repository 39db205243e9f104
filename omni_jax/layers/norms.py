"""Normalisation layers."""

import jax
import jax.numpy as jnp
from flax import nnx

from omni_jax.layers.linear import param


class RMSNorm(nnx.Module):
  """Qwen RMSNorm: normalise in float32, cast back to the input dtype, then multiply by the weight.

  transformers does the same; multiplying by the weight before the cast can change bfloat16 results.
  """

  def __init__(self, features: int, *, eps: float, rngs: nnx.Rngs, name: str = "norm",
               param_dtype=jnp.float32):
    self.scale = param(rngs, jax.nn.initializers.ones, (features,), (name,), param_dtype)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with optional affine parameters, statistics in float32."""

  def __init__(self, features: int, *, eps: float, rngs: nnx.Rngs, affine: bool = True, name: str = "norm",
               param_dtype=jnp.float32):
    self.scale = param(rngs, jax.nn.initializers.ones, (features,), (name,), param_dtype) if affine else None
    self.bias = param(rngs, jax.nn.initializers.zeros, (features,), (name,), param_dtype) if affine else None
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    if self.scale is not None:
      y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)

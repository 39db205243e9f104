"""Normalisation layers."""

import functools

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
    return rms_norm(x, self.scale[...].astype(x.dtype), self.eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """scale * (x / rms(x)) with the statistics in float32 and the result in x's dtype (scale: x's dtype).

  Its gradient keeps only x and the [..., 1] inverse rms for the backward pass; differentiated as written it
  would keep the float32 copy of x and the normalised x as well (three times the bytes of x per norm, in
  every layer of a scanned stack whose residuals are saved).
  """
  return _rms_norm_forward(x, scale, eps)[0]


def _rms_norm_forward(x, scale, eps):
  x32 = x.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale * (x32 * inv).astype(x.dtype), (x, scale, inv)


def _rms_norm_backward(eps, residuals, dy):
  del eps
  x, scale, inv = residuals
  x_hat = x.astype(jnp.float32) * inv
  dscale = jnp.sum((dy * x_hat.astype(x.dtype)).astype(jnp.float32).reshape(-1, x.shape[-1]), axis=0)
  dn = (dy * scale).astype(jnp.float32)  # the gradient at the normalised x, rounded as the forward rounds
  dx = inv * (dn - x_hat * jnp.mean(dn * x_hat, axis=-1, keepdims=True))
  return dx.astype(x.dtype), dscale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_forward, _rms_norm_backward)


class LayerNorm(nnx.Module):
  """LayerNorm with optional affine parameters, statistics in float32."""

  def __init__(self, features: int, *, eps: float, rngs: nnx.Rngs, affine: bool = True, name: str = "norm",
               param_dtype=jnp.float32):
    self.scale = param(rngs, jax.nn.initializers.ones, (features,), (name,), param_dtype) if affine else None
    self.bias = param(rngs, jax.nn.initializers.zeros, (features,), (name,), param_dtype) if affine else None
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.scale is None:
      return layer_norm(x, None, None, self.eps)
    return layer_norm(x, self.scale[...], self.bias[...], self.eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale, bias, eps: float) -> jax.Array:
  """(x - mean) / std (* scale + bias), all in float32, the result in x's dtype; scale and bias may be None.

  Its gradient keeps x and the [..., 1] mean and inverse std for the backward pass (differentiated as written
  it would keep three float32 copies of x).
  """
  return _layer_norm_forward(x, scale, bias, eps)[0]


def _layer_norm_forward(x, scale, bias, eps):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True) + eps)
  y = (x32 - mean) * inv
  if scale is not None:
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(x.dtype), (x, scale, bias, mean, inv)


def _layer_norm_backward(eps, residuals, dy):
  del eps
  x, scale, bias, mean, inv = residuals
  x_hat = (x.astype(jnp.float32) - mean) * inv
  dy = dy.astype(jnp.float32)
  dscale = dbias = None
  if scale is not None:
    flat = lambda a: a.reshape(-1, x.shape[-1])  # noqa: E731
    dscale = jnp.sum(flat(dy * x_hat), axis=0).astype(scale.dtype)
    dbias = jnp.sum(flat(dy), axis=0).astype(bias.dtype)
    dy = dy * scale.astype(jnp.float32)
  dx = inv * (dy - jnp.mean(dy, axis=-1, keepdims=True) - x_hat * jnp.mean(dy * x_hat, axis=-1, keepdims=True))
  return dx.astype(x.dtype), dscale, dbias


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)

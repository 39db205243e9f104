"""Parameters with logical axis names, dense projections and embeddings."""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], names: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
  """A parameter tagged with one logical axis name per dimension (see omni_jax.sharding).

  Sharding is applied by the caller (a jit with out_shardings built from these names), never eagerly.
  """
  if len(names) != len(shape):
    raise ValueError(f"logical names {tuple(names)} do not match parameter shape {tuple(shape)}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), sharding_names=tuple(names), eager_sharding=False)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias). kernel is [in, out] (torch Linear weights are [out, in])."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool, names: tuple[str, str],
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, init_std: float = 0.02):
    self.kernel = param(rngs, jax.nn.initializers.normal(init_std), (in_features, out_features), names,
                        param_dtype)
    self.bias = (param(rngs, jax.nn.initializers.zeros, (out_features,), names[1:], param_dtype)
                 if use_bias else None)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding table [num_embeddings, features]."""

  def __init__(self, num_embeddings: int, features: int, *, names: tuple[str, str], rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, init_std: float = 0.02):
    self.embedding = param(rngs, jax.nn.initializers.normal(init_std), (num_embeddings, features), names,
                           param_dtype)
    self.dtype = dtype

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

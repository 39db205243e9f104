"""Parameters with logical axis names, dense projections and embeddings."""

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from omni_jax.layers import grouped_init, kernels

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], names: Sequence[str | None],
          dtype=jnp.float32, units: Optional[Sequence[int]] = None) -> nnx.Param:
  """A parameter tagged with one logical axis name per dimension (see omni_jax.sharding).

  Sharding is applied by the caller (a jit with out_shardings built from these names), never eagerly.
  units: per dimension, the size of the smallest piece a shard may hold (head_dim for a flattened
  heads x head_dim axis), so that a mesh axis splits whole heads or leaves the dimension replicated.
  """
  if len(names) != len(shape):
    raise ValueError(f"logical names {tuple(names)} do not match parameter shape {tuple(shape)}")
  extra = {}
  if units is not None and any(u != 1 for u in units):
    if len(units) != len(shape) or any(d % u for d, u in zip(shape, units)):
      raise ValueError(f"shard units {tuple(units)} do not divide parameter shape {tuple(shape)}")
    extra["shard_units"] = tuple(int(u) for u in units)
  return grouped_init.create(init, rngs, shape, dtype, lambda value: nnx.Param(
      value, sharding_names=tuple(names), eager_sharding=False, **extra))


def _dot(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x @ kernel. One row on a GPU (a batch-1 decode step) is computed as two equal rows: XLA:GPU runs a
  vector-matrix product with a narrow kernel (the 7B's 512-wide k / v projections) as a multiply over the whole
  kernel and a reduction, three kernels moving 3x its bytes, and two rows as one GEMM reading it once."""
  if x.size != x.shape[-1] or kernels.platform() != "gpu":
    return jnp.dot(x, kernel)
  rows = jnp.broadcast_to(x.reshape(1, -1), (2, x.shape[-1]))
  return jnp.dot(rows, kernel)[0].reshape(*x.shape[:-1], kernel.shape[-1])


class Linear(nnx.Module):
  """y = x @ kernel (+ bias). kernel is [in, out] (torch Linear weights are [out, in]).

  units: (in, out) shard units (see `param`): (1, head_dim) for a projection onto heads x head_dim.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool, names: tuple[str, str],
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, init_std: float = 0.02,
               units: tuple[int, int] = (1, 1)):
    self.kernel = param(rngs, jax.nn.initializers.normal(init_std), (in_features, out_features), names,
                        param_dtype, units)
    self.bias = (param(rngs, jax.nn.initializers.zeros, (out_features,), names[1:], param_dtype, units[1:])
                 if use_bias else None)
    self.dtype = dtype
    self.kernel_scale = nnx.data(None)  # per-output-channel scale of an int8 kernel (omni_jax.layers.lora)
    self.lora = nnx.data(None)  # a low-rank adapter (omni_jax.layers.lora.attach)

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...].astype(self.dtype)
    if self.kernel_scale is not None:
      kernel = kernel * self.kernel_scale[...].astype(self.dtype)[..., None, :]
    y = _dot(x.astype(self.dtype), kernel)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora is not None:
      delta = self.lora(x, self.dtype)
      if delta is not None:
        y = y + delta
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

"""Feed-forward blocks: the gated (SwiGLU) MLP of the Qwen towers and the plain MLP of Whisper/DiT."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from omni_jax.layers.linear import Linear

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # torch's exact erf GELU
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def activation(name: str):
  """The activation function called `name` in a transformers config."""
  if name not in _ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


class GatedMLP(nnx.Module):
  """down(act(gate(x)) * up(x)), as in Qwen2.5 text and vision blocks."""

  def __init__(self, features: int, hidden: int, *, act: str, use_bias: bool, rngs: nnx.Rngs,
               names: tuple[str, str] = ("embed", "mlp"), dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(use_bias=use_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate_proj = Linear(features, hidden, names=names, **kw)
    self.up_proj = Linear(features, hidden, names=names, **kw)
    self.down_proj = Linear(hidden, features, names=names[::-1], **kw)
    self.act = activation(act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MLP(nnx.Module):
  """fc2(act(fc1(x))), as in the Whisper-style audio encoder."""

  def __init__(self, features: int, hidden: int, *, act: str, use_bias: bool, rngs: nnx.Rngs,
               names: tuple[str, str] = ("embed", "mlp"), dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(use_bias=use_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = Linear(features, hidden, names=names, **kw)
    self.fc2 = Linear(hidden, features, names=names[::-1], **kw)
    self.act = activation(act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))

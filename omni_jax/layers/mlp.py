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
    return self.down_proj(gated(self.act, self.gate_proj(x), self.up_proj(x)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gated(act, gate: jax.Array, up: jax.Array) -> jax.Array:
  """act(gate) * up, the activation computed in float32 and rounded once to gate's dtype (as torch's
  activation kernels do for bfloat16).

  Its gradient keeps only gate and up and recomputes the activation in the backward pass; differentiated as
  written it would also keep the activation's intermediates ([tokens, intermediate] each, the largest
  residuals of a decoder layer).
  """
  return _gated_forward(act, gate, up)[0]


def _activated(act, gate):
  return act(gate.astype(jnp.float32)).astype(gate.dtype)


def _gated_forward(act, gate, up):
  return _activated(act, gate) * up, (gate, up)


def _activation_vjp(act, x, dy):
  """(act(x) rounded to x's dtype, the gradient at x of <dy, that>): the activation recomputed in float32."""
  a, pull = jax.vjp(lambda v: act(v).astype(x.dtype), x.astype(jnp.float32))
  return a, pull(dy)[0].astype(x.dtype)


def _gated_backward(act, residuals, dy):
  gate, up = residuals
  a, dgate = _activation_vjp(act, gate, dy * up)
  return dgate, dy * a


gated.defvjp(_gated_forward, _gated_backward)


class MLP(nnx.Module):
  """fc2(act(fc1(x))), as in the Whisper-style audio encoder."""

  def __init__(self, features: int, hidden: int, *, act: str, use_bias: bool, rngs: nnx.Rngs,
               names: tuple[str, str] = ("embed", "mlp"), dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(use_bias=use_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = Linear(features, hidden, names=names, **kw)
    self.fc2 = Linear(hidden, features, names=names[::-1], **kw)
    self.act = activation(act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(activate(self.act, self.fc1(x)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def activate(act, x: jax.Array) -> jax.Array:
  """act(x) computed in float32 and rounded once to x's dtype. Its gradient keeps only x (differentiated as
  written, an erf GELU would keep four [tokens, hidden] intermediates)."""
  return _activated(act, x)


def _activate_forward(act, x):
  return _activated(act, x), x


def _activate_backward(act, x, dy):
  return (_activation_vjp(act, x, dy)[1],)


activate.defvjp(_activate_forward, _activate_backward)

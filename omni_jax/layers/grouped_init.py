"""Parameter initialisation that draws each group of like parameters in one call.

A tower built of many separate layers (BigVGAN's and the DiT's blocks) asks for hundreds of random
initialisers, and a jitted initialiser compiles a key derivation and a sampling loop of its own for each one:
hundreds of small kernels (grouped, a Token2Wav's init program compiles in 11.7 s instead of 17.7 s on a CPU at
XLA's level 1, omni_jax.xla_options). Inside `grouped()`, `create` takes each parameter's key from its
module's Rngs as always, but records the draw and leaves a shape-only placeholder; leaving the block derives
every key in one call and draws every group of the same initializer, shape and dtype in one call vmapped over
the group's keys. A random draw vmapped over keys gives the same bits as the draws one by one, so the values are
unchanged: only the program is smaller.

A parameter's value is not there to read until the block ends: code that builds a module from another's
initial values (a clone, a derived tensor) runs after it.
"""

import contextlib
import contextvars
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

_PENDING = contextvars.ContextVar("grouped_init_pending", default=None)  # the draws to make, inside grouped()
_SUSPENDED = contextvars.ContextVar("grouped_init_suspended", default=False)


def create(init: Callable, rngs: nnx.Rngs, shape: Sequence[int], dtype,
           variable: Callable[[object], nnx.Variable]) -> nnx.Variable:
  """variable(init(rngs.params(), shape, dtype)), or inside grouped() variable(a placeholder) whose value comes
  at the block's end."""
  pending = _PENDING.get()
  if pending is None:
    return variable(init(rngs.params(), tuple(shape), dtype))
  # The key is the stream's key folded with its count, as a draw makes it; made later, for all draws at once.
  stream = rngs.params
  base, count = stream.key.get_value(), stream.count.get_value()
  # Advances the stream as a draw does. Set whole: an indexed update (stream() does `count[...] += 1`) of a
  # traced count asks the tracer for its sharding, whose error message walks the whole program traced so far,
  # once per parameter (quadratic: seconds for a Token2Wav's 1,200 parameters).
  stream.count.set_value(count + 1)
  out = variable(jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype)))
  pending.append((out, init, (base, count), tuple(shape), jnp.dtype(dtype)))
  return out


@contextlib.contextmanager
def grouped() -> Iterator[None]:
  """Parameters created inside get their values when the block ends, drawn a group at a time (see above)."""
  if _SUSPENDED.get() or _PENDING.get() is not None:  # one by one here, or an outer block draws them
    yield
    return
  pending = []
  token = _PENDING.set(pending)
  try:
    yield
  finally:
    _PENDING.reset(token)
  _draw(pending)


@contextlib.contextmanager
def suspended() -> Iterator[None]:
  """Parameters created inside are drawn one by one, as created: for a transform (nnx.vmap over layers) whose
  variables inside are not the ones it returns."""
  pending, suspended_ = _PENDING.set(None), _SUSPENDED.set(True)
  try:
    yield
  finally:
    _SUSPENDED.reset(suspended_)
    _PENDING.reset(pending)


def _signature(init: Callable):
  """What makes two initializers compute the same function: their code and the values they close over (the
  closures that jax.nn.initializers.normal(0.02) returns twice are equal). Anything else groups by identity."""
  code = getattr(init, "__code__", None)
  if code is None:
    return ("identity", id(init))
  try:
    cells = tuple((type(c.cell_contents), c.cell_contents) for c in init.__closure__ or ())
    signature = (code, cells, init.__defaults__, tuple(sorted((init.__kwdefaults__ or {}).items())))
    hash(signature)
  except (TypeError, ValueError):  # an unhashable or empty cell
    return ("identity", id(init))
  return signature


def _draw(pending: list) -> None:
  if not pending:
    return
  # Every key in one call: a fold_in each would be a loop of its own too.
  bases, counts = zip(*(parts for _, _, parts, _, _ in pending))
  keys = jax.vmap(jax.random.fold_in)(jnp.stack(bases), jnp.stack(counts))
  groups = {}
  for i, (variable, init, _, shape, dtype) in enumerate(pending):  # the inits stay referenced: ids stay unique
    groups.setdefault((_signature(init), shape, dtype), []).append((variable, init, i))
  for (_, shape, dtype), members in groups.items():
    init = members[0][1]
    if len(members) == 1:
      values = [init(keys[members[0][2]], shape, dtype)]
    else:
      stacked = jax.vmap(lambda k, init=init, shape=shape, dtype=dtype: init(k, shape, dtype))(
          keys[jnp.asarray([i for _, _, i in members])])
      values = [stacked[i] for i in range(len(members))]
    for (variable, _, _), value in zip(members, values):
      variable.set_value(value)

"""Parameters drawn a group at a time (omni_jax.layers.grouped_init) are the same bits as drawn one by one; XLA:CPU's
level 1 compiles draws to the default level's bits; and the whole model's init program (create_sharded) gives
the values of every draw one by one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omni_jax import sharding, xla_options
from omni_jax.layers import grouped_init, linear
from omni_jax.models import omni
from omni_jax.models.omni import OmniModel

import serve_testlib


class Stack(nnx.Module):
  """Layers of two shapes, equal initializers from separate closures, an unequal one, a constant, a closure
  over an array (which groups with itself only), and draws from two Rngs."""

  def __init__(self, rngs: nnx.Rngs, other: nnx.Rngs):
    normal = jax.nn.initializers.normal
    scaled = np.arange(4, dtype=np.float32)
    self.layers = nnx.List([linear.Linear(4, 8 if i % 2 else 4, use_bias=True, names=("embed", "mlp"),
                                          rngs=rngs if i < 4 else other) for i in range(6)])
    self.wide = linear.param(rngs, normal(0.5), (4, 4), ("embed", "mlp"))
    self.odd = linear.param(rngs, lambda key, shape, dtype: jax.random.normal(key, shape, dtype) * scaled,
                            (4, 4), ("embed", "mlp"))
    self.last = linear.param(rngs, normal(0.02), (4, 4), ("embed", "mlp"))


def _values(grouped: bool):
  def build():
    with grouped_init.grouped() if grouped else grouped_init.suspended():
      return Stack(nnx.Rngs(0), nnx.Rngs(params=7))

  return [np.asarray(v) for v in jax.tree.leaves(nnx.state(build(), nnx.Param))]


def test_grouped_draws_are_the_draws_one_by_one(monkeypatch):
  calls = []
  vmap = jax.vmap
  monkeypatch.setattr(jax, "vmap", lambda f, *a, **k: calls.append(f) or vmap(f, *a, **k))
  grouped = _values(True)
  # One call for all the keys; groups: the 4x4 and 4x8 kernels at 0.02 (the closures' values are equal), the
  # two bias shapes; `wide` and `odd` alone; `last` joins the 4x4 kernels.
  assert len(calls) == 1 + 4
  calls.clear()
  one_by_one = _values(False)
  assert not calls
  assert len(grouped) == len(one_by_one) == 6 * 2 + 3
  for a, b in zip(grouped, one_by_one):
    np.testing.assert_array_equal(a, b)
  assert len({a.tobytes() for a in grouped if a.any()}) == 6 + 3  # and the draws differ from one another


def test_grouped_draws_under_a_trace_never_ask_a_tracer_for_its_sharding(monkeypatch):
  """A draw one by one advances its stream with an indexed update of the traced count (`count[...] += 1`), which
  asks the tracer for its sharding; the error message jax builds for that walks the whole program traced so
  far, once per parameter (quadratic in the model's size). Grouped draws advance the streams without asking,
  to the same counts."""
  from jax._src import core  # noqa: PLC0415

  asked = []
  sharding_of = core.Tracer.sharding
  monkeypatch.setattr(core.Tracer, "sharding", property(lambda t: asked.append(t) or sharding_of.fget(t)))

  def counts(grouped: bool):
    def build():
      rngs, other = nnx.Rngs(0), nnx.Rngs(params=7)
      with grouped_init.grouped() if grouped else grouped_init.suspended():
        Stack(rngs, other)
      return rngs.params.count.get_value(), other.params.count.get_value()

    return [int(c) for c in jax.jit(build)()]

  grouped = counts(True)
  assert not asked
  assert counts(False) == grouped == [4 * 2 + 3, 2 * 2] and asked  # the check sees the one-by-one path's asks


def test_a_value_is_not_there_to_read_until_the_block_ends():
  with grouped_init.grouped():
    layer = linear.Linear(4, 4, use_bias=False, names=("embed", "mlp"), rngs=nnx.Rngs(0))
    assert isinstance(layer.kernel.get_value(), jax.ShapeDtypeStruct)
    with pytest.raises(Exception):
      layer(jnp.ones((1, 4)))
  assert layer(jnp.ones((1, 4))).shape == (1, 4)


def test_level_1_compiles_the_draws_to_the_default_levels_bits():
  """create_sharded compiles the init program at XLA:CPU's level 1: the same sampling kernels, the same bits."""
  options = xla_options.OPTIONS["init"]["cpu"]

  def init():
    with grouped_init.grouped():
      model = Stack(nnx.Rngs(0), nnx.Rngs(params=7))
    return jax.tree.map(lambda v: v.astype(jnp.bfloat16).astype(jnp.float32) * 3 + 1, nnx.state(model, nnx.Param))

  default, level_1 = (jax.jit(init).lower().compile(compiler_options=o)() for o in ({}, options))
  for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(level_1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_models_init_program_gives_the_one_by_one_values():
  """create_sharded's program (grouped draws) against every draw one by one: stacked layers (the Thinker's,
  drawn inside nnx.vmap one by one either way), the Talker and a Token2Wav of many separate blocks."""
  config = serve_testlib.speech_config()
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  _, state, _ = omni.create_sharded(config, mesh, seed=3)

  @jax.jit
  def one_by_one():
    with grouped_init.suspended():
      return nnx.split(OmniModel(config, rngs=nnx.Rngs(3)))[1]

  with sharding.activate(mesh, config.sharding_rules):
    want = one_by_one.lower().compile(compiler_options=xla_options.OPTIONS["init"]["cpu"])()
  got, want = nnx.to_flat_state(state), nnx.to_flat_state(want)
  assert [p for p, _ in got] == [p for p, _ in want] and any(p[0] == "token2wav" for p, _ in got)
  for (path, a), (_, b) in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
  # One part alone (a tower added to a restored model): its values of the whole initialisation, nothing else.
  _, part, _ = omni.create_sharded(config, mesh, seed=3, only=["talker"])
  part = nnx.to_flat_state(part)
  assert part and [p for p, _ in part] == [p for p, _ in got if p[0] == "talker"]
  whole = dict(got)
  for path, a in part:
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(whole[path].get_value()), err_msg=str(path))
  with pytest.raises(ValueError, match="vocoder"):
    omni.create_sharded(config, mesh, only=["vocoder"])

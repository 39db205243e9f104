"""Sharded initialisation and forward pass on 8 fake CPU devices (conftest sets the device count)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import tiny
from omni_jax import sharding
from omni_jax.models import omni

MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=2, tensor=4)]


def _config():
  c = tiny.get_config()
  c.model.thinker.text.vocab_size = 256  # keep the embedding small; divisible by every mesh axis
  return c


def _forward(graphdef, state, shardings, mesh, rules, ids, pos, seg):
  batch = NamedSharding(mesh, P(("data", "fsdp")))

  @jax.jit
  def fwd(state, ids, pos, seg):
    with sharding.activate(mesh, rules):
      return nnx.merge(graphdef, state).thinker(ids, pos, seg)

  ids, seg = jax.device_put(ids, batch), jax.device_put(seg, batch)
  pos = jax.device_put(pos, NamedSharding(mesh, P(None, ("data", "fsdp"))))
  return np.asarray(fwd(state, ids, pos, seg))


@pytest.fixture(scope="module")
def reference():
  assert jax.device_count() == 8, "conftest.py must force 8 host devices"
  config = _config()
  mesh = sharding.make_mesh(dict(data=1), devices=jax.devices()[:1])
  graphdef, state, shardings = omni.create_sharded(config, mesh)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(10, 256, size=(8, 16)), jnp.int32)
  seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 4 + [0] * 2], 8, axis=0), jnp.int32)  # two packed samples + pad
  pos = jnp.broadcast_to(jnp.asarray(np.r_[np.arange(10), np.arange(4), [1, 1]]), (3, 8, 16)).astype(jnp.int32)
  logits = _forward(graphdef, state, shardings, mesh, config.sharding_rules, ids, pos, seg)
  return config, jax.device_get(state), (ids, pos, seg), logits


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(str(s[a]) for a in ("data", "fsdp", "tensor")))
def test_sharded_model_matches_one_device(shape, reference):
  config, ref_state, inputs, ref_logits = reference
  mesh = sharding.make_mesh(shape)
  graphdef, state, shardings = omni.create_sharded(config, mesh)
  # Same parameters whatever the layout (partitionable RNG), each stored as the rule table says.
  for (path, var), (_, ref_var), (_, sh) in zip(nnx.to_flat_state(state), nnx.to_flat_state(ref_state),
                                                nnx.to_flat_state(shardings)):
    value = var.get_value()
    np.testing.assert_array_equal(np.asarray(value), np.asarray(ref_var.get_value()), err_msg=str(path))
    names = var.get_metadata()["out_sharding"]
    expected = sharding.logical_to_spec(names, value.shape, mesh, config.sharding_rules)
    assert value.sharding.spec == expected == sh.get_value().spec, path
    # Each device really holds only its slice.
    shard_shape = value.addressable_shards[0].data.shape
    split = int(np.prod([mesh.shape[a] for a in jax.tree.leaves(tuple(expected))]))
    assert int(np.prod(shard_shape)) * split == value.size, path
  logits = _forward(graphdef, state, shardings, mesh, config.sharding_rules, *inputs)
  real = np.asarray(inputs[2]) > 0
  np.testing.assert_allclose(logits[real], ref_logits[real], atol=2e-5, rtol=1e-5)


def test_rule_table_really_shards_the_big_weights():
  config = _config()
  mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=4))
  _, abstract = omni.abstract_model(config)
  specs = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(
      sharding.state_specs(abstract, mesh, config.sharding_rules))}
  assert specs["thinker.model.layers.self_attn.q_proj.kernel"] == P(None, "fsdp", "tensor")
  assert specs["thinker.model.layers.self_attn.o_proj.kernel"] == P(None, "tensor", "fsdp")
  assert specs["thinker.model.layers.mlp.down_proj.kernel"] == P(None, "tensor", "fsdp")
  assert specs["thinker.model.embed_tokens.embedding"] == P("tensor", "fsdp")
  assert specs["thinker.lm_head.kernel"] == P("fsdp", "tensor")
  assert specs["thinker.model.norm.scale"] == P(None)


def test_indivisible_dimension_falls_back_to_replication():
  mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=4))
  rules = (("heads", ("tensor",)), ("embed", ("fsdp",)))
  assert sharding.logical_to_spec(("embed", "heads"), (6, 12), mesh, rules) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("embed", "heads"), (6, 10), mesh, rules) == P("fsdp", None)
  with pytest.raises(KeyError, match="'mystery' has no rule"):
    sharding.logical_to_spec(("mystery",), (8,), mesh, rules)


def test_bad_mesh_config_fails_clearly():
  with pytest.raises(ValueError, match="needs 16 devices, 8 are present"):
    sharding.make_mesh(dict(data=2, fsdp=2, tensor=4))
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.make_mesh(dict(data=8, pipeline=1))
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.make_mesh(dict(data=-1, fsdp=-1))

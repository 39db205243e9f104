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
    expected = sharding.variable_spec(var, mesh, config.sharding_rules)
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
  # 2 KV heads cannot be split 4 ways without cutting a head: k/v stay whole (replicated over tensor).
  assert config.model.thinker.text.num_key_value_heads == 2
  assert specs["thinker.model.layers.self_attn.k_proj.kernel"] == P(None, "fsdp", None)
  assert specs["thinker.model.layers.self_attn.v_proj.bias"] == P(None, None)


def test_shard_units_keep_heads_whole():
  mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=4))
  rules = (("kv_heads", ("tensor",)), ("embed", ("fsdp",)))
  # 2 heads of 128: a 4-way split would cut each head in two; 8 heads of 16 split into 2 heads per device.
  assert sharding.logical_to_spec(("embed", "kv_heads"), (64, 256), mesh, rules) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("embed", "kv_heads"), (64, 256), mesh, rules, units=(1, 128)) == P("fsdp", None)
  assert sharding.logical_to_spec(("embed", "kv_heads"), (64, 128), mesh, rules, units=(1, 16)) == P("fsdp", "tensor")


def _collectives_3b_attention(tensor: int) -> list:
  """The collectives of the compiled train step of a 1-layer text model with the 3B's attention shapes
  (hidden 2048, 16 heads, 2 KV heads of 128) on data x tensor = 8 devices."""
  from configs import qwen2_5_omni_3b
  from omni_jax import aot
  from omni_jax.aot import compile as aot_compile, hlo

  c = aot.without_towers(qwen2_5_omni_3b.get_config(), ("talker",))
  c.model.thinker.vision = c.model.thinker.audio = None
  c.model.thinker.text.num_hidden_layers = 1
  c.model.dtype, c.model.remat_policy = "float32", "none"
  c.train.batch_size, c.train.seq_len, c.train.loss_chunk_size = 8, 256, 0
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 8 // tensor, 1, tensor
  compiled = aot_compile.compile_train_step(c, jax.devices())
  return hlo.parse(compiled.compiled.as_text(), 8).collectives


@pytest.mark.parametrize("tensor", [2, 4, 8])
def test_tensor_parallel_attention_moves_no_qkv_activations(tensor):
  """Whole heads per device: the forward pass gathers no q/k/v activation between the projections and
  attention. With fewer KV heads than devices (2 vs 4 or 8) k/v are replicated, and the backward pass
  gathers exactly their two gradients dK, dV ([B_local, L, 2, 128] each: the reduction that replicated KV
  heads need, Megatron's all-reduce of the same bytes); with 2 devices it moves none."""
  moved = [c for c in _collectives_3b_attention(tensor) if c.kind in ("all-gather", "all-to-all",
                                                                       "collective-permute")]
  forward = [c for c in moved if "transpose(" not in c.op_name]
  assert not forward, [(c.kind, c.bytes, c.op_name) for c in forward]
  backward = [c for c in moved if "transpose(" in c.op_name]
  if tensor == 2:
    assert not backward, [(c.kind, c.bytes, c.op_name) for c in backward]
  else:
    rows = 8 // (8 // tensor)  # the 8 rows are split over data = 8 / tensor devices
    grad = rows * 256 * 2 * 128 * 4  # dK or dV of those rows, float32
    assert [(c.kind, c.bytes) for c in backward] == [("all-gather", grad)] * 2, [(c.kind, c.bytes) for c in backward]


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

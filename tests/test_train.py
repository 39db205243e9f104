"""The train step: the same losses on every mesh, frozen groups, weight decay groups, config errors."""

import jax
import numpy as np
import pytest
from flax import traverse_util

import train_testlib as lib
from omni_jax import batch as batch_lib
from omni_jax.errors import ConfigError
from omni_jax.thinker import inputs as thinker_inputs
from omni_jax.towers import validate
from omni_jax.train import state as state_lib

MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=4, tensor=2)]


@pytest.fixture(scope="module")
def one_device():
  c = lib.config()
  losses, _, state, _ = lib.train_steps(c, lib.mesh_of(dict(data=1)), 3)
  return c, losses, jax.device_get(state.params)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(str(s[a]) for a in ("data", "fsdp", "tensor")))
def test_meshes_give_one_device_losses(shape, one_device):
  c, ref_losses, ref_params = one_device
  losses, _, state, setup = lib.train_steps(c, lib.mesh_of(shape), 3)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  # The parameters after 3 AdamW steps agree too, and stay in the rule table's layout.
  flat, ref = traverse_util.flatten_dict(state.params), traverse_util.flatten_dict(ref_params)
  shardings = traverse_util.flatten_dict(setup.param_shardings)
  for k, v in flat.items():
    np.testing.assert_allclose(np.asarray(v), ref[k], atol=2e-5, rtol=1e-4, err_msg=str(k))
    assert v.sharding == shardings[k], k


def test_bfloat16_compute_with_remat_tracks_float32(one_device):
  c, ref_losses, _ = one_device
  bf16 = lib.config()
  bf16.model.dtype, bf16.model.remat_policy = "bfloat16", "full"
  losses, _, state, _ = lib.train_steps(bf16, lib.mesh_of(dict(data=1)), 3)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-2)  # bfloat16 matmuls, float32 loss
  for v in jax.tree.leaves(state.params):
    assert v.dtype == np.float32  # master weights stay float32
  for v in jax.tree.leaves(state.opt_state):
    assert v.dtype in (np.float32, np.int32)


def test_label_mask_never_crosses_segments():
  seg = np.array([[1, 1, 1, 2, 2, 0, 0]])
  labels = np.array([[5, 6, 7, 8, batch_lib.IGNORE, 0, 0]])
  mask = np.asarray(thinker_inputs.label_mask({"segment_ids": seg, "labels": labels}))
  # position i predicts labels[i+1]: 0->6, 1->7 ok; 2->8 crosses into segment 2; 3->IGNORE; padding never.
  np.testing.assert_array_equal(mask, [[True, True, False, False, False, False]])


def test_frozen_group_is_bit_identical_and_has_no_optimizer_state():
  c = lib.config(freeze=("thinker.model.layers", "thinker.visual", "thinker.audio_tower"))
  mesh = lib.mesh_of(dict(data=1))
  setup = state_lib.Setup(c, mesh)
  before = jax.device_get(setup.init().params)
  _, _, state, _ = lib.train_steps(c, mesh, 2)
  after = traverse_util.flatten_dict(jax.device_get(state.params))
  for k, v in traverse_util.flatten_dict(before).items():
    frozen = k in setup.frozen
    assert frozen == (".".join(k).startswith(("thinker.model.layers", "thinker.visual", "thinker.audio_tower")))
    if frozen:
      assert np.array_equal(after[k], v), k  # bit-identical
    elif k[-2:] in (("lm_head", "kernel"), ("embed_tokens", "embedding")):
      assert not np.array_equal(after[k], v), k  # the trainable LM head did train
  opt_paths = {tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))
               for path, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)}
  assert not any(p in setup.frozen for p in opt_paths)
  assert not any(p[:2] == ("thinker", "visual") or p[:3] == ("thinker", "model", "layers") for p in opt_paths)
  assert any(p[:2] == ("thinker", "lm_head") for p in opt_paths)


def test_weight_decay_skips_biases_and_norms():
  setup = state_lib.Setup(lib.config(), lib.mesh_of(dict(data=1)))
  from omni_jax.models import omni
  mask = traverse_util.flatten_dict(state_lib.decay_mask(omni.abstract_model(setup.config)[1]))
  assert mask[("thinker", "model", "layers", "self_attn", "q_proj", "kernel")]
  assert not mask[("thinker", "model", "layers", "self_attn", "q_proj", "bias")]
  assert not mask[("thinker", "model", "layers", "input_layernorm", "scale")]
  assert not mask[("thinker", "model", "norm", "scale")]
  assert not mask[("thinker", "visual", "merger", "ln_q", "scale")]


@pytest.mark.parametrize("key,value,match", [
    ("grad_accum_steps", 3, r"config.train.grad_accum_steps: train.batch_size=8 is not divisible"),
    ("lr", -1.0, r"config.train.lr: must be >= 0"),
    ("steps", 0, r"config.train.steps: must be a positive integer"),
    ("freeze", ("thinker.[",), r"config.train.freeze: 'thinker.\[' is not a valid regex"),
    ("b2", 1.5, r"config.train.b2: must be in \[0, 1\]"),
])
def test_config_errors_name_the_key(key, value, match):
  c = lib.config()
  c.train[key] = value
  with pytest.raises(ConfigError, match=match):
    validate(c)


def test_freeze_pattern_that_matches_nothing_is_an_error():
  with pytest.raises(ConfigError, match=r"config.train.freeze: \['thinker.vision'\] match no parameter"):
    state_lib.Setup(lib.config(freeze=("thinker.vision",)), lib.mesh_of(dict(data=1)))

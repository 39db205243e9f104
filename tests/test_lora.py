"""LoRA: a fresh adapter changes nothing, merged = unmerged, the base stays bit-identical while adapters train,
the optimizer holds adapter state only, checkpoints hold adapters + a checked pointer to the base, meshes agree."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx, traverse_util

import train_testlib as tl
from omni_jax import adapters, checkpoint, loader, towers
from omni_jax.errors import ConfigError
from omni_jax.layers import lora
from omni_jax.models import omni
from omni_jax.train import loop
from omni_jax.train import state as state_lib
from omni_jax.train import step as step_lib
from test_talker_training import _batch as talker_batch  # rows with spoken replies and their Talker rows

LM = r"model\.layers\..*_proj"


def _config(base_dtype="float32", **lora_kw):
  c = towers.without(tl.config(), "talker")
  c.lora = ml_collections.ConfigDict(dict(targets={"thinker": [LM]}, rank=4, alpha=8.0, base_dtype=base_dtype,
                                          **lora_kw))
  return c


def _perturbed(params: dict, seed: int, scale: float = 0.05) -> dict:
  """Noise on every leaf (biases and norm scales too: zeros and ones hide mapping errors)."""
  flat = traverse_util.flatten_dict(params)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  out = {k: (v + scale * jax.random.normal(kk, v.shape, v.dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v)
         for (k, v), kk in zip(flat.items(), keys)}
  return traverse_util.unflatten_dict(out)


def _batch(seed=0, rows=2, length=16):
  ids = np.random.default_rng(seed).integers(10, 250, (rows, length)).astype(np.int32)
  seg = np.ones_like(ids)
  seg[1, 11:] = 2  # two packed samples in the second row
  return dict(input_ids=ids, labels=ids, segment_ids=seg, kind=np.zeros_like(ids))


@pytest.fixture(scope="module")
def models():
  """(plain graphdef, perturbed base params, adapted graphdef, adapted params with random b) in float32."""
  c = _config()
  plain = towers.without(c, "talker")
  del plain["lora"]
  g, state = nnx.split(omni.OmniModel(plain, rngs=nnx.Rngs(0)))
  base = _perturbed(nnx.to_pure_dict(state), 1)
  g_lora, state_lora = nnx.split(omni.OmniModel(c, rngs=nnx.Rngs(0)))
  fresh = adapters_of(nnx.to_pure_dict(state_lora))
  return c, g, base, g_lora, fresh


def adapters_of(params):
  return lora.adapters(params)


def _with(base, adapter_params):
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(base), **traverse_util.flatten_dict(adapter_params)})


def test_fresh_adapters_give_the_base_logits_exactly(models):
  c, g, base, g_lora, fresh = models
  flat = traverse_util.flatten_dict(fresh)
  assert flat and all(k[0] == "thinker" and k[1] == "model" for k in flat)  # only the LM's projections
  assert all(not np.any(np.asarray(v)) for k, v in flat.items() if k[-1] == "b")
  batch = _batch()
  want = tl.thinker_logits(nnx.merge(g, base).thinker, batch)
  got = tl.thinker_logits(nnx.merge(g_lora, _with(base, fresh)).thinker, batch)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_merged_equals_unmerged_and_disabled_is_the_base(models):
  c, g, base, g_lora, fresh = models
  trained = _perturbed(fresh, 2, scale=0.2)  # b != 0
  params = _with(base, trained)
  batch = _batch(1)
  unmerged = np.asarray(tl.thinker_logits(nnx.merge(g_lora, params).thinker, batch))
  merged_params = lora.merge(params, lora.LoraConfig.from_config(c))
  merged = np.asarray(tl.thinker_logits(nnx.merge(g, merged_params).thinker, batch))
  base_logits = np.asarray(tl.thinker_logits(nnx.merge(g, base).thinker, batch))
  assert np.max(np.abs(unmerged - base_logits)) > 1e-2  # the adapters do something
  np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=0)
  with lora.disabled():
    np.testing.assert_array_equal(np.asarray(tl.thinker_logits(nnx.merge(g_lora, params).thinker, batch)), base_logits)


def test_rslora_scale_and_int8_base_dequantises_per_matmul(models):
  _, g, base, _, fresh = models
  assert lora.LoraConfig.from_config(_config(rslora=True)).scale == pytest.approx(8.0 / 2.0)
  c8 = _config("int8")
  g8, abstract = nnx.split(nnx.eval_shape(lambda: omni.OmniModel(c8, rngs=nnx.Rngs(0))))
  abstract = nnx.to_pure_dict(abstract)
  flat = traverse_util.flatten_dict(abstract)
  linear = {k: v.dtype for k, v in flat.items() if k[-1] == "kernel" and k[:-1] + ("kernel_scale",) in flat}
  assert ("thinker", "model", "layers", "self_attn", "q_proj", "kernel") in linear
  assert ("thinker", "lm_head", "kernel") in linear and all(d == jnp.int8 for d in linear.values())
  params = _with(lora.base_layout(base, lora.without_adapters(abstract)), _perturbed(fresh, 3, 0.2))
  batch = _batch(2)
  got = np.asarray(tl.thinker_logits(nnx.merge(g8, params).thinker, batch))
  # The same model with every int8 kernel dequantised once: what each matmul computes.
  want = np.asarray(tl.thinker_logits(nnx.merge(g, lora.merge(params, lora.LoraConfig.from_config(c8))).thinker, batch))
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)  # int8 * scale in float32, then the same dots
  full = np.asarray(tl.thinker_logits(nnx.merge(g, base).thinker, batch))
  with lora.disabled():
    quantised = np.asarray(tl.thinker_logits(nnx.merge(g8, params).thinker, batch))
  assert np.max(np.abs(quantised - full)) < 0.05 * np.max(np.abs(full))  # int8 error stays small


def test_config_errors_name_the_key():
  c = _config()
  c.lora.targets = {"thinker": ["no_such_proj"]}
  with pytest.raises(ConfigError, match=r"config\.lora\.targets\.thinker: 'no_such_proj' selects no"):
    nnx.eval_shape(lambda: omni.OmniModel(c, rngs=nnx.Rngs(0)))
  for key, value, match in (("rank", 0, "config.lora.rank"), ("dropout", 1.0, "config.lora.dropout"),
                            ("base_dtype", "int4", "config.lora.base_dtype"), ("ranks", 4, "unknown keys")):
    c = _config()
    c.lora[key] = value
    with pytest.raises(ConfigError, match=match):
      lora.LoraConfig.from_config(c)


def test_step_trains_adapters_only_and_keeps_the_base_bit_identical():
  c = tl.config()  # Thinker + Talker: both objectives run through adapted projections
  c.lora = ml_collections.ConfigDict(dict(targets={"thinker": [LM], "talker": [LM]}, rank=4, alpha=8.0,
                                          dropout=0.1, base_dtype="bfloat16"))
  setup = state_lib.Setup(c, tl.mesh_of(dict(data=1)))
  state = setup.init()
  before = jax.device_get(state.params)
  step, batch, losses = step_lib.jit_train_step(setup), talker_batch(), []
  for _ in range(3):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
    assert float(np.sum(m["objectives"]["talker_codes"]["count"])) > 0
  after = jax.device_get(state.params)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  flat_b, flat_a = traverse_util.flatten_dict(before), traverse_util.flatten_dict(after)
  base_leaves = [k for k in flat_b if not lora.is_adapter(k)]
  assert all(flat_a[k].dtype == jnp.bfloat16 for k in base_leaves if jnp.issubdtype(flat_a[k].dtype, jnp.floating))
  for k in base_leaves:
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=".".join(k))
  moved = {k[0] for k in flat_b if k[-1] == "b" and np.any(flat_a[k] != flat_b[k])}
  assert moved == {"thinker", "talker"}
  # Adam's two moments per adapter leaf and nothing for the base (asserted in bytes).
  adapter_bytes = lora.nbytes(lora.adapters(after))
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(jax.device_get(state.opt_state)) if x.ndim > 0)
  assert opt_bytes == 2 * adapter_bytes
  assert setup.num_params(trainable_only=True) * 4 == adapter_bytes


def test_a_mesh_gives_the_one_device_losses_with_dropout():
  """(tests/test_dpo.py runs LoRA on both towers on the (8,1,1), (2,2,2) and (1,2,4) meshes; here the
  adapters' dropout and an encoder's projection, sharded over data, fsdp and tensor at once.)"""
  shape = dict(data=2, fsdp=2, tensor=2)
  c = _config(dropout=0.1)
  c.lora.targets = {"thinker": [LM, "proj"]}  # the audio projection too
  one, _, _, _ = tl.train_steps(c, tl.mesh_of(dict(data=1)), 2)
  got, _, _, _ = tl.train_steps(c, tl.mesh_of(shape), 2)
  np.testing.assert_allclose(got, one, rtol=2e-5)


def test_run_saves_adapters_with_a_checked_pointer_to_the_base(tmp_path):
  c = _config(base_dtype="bfloat16")
  c.train.steps = 3
  _, state, _ = omni.create_sharded(towers.without(tl.config(), "talker"), tl.mesh_of(dict(data=1)))
  base_dir = str(tmp_path / "base")
  checkpoint.save_params(base_dir, _perturbed(nnx.to_pure_dict(state), 4), towers.without(tl.config(), "talker"))
  c.init_from = base_dir
  workdir = str(tmp_path / "run")
  loop.run(c, workdir, devices=tl.one_device())
  step_dir = checkpoint.params_dir(workdir)
  stored = checkpoint.stored_tree(os.path.join(step_dir, "params"))
  assert stored and all(".lora." in k for k in stored)  # no base leaf written
  saved = checkpoint.load_config(checkpoint.find_config(step_dir))
  assert saved.lora.base_path == base_dir and len(saved.lora.base_fingerprint) == 32

  c.train.steps = 4  # resume over the same base
  loop.run(c, workdir, devices=tl.one_device())
  assert checkpoint.params_dir(workdir).endswith("/4")

  # Loading merges: the served model is the adapted one.
  config, graphdef, params, _, _, _ = loader.restore(workdir)
  assert config.get("lora") is None
  batch = _batch(3)
  served = np.asarray(tl.thinker_logits(nnx.merge(graphdef, params).thinker, batch))
  cfg = lora.LoraConfig.from_config(saved)
  g_lora, setup_abstract = nnx.split(nnx.eval_shape(lambda: omni.OmniModel(saved, rngs=nnx.Rngs(0))))
  setup_abstract = nnx.to_pure_dict(setup_abstract)
  base = adapters.load_base(base_dir, setup_abstract)
  trained = checkpoint.restore_pure(checkpoint.params_dir(workdir), lora.adapters(setup_abstract))
  adapted = np.asarray(tl.thinker_logits(nnx.merge(g_lora, jax.device_get(_with(base, trained))).thinker, batch))
  np.testing.assert_allclose(served, adapted, atol=2e-2 * np.max(np.abs(adapted)))  # bf16 base vs merged f32
  assert cfg.base_fingerprint == adapters.fingerprint(base)
  # --checkpoint BASE --adapter RUN: the same model.
  _, graphdef, again, _, _, _ = loader.restore(base_dir, adapter=workdir)
  np.testing.assert_array_equal(np.asarray(tl.thinker_logits(nnx.merge(graphdef, again).thinker, batch)), served)

  # Another base under the same adapters is refused, naming both fingerprints.
  checkpoint.save_params(base_dir, _perturbed(nnx.to_pure_dict(state), 5), towers.without(tl.config(), "talker"))
  c.train.steps = 5
  with pytest.raises(ConfigError, match="fingerprint"):
    loop.run(c, workdir, devices=tl.one_device())
  with pytest.raises(ConfigError, match="fingerprint"):
    loader.restore(workdir)


def test_a_runtime_config_still_loads_a_lora_run_merged(tmp_path):
  """generate.py --checkpoint RUN --config CONFIG: the run's own config says it holds adapters."""
  c = _config(base_dtype="float32")
  c.train.steps = 1
  plain = towers.without(tl.config(), "talker")
  _, state, _ = omni.create_sharded(plain, tl.mesh_of(dict(data=1)))
  checkpoint.save_params(str(tmp_path / "base"), _perturbed(nnx.to_pure_dict(state), 6), plain)
  c.init_from = str(tmp_path / "base")
  loop.run(c, str(tmp_path / "run"), devices=tl.one_device())
  config, graphdef, params, _, _, _ = loader.restore(str(tmp_path / "run"), config=plain)
  assert config.get("lora") is None and not any(lora.is_adapter(k) for k in traverse_util.flatten_dict(
      nnx.to_pure_dict(params)))
  checkpoint.save_params(str(tmp_path / "other"), state, plain)  # a whole model is no adapter
  with pytest.raises(ConfigError, match="neither a PEFT adapter directory"):
    loader.restore(str(tmp_path / "base"), adapter=str(tmp_path / "other"))


def test_model_flops_count_a_frozen_base_under_adapters_at_four_per_weight():
  """MFU of a LoRA run: the frozen base needs no weight gradients (4 FLOPs per weight and token, not 6: the
  adapters still need input gradients), on both towers; attention's FLOPs are the same."""
  from omni_jax.train import metrics as metrics_lib  # noqa: PLC0415

  c = tl.config()
  c.lora = ml_collections.ConfigDict(dict(targets={"thinker": [LM], "talker": [LM]}, rank=4, alpha=8.0))
  setup = state_lib.Setup(c, tl.mesh_of(dict(data=1)))
  paths = tuple(traverse_util.flatten_dict(setup.abstract_params))
  lora_run = metrics_lib.FlopCounter(c, setup.frozen, paths).towers
  full_run = metrics_lib.FlopCounter(c, frozenset(), paths).towers
  batch = talker_batch()
  for name in ("thinker", "talker"):
    attention = full_run[name].step_flops(batch) - 6 * _matmul_flops_per_factor(full_run[name], batch)
    assert lora_run[name].step_flops(batch) == pytest.approx(
        attention + 4 * _matmul_flops_per_factor(full_run[name], batch)), name


def _matmul_flops_per_factor(counter, batch) -> float:
  """The tower's weight FLOPs per unit of its per-weight factor (tokens x matmul weights)."""
  if hasattr(counter, "text_matmul_params"):
    rows, length = np.shape(batch["input_ids"])
    return rows * length * counter.text_matmul_params
  rows, length = np.shape(batch["talker_segment_ids"])
  return rows * length * counter.matmul_params

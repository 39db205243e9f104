"""Gradient accumulation and the loss normalisation by the global label count."""

import jax
import numpy as np
import pytest
from flax import traverse_util

import train_testlib as lib
from omni_jax import batch as batch_lib
from omni_jax.input.synthetic import SyntheticSource
from omni_jax.thinker import inputs as thinker_inputs
from omni_jax.train import data as data_lib


@pytest.fixture(scope="module")
def one_device():
  c = lib.config()
  losses, _, state, _ = lib.train_steps(c, lib.mesh_of(dict(data=1)), 3)
  return c, losses, jax.device_get(state.params)


def _uneven_batch():
  """Rows 0-3 (the first devices' rows, and every micro-batch's first row) keep only 3 label tokens each."""
  host = SyntheticSource(batch_size=8, seq_len=32, vocab_size=256).batch(0)
  host["labels"][:4, 4:] = batch_lib.IGNORE
  return host


def test_grad_accumulation_equals_one_big_batch(one_device):
  c, ref_losses, ref_params = one_device
  accum = lib.config(grad_accum_steps=4)  # 4 micro-batches of 2 rows = the reference's batches of 8
  mesh = lib.mesh_of(dict(data=2, fsdp=2, tensor=2))
  losses, _, state, _ = lib.train_steps(accum, mesh, 3)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  ref = traverse_util.flatten_dict(ref_params)
  for k, v in traverse_util.flatten_dict(jax.device_get(state.params)).items():
    np.testing.assert_allclose(v, ref[k], atol=2e-5, rtol=1e-4, err_msg=str(k))


def test_the_fused_head_loss_trains_like_the_plain_head(one_device):
  """train.fused_head_loss (the default: the head's gradient computed in its forward pass) against the plain
  head differentiated by JAX: the same losses and parameters after 3 steps."""
  c, ref_losses, ref_params = one_device
  assert c.train.fused_head_loss
  losses, _, state, _ = lib.train_steps(lib.config(fused_head_loss=False), lib.mesh_of(dict(data=1)), 3)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  ref = traverse_util.flatten_dict(ref_params)
  for k, v in traverse_util.flatten_dict(jax.device_get(state.params)).items():
    np.testing.assert_allclose(v, ref[k], atol=2e-5, rtol=1e-4, err_msg=str(k))


def test_loss_is_normalised_by_the_global_label_count(one_device):
  """Micro-batches and devices with very different label counts: the loss is sum(nll) / total count (what one
  device computes on the whole batch), not a mean of per-device or per-micro-batch means."""
  c = one_device[0]
  host = _uneven_batch()
  mask = np.asarray(thinker_inputs.label_mask(host))
  out = {}
  for name, cfg, shape in (("one", c, dict(data=1)), ("accum", lib.config(grad_accum_steps=4),
                                                      dict(data=2, fsdp=2, tensor=2))):
    mesh = lib.mesh_of(shape)
    setup, step = lib.setup_of(cfg, mesh)
    if step is None:
      lib.train_steps(cfg, mesh, 1)
      setup, step = lib.setup_of(cfg, mesh)
    _, m = step(setup.init(), data_lib.to_global(host, mesh, cfg.sharding_rules, 8))
    out[name] = jax.device_get(m)
    assert float(out[name]["objectives"]["thinker_text"]["count"].sum()) == mask.sum()
  # Per-token NLL from the summed metrics: the accumulated step divides by the same global count.
  np.testing.assert_allclose(float(out["accum"]["loss"]), float(out["one"]["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(out["one"]["loss"]), out["one"]["objectives"]["thinker_text"]["loss_sum"].sum() / mask.sum(), rtol=1e-6)
  # A mean of micro-batch means would differ clearly on this batch.
  per_row = mask.sum(axis=1)
  assert per_row[:4].max() <= 3 < per_row[4:].min()

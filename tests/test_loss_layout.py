"""The Thinker's loss without [B, L, V] logits (omni_jax.thinker.objective.LossLayout): chunked head +
cross-entropy and the labelled-positions budget give the full loss, accuracy and gradients; the compiled step's
temporaries shrink."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train_testlib as lib
from omni_jax import batch as batch_lib
from omni_jax.input.synthetic import SyntheticSource
from omni_jax.models import omni
from omni_jax.thinker import inputs as thinker_inputs
from omni_jax.thinker import objective as thinker_objective
from omni_jax.thinker.objective import LossLayout


def _sft_batch(rows=4, length=48, seed=0):
  """Synthetic rows where only a few positions per row carry labels (as in SFT data)."""
  b = SyntheticSource(batch_size=rows, seq_len=length, vocab_size=256).batch(seed)
  rng = np.random.default_rng(seed)
  keep = rng.random(b["labels"].shape) < 0.15
  b["labels"] = np.where(keep, b["labels"], batch_lib.IGNORE).astype(np.int32)
  b["kind"] = rng.integers(0, len(batch_lib.KINDS), b["kind"].shape).astype(np.int32)
  return {k: jnp.asarray(v) for k, v in b.items()}


def _loss_and_grads(c, batch, layout, with_accuracy=True):
  graphdef, state = nnx.split(omni.OmniModel(c, rngs=nnx.Rngs(1)))

  def loss(state):
    model = nnx.merge(graphdef, state)
    hidden = thinker_inputs.outputs(model.thinker, batch)["hidden"]
    sums = thinker_objective.hidden_token_stats(model.thinker, hidden, batch, layout, with_accuracy=with_accuracy)
    return jnp.sum(sums["loss_sum"]) / jnp.sum(sums["count"]), sums

  (value, sums), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
  return float(value), jax.tree.map(np.asarray, sums), jax.tree.leaves(jax.tree.map(np.asarray, grads))


@pytest.fixture(scope="module")
def reference():
  c = lib.config()
  batch = _sft_batch()
  return c, batch, _loss_and_grads(c, batch, LossLayout())


@pytest.mark.parametrize("layout", [LossLayout(chunk=7), LossLayout(chunk=16), LossLayout(label_budget=12),
                                    LossLayout(chunk=5, label_budget=12), LossLayout(label_budget=2),
                                    LossLayout(fused=True), LossLayout(chunk=7, fused=True),
                                    LossLayout(chunk=5, label_budget=12, fused=True),
                                    LossLayout(label_budget=2, fused=True)],
                         ids=["chunk7", "chunk16", "budget", "budget+chunk", "over-budget", "fused", "fused+chunk7",
                              "fused+budget+chunk", "fused+over-budget"])
def test_layouts_give_the_full_loss_accuracy_and_gradients(reference, layout):
  """Every layout gives the plain loss and gradients; the fused one (the training loss, so without the
  accuracy, which takes the plain path) also its sums."""
  c, batch, (want, want_sums, want_grads) = reference
  counts = np.asarray(jnp.sum(thinker_inputs.label_mask(batch), axis=1))
  if layout.label_budget == 2:
    assert counts.sum() > 2 * len(counts)  # this case takes the every-position fallback (the rows pool: no mesh)
  else:
    assert not layout.label_budget or counts.max() <= layout.label_budget
  got, sums, grads = _loss_and_grads(c, batch, layout, with_accuracy=not layout.fused)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for key in ("loss_sum", "count", "correct")[:3 - layout.fused]:
    np.testing.assert_allclose(sums[key], want_sums[key], rtol=1e-6, atol=1e-6)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def _branch(batch, budget, pool_rows):
  """Positions per row the head ran on (0: every position) under `budget` (and the reduce's sums)."""
  layout = LossLayout(label_budget=budget)
  hidden = jnp.zeros(batch["labels"].shape + (4,), jnp.float32)

  def reduce(h, targets, valid, extra, chunk):
    del targets, extra, chunk
    full = h.shape[:2] == valid.shape == (batch["labels"].shape[0], batch["labels"].shape[1] - 1)
    return {"positions": jnp.array(0 if full else h.shape[1]), "count": jnp.sum(valid)}

  out = jax.jit(lambda: thinker_objective._over_labels(  # pylint: disable=protected-access
      reduce, hidden, batch, layout, (), pool_rows))()
  return int(out["positions"]), int(out["count"])


def test_rows_pool_their_label_budget_and_a_batch_over_the_pool_takes_every_position():
  """One row over the per-row budget beside short ones: pooled (the training loss: its sums are totals), the
  batch still takes the labelled path, on the rows' budgets end to end; per row (the DPO pairs' per-row sums)
  it takes every position; over the pool, so does the pooled loss. Every path counts every label."""
  batch = {k: np.asarray(v) for k, v in _sft_batch(rows=4, length=48).items()}
  labels = np.full_like(batch["labels"], batch_lib.IGNORE)
  labels[0, 1:21] = 7  # 20 labels in row 0, 2 in each other row: 26 in all
  labels[1:, 5:7] = 7
  batch["labels"] = labels
  n = int(np.sum(thinker_inputs.label_mask(batch)))
  assert n == 26
  assert _branch(batch, 8, pool_rows=True) == (32, n)  # 4 rows x 8 pooled: fits
  assert _branch(batch, 8, pool_rows=False) == (0, n)  # row 0 alone is over 8
  assert _branch(batch, 6, pool_rows=True) == (0, n)  # 4 x 6 = 24 < 26
  assert _branch(batch, 20, pool_rows=False) == (20, n)


def test_rows_pool_per_shard_of_the_batch_and_not_across_a_sharded_length():
  """Each device pools the rows it holds: as many groups as the batch axis has shards; one group without a
  mesh; every row its own group where the length axis is sharded (context parallelism)."""
  from omni_jax import sharding  # noqa: PLC0415

  rules = lib.config().sharding_rules
  row_groups = thinker_objective._row_groups  # pylint: disable=protected-access
  assert row_groups(16, 64) == 1
  for axes, want in [({"data": 2, "fsdp": 2, "tensor": 2}, 4), ({"data": 8}, 8), ({"tensor": 8}, 1),
                     ({"data": 2, "context": 4}, 16)]:
    mesh = sharding.make_mesh(axes)
    with sharding.activate(mesh, rules):
      assert row_groups(16, 64) == want, axes


def test_chunked_loss_needs_less_temporary_memory():
  """The compiled gradient of the loss at the released vocabulary (151,936): temporaries with 16-position
  chunks vs all logits at once, measured from XLA's memory analysis in the same process."""
  from configs import tiny  # noqa: PLC0415

  c = tiny.get_config()
  del c.model.thinker["vision"], c.model.thinker["audio"], c.model["talker"]
  b = SyntheticSource(batch_size=2, seq_len=256, vocab_size=1000).batch(0)
  batch = {k: jnp.asarray(v) for k, v in b.items()}
  graphdef, state = nnx.split(nnx.eval_shape(lambda: omni.OmniModel(c, rngs=nnx.Rngs(0))))

  def temp_bytes(layout):
    def loss(state):
      model = nnx.merge(graphdef, state)
      hidden = thinker_inputs.outputs(model.thinker, batch)["hidden"]
      return jnp.sum(thinker_objective.hidden_token_stats(model.thinker, hidden, batch, layout)["loss_sum"])

    return jax.jit(jax.grad(loss)).lower(state).compile().memory_analysis().temp_size_in_bytes

  full, chunked = temp_bytes(LossLayout()), temp_bytes(LossLayout(chunk=16))
  logits = 2 * 256 * 151936 * 4
  assert full > logits  # the float32 logits exist at once
  assert chunked < full / 4, (chunked, full)


def test_the_training_loss_takes_the_fused_head_where_the_head_is_one_matrix(reference):
  """From the config (train.fused_head_loss, on by default) the training loss goes through the fused head (one
  custom-gradient call), also under a label budget; the accuracy (evaluation) and an int8 head (QLoRA, whose
  scale only the Linear applies) take the plain path."""
  from omni_jax.layers import lora  # noqa: PLC0415

  c, batch, _ = reference
  assert LossLayout.from_config(c).fused and not LossLayout.from_config(lib.config(fused_head_loss=False)).fused
  model = omni.OmniModel(c, rngs=nnx.Rngs(1))
  hidden = thinker_inputs.outputs(model.thinker, batch)["hidden"]

  def fused(layout, with_accuracy=False):
    jaxpr = jax.make_jaxpr(lambda h: thinker_objective.hidden_token_stats(model.thinker, h, batch, layout,
                                                                         with_accuracy))(hidden)
    return "custom_vjp_call" in str(jaxpr)

  assert fused(LossLayout(fused=True)) and fused(LossLayout(chunk=5, label_budget=12, fused=True))
  assert not fused(LossLayout()) and not fused(LossLayout(fused=True), with_accuracy=True)
  lora.attach(model, lora.LoraConfig(targets=(("thinker", ("lm_head",)),), base_dtype="int8"), nnx.Rngs(2))
  assert model.thinker.head_weight(hidden.dtype) is None and not fused(LossLayout(fused=True))


def test_a_fused_head_loss_that_is_not_a_bool_fails_at_startup_naming_the_key():
  from omni_jax import config as config_lib, defaults  # noqa: PLC0415
  from omni_jax.errors import ConfigError  # noqa: PLC0415

  c = defaults.base_config()
  config_lib.validate_train(c)
  del c.train["fused_head_loss"]
  config_lib.validate_train(c)  # a config stored before the key existed: fused (LossLayout.from_config)
  assert LossLayout.from_config(c).fused
  c.train.fused_head_loss = "no"
  with pytest.raises(ConfigError, match="config.train.fused_head_loss: must be True or False, got 'no'"):
    config_lib.validate_train(c)

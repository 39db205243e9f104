"""Preference tuning (omni_jax.preference, omni_jax.dpo and the thinker_dpo / talker_dpo objectives): the losses
and their gradients equal the published formulas, directly implemented (1e-6); chosen == rejected gives no
gradient; the reference log-probs come from the frozen weights (a frozen copy, or the base under
lora.disabled()); the per-pair sums of a packed row; config.dpo's checks and the metrics the runs report."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import train_testlib as lib
from omni_jax import batch as batch_lib
from omni_jax import dpo as dpo_lib
from omni_jax import preference, towers
from omni_jax.errors import ConfigError
from omni_jax.evaluate import summary as summary_lib
from omni_jax.input import packing
from omni_jax.input.preprocess import Sample
from omni_jax.models import omni
from omni_jax.models.thinker import Thinker
from omni_jax.talker import layout as talker_layout
from omni_jax.talker import objective as talker_objective
from omni_jax.talker import targets as talker_targets
from omni_jax.thinker import inputs as thinker_inputs
from omni_jax.thinker import objective as thinker_objective
from omni_jax.thinker.objective import LossLayout
from omni_jax.train import metrics as metrics_lib

IGNORE = batch_lib.IGNORE


# --------------------------------------------------------------------------------------- the formulas


def _published(pc, pr, rc, rr, beta, ls, loss):
  """The published losses in float64 numpy, and d loss / d pi_c (= -d loss / d pi_r)."""
  h = (pc - rc) - (pr - rr)
  sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
  if loss == "sigmoid":
    value = -(1 - ls) * np.log(sig(beta * h)) - ls * np.log(sig(-beta * h))
    grad = -(1 - ls) * beta * sig(-beta * h) + ls * beta * sig(beta * h)
  else:
    value = (h - 1 / (2 * beta)) ** 2
    grad = 2 * (h - 1 / (2 * beta))
  return value, grad


@pytest.mark.parametrize("loss,beta,ls", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0),
                                          ("ipo", 1.0, 0.0)])
@pytest.mark.parametrize("x64", [True, False], ids=["float64", "float32"])
def test_losses_and_gradients_equal_the_published_formulas(loss, beta, ls, x64):
  rng = np.random.default_rng(0)
  # Sequence log-probs of a few dozen tokens; float32 holds their differences to ~2e-6, float64 exactly.
  pc, pr, rc, rr = (rng.normal(-20, 6, (3, 5)) for _ in range(4))
  want, want_grad = _published(pc, pr, rc, rr, beta, ls, loss)
  tol = 1e-6 if x64 else 1e-5
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    pc_, pr_, rc_, rr_ = (jnp.asarray(x, dtype) for x in (pc, pr, rc, rr))

    def mean_loss(pc, pr):
      return jnp.mean(preference.dpo_loss(pc, pr, rc_, rr_, beta=beta, label_smoothing=ls, loss=loss)["loss"])

    out = jax.device_get(preference.dpo_loss(pc_, pr_, rc_, rr_, beta=beta, label_smoothing=ls, loss=loss))
    g_c, g_r = jax.grad(mean_loss, argnums=(0, 1))(pc_, pr_)
  assert out["loss"].dtype == dtype
  np.testing.assert_allclose(out["loss"], want, atol=tol, rtol=tol)
  np.testing.assert_allclose(g_c, want_grad / pc.size, atol=tol)
  np.testing.assert_allclose(g_r, -want_grad / pc.size, atol=tol)
  np.testing.assert_allclose(out["chosen_reward"], beta * (pc - rc), atol=tol, rtol=tol)
  np.testing.assert_allclose(out["rejected_reward"], beta * (pr - rr), atol=tol, rtol=tol)
  np.testing.assert_allclose(out["margin"], beta * ((pc - rc) - (pr - rr)), atol=tol, rtol=tol)
  np.testing.assert_array_equal(out["correct"], (pc - rc > pr - rr).astype(np.float32))


# --------------------------------------------------------------------------------------- the pair sums


def test_pair_sums_of_a_packed_row_with_two_pairs_and_padding():
  # One row: pair 1 (chosen 3 labels, rejected 2), an SFT sample, pair 2 (chosen 1, rejected 2), padding.
  pair = np.array([[1, 1, 1, 1, 2, 2, 2, 0, 0, 0, 3, 3, 4, 4, 4, 0, 0]])
  valid = np.array([[0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 0]], bool)
  logp = -np.arange(1, 18, dtype=np.float32)[None] / 4
  logp[0, 15:] = -np.inf  # padding's values never reach a sum
  out = preference.pair_sums(jnp.asarray(logp), jnp.asarray(valid), jnp.asarray(pair), max_pairs=3)
  at = lambda *i: logp[0, list(i)].sum()  # noqa: E731
  np.testing.assert_allclose(out.chosen[0], [at(1, 2, 3), at(11), 0.0], rtol=1e-6)
  np.testing.assert_allclose(out.rejected[0], [at(5, 6), at(13, 14), 0.0], rtol=1e-6)
  np.testing.assert_array_equal(out.chosen_tokens[0], [3, 1, 0])
  np.testing.assert_array_equal(out.rejected_tokens[0], [2, 2, 0])
  np.testing.assert_array_equal(out.valid[0], [True, True, False])
  assert int(preference.count_pairs(jnp.asarray(valid), jnp.asarray(pair))) == 2
  # A pair one of whose replies has no label token is no pair.
  valid[0, 13:15] = False
  out = preference.pair_sums(jnp.asarray(logp), jnp.asarray(valid), jnp.asarray(pair), max_pairs=2)
  np.testing.assert_array_equal(out.valid[0], [True, False])
  assert int(preference.count_pairs(jnp.asarray(valid), jnp.asarray(pair))) == 1
  sums = preference.pair_objective_sums(out, out, beta=0.1)  # policy == reference: log 2 per pair, no margin
  assert float(sums["count"]) == 1 and float(sums["loss_sum"]) == pytest.approx(np.log(2), rel=1e-6)
  assert float(sums["margin"]) == 0 and float(sums["correct"]) == 0
  rpo = preference.pair_objective_sums(out, out, beta=0.1, sft_weight=0.5)  # + the chosen reply's NLL per token
  assert float(rpo["loss_sum"]) == pytest.approx(np.log(2) + 0.5 * -at(1, 2, 3) / 3, rel=1e-6)


# --------------------------------------------------------------------------------------- tiny models


def _config(loss="sigmoid", beta=0.1, ls=0.0, sft_weight=0.0, lora=None, **train):
  c = lib.config(**train)
  del c.model.thinker["vision"], c.model.thinker["audio"]  # text-only rows: faster to compile
  c.dpo = ml_collections.ConfigDict(dict(beta=beta, label_smoothing=ls, loss=loss, max_pairs_per_row=3,
                                         reference="auto", sft_weight=sft_weight))
  c.train.objectives = ml_collections.ConfigDict({"thinker_dpo": 1.0, "talker_dpo": 1.0})
  if lora is not None:
    c.lora = ml_collections.ConfigDict(dict(targets=lora, rank=4, alpha=8.0, dropout=0.0, rslora=False,
                                            base_dtype="float32"))
  return c


class _Frozen(nnx.Module):
  """model.reference as OmniModel holds it: the towers at the starting weights."""

  def __init__(self, start):
    self.thinker, self.talker = start.thinker, start.talker


def _perturb(module, seed):
  """Add noise to every float parameter of `module` (the policy moved away from its start)."""
  rng = np.random.default_rng(seed)
  nnx.update(module, jax.tree.map(
      lambda x: x + jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype)
      if jnp.issubdtype(x.dtype, jnp.floating) else x, nnx.state(module, nnx.Param)))


def _models(c, seed=0):
  """(policy with model.reference = its frozen start, the start): the policy's towers perturbed."""
  policy = omni.OmniModel(c, rngs=nnx.Rngs(seed))
  start = omni.OmniModel(c, rngs=nnx.Rngs(seed))
  policy.reference = _Frozen(start)
  _perturb(policy.thinker, 1)
  _perturb(policy.talker, 2)
  return policy, start


def _segment(rng, prompt, reply, same_as=None):
  toks = rng.integers(10, 200, prompt + reply).astype(np.int32) if same_as is None else same_as[0]
  labels = np.full(len(toks), IGNORE, np.int32)
  labels[prompt:] = toks[prompt:]
  return toks, labels


def _thinker_batch(seed=0, identical=False):
  """Two rows of 48 tokens: row 0 holds two pairs, row 1 an SFT sample and a pair, then padding. A pair is the
  same prompt with two replies; identical: the rejected segment is a copy of the chosen one."""
  rng = np.random.default_rng(seed)
  rows = [[(5, 4, 3), (4, 3, 5)], ["sft", (6, 2, 4)]]
  b, length = len(rows), 48
  out = {k: np.zeros((b, length), np.int32) for k in ("input_ids", "segment_ids", "kind", "dpo_pair")}
  out["labels"] = np.full((b, length), IGNORE, np.int32)
  for r, row in enumerate(rows):
    at, seg, p = 0, 0, 0
    for spec in row:
      if spec == "sft":
        parts = [(_segment(rng, 4, 3), 0)]
      else:
        p += 1
        prompt, n_c, n_r = spec
        chosen = _segment(rng, prompt, n_c)
        rejected = chosen if identical else _segment(rng, prompt, n_r)
        rejected = (np.concatenate([chosen[0][:prompt], rejected[0][prompt:]]),
                    np.concatenate([chosen[1][:prompt], rejected[1][prompt:]]))  # the same prompt
        parts = [(chosen, 2 * p - 1), (rejected, 2 * p)]
      for (toks, labels), pair_id in parts:
        seg += 1
        n = len(toks)
        out["input_ids"][r, at:at + n], out["labels"][r, at:at + n] = toks, labels
        out["segment_ids"][r, at:at + n], out["dpo_pair"][r, at:at + n] = seg, pair_id
        at += n
  return {k: jnp.asarray(v) for k, v in out.items()}


def _direct_thinker_logps(thinker, batch):
  """{(row, pair id): sum of log softmax(full logits)[label]} by explicit positions (no objective code)."""
  logp = jax.nn.log_softmax(thinker_inputs.outputs(thinker, batch)["logits"].astype(jnp.float32), axis=-1)
  labels, seg, pair = (np.asarray(batch[k]) for k in ("labels", "segment_ids", "dpo_pair"))
  where = {}
  for r in range(labels.shape[0]):
    for i in range(labels.shape[1] - 1):
      if labels[r, i + 1] != IGNORE and seg[r, i + 1] == seg[r, i] > 0 and pair[r, i + 1] > 0:
        where.setdefault((r, int(pair[r, i + 1])), []).append(i)
  return {(r, p): jnp.sum(logp[r, np.array(i), labels[r, np.array(i) + 1]]) for (r, p), i in where.items()}


def _direct_loss(policy, reference, cfg):
  """The mean over pairs of the published loss, from {(row, id): log-prob} of policy and reference."""
  losses = []
  for (r, cid) in sorted(k for k in policy if k[1] % 2 == 1):
    h = (policy[(r, cid)] - reference[(r, cid)]) - (policy[(r, cid + 1)] - reference[(r, cid + 1)])
    if cfg.loss == "sigmoid":
      ls = cfg.label_smoothing
      loss = -(1 - ls) * jnp.log(jax.nn.sigmoid(cfg.beta * h)) - ls * jnp.log(jax.nn.sigmoid(-cfg.beta * h))
    else:
      loss = (h - 1 / (2 * cfg.beta)) ** 2
    losses.append(loss)
  return sum(losses) / len(losses)


def _objective_mean(name, model, batch):
  with towers.shared_outputs():
    sums = towers.objective(name).loss(model, batch, jax.random.key(0))
  return sums["loss_sum"] / towers.objective(name).normalizer(batch), sums


def _grads(fn, model):
  """(value, aux, grads as {path: array}) of fn(model) by the model's parameters, jitted."""
  graphdef, state = nnx.split(model)

  def of_state(state):
    return fn(nnx.merge(graphdef, state))

  (value, aux), grads = jax.jit(jax.value_and_grad(of_state, has_aux=True))(state)
  flat = {path: np.asarray(g) for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  return float(value), jax.device_get(aux), flat


def _grad_atol(grads, loss="sigmoid"):
  """1e-6 of the largest gradient (at least 1e-6); 1e-5 for IPO: float32 sums of a dozen log-probs (~-50) hold
  h to a few 1e-6, and IPO's gradient 2 (h - 1 / (2 beta)) carries that error in full where the sigmoid's
  flattens it (the formulas alone match to 1e-6 in float64, above)."""
  return (1e-5 if loss == "ipo" else 1e-6) * max(1.0, max(float(np.abs(g).max()) for g in grads.values()))


@pytest.mark.parametrize("loss,ls,layout", [("sigmoid", 0.0, LossLayout()), ("sigmoid", 0.2, LossLayout(chunk=5)),
                                            ("ipo", 0.0, LossLayout(chunk=7, label_budget=8))],
                         ids=["sigmoid", "cdpo-chunked", "ipo-budget"])
def test_thinker_dpo_and_its_gradients_equal_the_direct_formula(loss, ls, layout):
  c = _config(loss=loss, ls=ls, beta=0.5)
  policy, _ = _models(c)
  policy.thinker.loss_layout = layout
  cfg = dpo_lib.settings(policy.thinker)
  batch = _thinker_batch()
  assert float(thinker_objective.num_dpo_pairs(batch)) == 3

  def direct(model):
    ref = _direct_thinker_logps(model.reference.thinker, batch)
    return _direct_loss(_direct_thinker_logps(model.thinker, batch),
                        jax.tree.map(jax.lax.stop_gradient, ref), cfg), ()

  want, _, want_grads = _grads(direct, policy)
  got, sums, got_grads = _grads(lambda m: _objective_mean("thinker_dpo", m, batch), policy)
  assert float(sums["count"]) == 3
  tol = 1e-5 if loss == "ipo" else 1e-6  # float32 h: see _grad_atol
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
  assert want_grads.keys() == got_grads.keys()
  moved = 0
  for path, w in want_grads.items():
    np.testing.assert_allclose(got_grads[path], w, atol=_grad_atol(want_grads, loss),
                               err_msg=jax.tree_util.keystr(path))
    if "reference" in jax.tree_util.keystr(path):
      assert not np.any(got_grads[path]), path  # the frozen reference gets no gradient
    moved += bool(np.any(w))
  assert moved > 10


def test_thinker_dpo_takes_the_text_loss_logits():
  """Every label of the batch lies in a pair's reply except the SFT sample's: the pairs' log-probs plus the SFT
  sample's equal minus the text loss, under a chunked, budgeted head."""
  c = _config()
  policy, _ = _models(c)
  batch = _thinker_batch(seed=3)
  layout = LossLayout(chunk=5, label_budget=12)
  with towers.shared_outputs():
    hidden = thinker_inputs.outputs(policy.thinker, batch)["hidden"]
    text = thinker_objective.hidden_token_stats(policy.thinker, hidden, batch, layout)
    pairs = thinker_objective.pair_logprobs(policy.thinker, hidden, batch, layout, 3)
    no_pair = {**batch, "dpo_pair": jnp.where(batch["dpo_pair"] > 0, 0, 1)}  # the SFT sample as "pair 1 chosen"
    sft = thinker_objective.pair_logprobs(policy.thinker, hidden, no_pair, layout, 1)
  total = float(jnp.sum(pairs.chosen) + jnp.sum(pairs.rejected) + jnp.sum(sft.chosen))
  np.testing.assert_allclose(total, -float(jnp.sum(text["loss_sum"])), rtol=1e-6)


def test_identical_chosen_and_rejected_give_no_gradient():
  c = _config(beta=0.5)
  policy, _ = _models(c)
  _, sums, same = _grads(lambda m: _objective_mean("thinker_dpo", m, _thinker_batch(identical=True)), policy)
  assert float(sums["count"]) == 3 and float(sums["margin"]) == 0.0
  assert float(sums["loss_sum"]) == pytest.approx(3 * np.log(2), rel=1e-6)  # h = 0: log 2 per pair
  _, _, differ = _grads(lambda m: _objective_mean("thinker_dpo", m, _thinker_batch()), policy)
  largest = max(np.abs(g).max() for g in differ.values())
  assert largest > 1e-3
  assert max(np.abs(g).max() for g in same.values()) < 1e-6 * largest


def _reference_logps(model, batch, key="thinker"):
  """The reference's per-pair log-probs as the objectives compute them."""
  cfg = dpo_lib.settings(model.thinker)
  layout = LossLayout()

  def thinker_ref(ref):
    return thinker_objective.pair_logprobs(ref.thinker, thinker_inputs.outputs(ref.thinker, batch)["hidden"], batch,
                                       layout, cfg.max_pairs_per_row)

  def talker_ref(ref):
    return talker_objective.pair_logprobs(talker_objective.talker_logits(ref, batch), batch, cfg.max_pairs_per_row)

  with towers.shared_outputs():
    if key == "thinker":
      return dpo_lib.reference(model, cfg, key, thinker_ref, ("thinker",))
    policy_thinker = thinker_inputs.outputs(model.thinker, batch)
    return dpo_lib.reference(model, cfg, key, talker_ref, ("thinker", "talker"), {"thinker": policy_thinker})


def _policy_logps(model, batch):
  with towers.shared_outputs():
    hidden = thinker_inputs.outputs(model.thinker, batch)["hidden"]
    return thinker_objective.pair_logprobs(model.thinker, hidden, batch, LossLayout(), 3)


def test_the_reference_is_the_frozen_copy():
  c = _config()
  policy, start = _models(c)
  batch = _thinker_batch()
  ref, mine = _reference_logps(policy, batch), _policy_logps(policy, batch)
  base = _policy_logps(start, batch)
  np.testing.assert_array_equal(ref.chosen, base.chosen)
  np.testing.assert_array_equal(ref.rejected, base.rejected)
  assert np.abs(np.asarray(mine.chosen - base.chosen)).max() > 1e-2  # the policy moved
  _perturb(policy.thinker, 7)  # moving the policy again leaves the reference where it was
  again = _reference_logps(policy, batch)
  np.testing.assert_array_equal(again.chosen, ref.chosen)
  assert np.abs(np.asarray(_policy_logps(policy, batch).chosen - mine.chosen)).max() > 1e-2


def test_without_a_frozen_copy_the_objective_says_what_is_missing():
  c = _config()
  model = omni.OmniModel(c, rngs=nnx.Rngs(0))
  model.reference = None  # as if OmniModel had not built it
  with pytest.raises(ValueError, match="model.reference"):
    _objective_mean("thinker_dpo", model, _thinker_batch())


def _set_adapters(model, seed):
  """Random LoRA B (a fresh adapter's B is zero, which would change nothing)."""
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  keys = iter(jax.random.split(jax.random.key(seed), len(flat)))
  for path, var in flat.items():
    if path[-2:] == ("lora", "b"):
      var.value = 0.1 * jax.random.normal(next(keys), var.value.shape, var.value.dtype)
  nnx.update(model, state)


def test_with_lora_the_reference_is_the_base_under_disabled():
  c = _config(lora={"thinker": ["q_proj", "v_proj", "down_proj"]})
  model = omni.OmniModel(c, rngs=nnx.Rngs(0))
  assert dpo_lib.settings(model.thinker).reference == dpo_lib.ADAPTERS_OFF
  plain = _config()
  base = omni.OmniModel(plain, rngs=nnx.Rngs(0))  # the same base weights, no adapters
  batch = _thinker_batch()
  before = _policy_logps(model, batch)  # B = 0: the base
  np.testing.assert_allclose(before.chosen, _policy_logps(base, batch).chosen, rtol=1e-6)
  _set_adapters(model, 3)
  moved = _policy_logps(model, batch)
  ref = _reference_logps(model, batch)
  assert np.abs(np.asarray(moved.chosen - before.chosen)).max() > 1e-2
  np.testing.assert_allclose(ref.chosen, _policy_logps(base, batch).chosen, rtol=1e-6)
  np.testing.assert_allclose(ref.rejected, _policy_logps(base, batch).rejected, rtol=1e-6)
  # The objective's gradient reaches the adapters only through the policy: chosen == rejected gives none.
  _, _, grads = _grads(lambda m: _objective_mean("thinker_dpo", m, _thinker_batch(identical=True)), model)
  assert max(np.abs(g).max() for g in grads.values()) < 1e-6


def test_lora_dpo_steps_raise_the_margin_and_chosen_equal_rejected_steps_have_no_gradient():
  """The train step (omni_jax.train.step) on the objective alone, LoRA on the Thinker: a batch whose pairs have
  chosen == rejected gives a zero gradient; otherwise the margin and the accuracy rise."""
  from omni_jax.train import state as state_lib  # noqa: PLC0415
  from omni_jax.train import step as step_lib  # noqa: PLC0415

  c = _config(lora={"thinker": ["q_proj", "v_proj", "gate_proj"]}, batch_size=2, seq_len=48, warmup_steps=0,
              lr=1e-2)
  c.train.objectives = ml_collections.ConfigDict({"thinker_dpo": 1.0})
  towers.validate(c)
  setup = state_lib.Setup(c, lib.mesh_of(dict(data=1)))
  step = step_lib.jit_train_step(setup)
  _, m = step(setup.init(), _thinker_batch(identical=True))
  # (Adam would still move the adapters by normalising this float32 noise: a gradient, not an update, is zero.)
  assert float(m["grad_norm"]) < 1e-6, float(m["grad_norm"])
  state = setup.init()
  scalars = []
  for _ in range(4):
    state, m = step(state, _thinker_batch())
    scalars.append(metrics_lib.summarize(jax.device_get(m["objectives"]), "train"))
  first, last = scalars[1], scalars[-1]  # the first step after B = 0 has moved
  assert scalars[0]["train/thinker_dpo/loss"] == pytest.approx(np.log(2), rel=1e-6)  # policy == reference
  assert last["train/thinker_dpo/margin"] > first["train/thinker_dpo/margin"] > 0
  assert last["train/thinker_dpo/loss"] < first["train/thinker_dpo/loss"] < np.log(2)
  assert last["train/thinker_dpo/accuracy"] == 1.0 and last["train/thinker_dpo/pairs"] == 3


# --------------------------------------------------------------------------------------- the Talker


def _talker_batch(seed=0, rows=2, texts_differ=False):
  """Rows that each hold a spoken pair (the same prompt and text, two code sequences), odd rows also a lone
  spoken sample; talker_dpo_pair numbers the pairs on the Talker positions. texts_differ: the rejected reply's
  text differs too, and dpo_pair numbers the pair on the Thinker tokens as well."""
  rng = np.random.default_rng(seed)
  ids = talker_targets.codec_ids(lib.config().model.talker)

  def spoken(toks, big_l, codes, name):
    labels = np.full(len(toks), IGNORE, np.int32)
    labels[big_l:] = toks[big_l:]
    return Sample(name, batch_lib.KIND_TEXT, toks, labels, [], [], [], targets={"talker": talker_layout.SpokenReply(
        big_l, len(toks) - big_l, codes, 253, ids)})

  packed = []
  for r in range(rows):
    big_l, n = int(rng.integers(5, 8)), int(rng.integers(3, 5))
    toks = rng.integers(10, 200, big_l + n).astype(np.int32)
    other = np.concatenate([toks[:big_l], rng.integers(10, 200, n)]).astype(np.int32) if texts_differ else toks
    chosen = rng.integers(0, 64, int(rng.integers(6, 10))).astype(np.int32)
    rejected = rng.integers(0, 64, int(rng.integers(6, 10))).astype(np.int32)
    row = [spoken(toks, big_l, chosen, "c"), spoken(other, big_l, rejected, "r")]
    if r % 2:
      lone = rng.integers(10, 200, 8).astype(np.int32)
      row.append(spoken(lone, 5, rng.integers(0, 64, 5).astype(np.int32), "lone"))
    packed.append(row)
  out = packing.assemble(packed, packing.Bucket(seq_len=48, batch_size=rows, sizes={"talker_seq_len": 72}), pad_id=0)
  number = lambda seg: np.where(seg == 1, 1, np.where(seg == 2, 2, 0)).astype(np.int32)  # noqa: E731
  out["talker_dpo_pair"] = number(out["talker_segment_ids"])
  out.pop("dpo_pair", None)
  if texts_differ:
    out["dpo_pair"] = number(out["segment_ids"])
  return {k: jnp.asarray(v) for k, v in out.items()}


def _direct_talker_logps(model, batch):
  """{(row, pair id): sum of log softmax(Talker logits)[code]} by explicit positions."""
  x, positions = talker_objective.talker_inputs(model, batch)
  logits = model.talker(x, positions, batch["talker_segment_ids"])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  labels, pair = np.asarray(batch["talker_labels"]), np.asarray(batch["talker_dpo_pair"])
  where = {}
  for r, i in zip(*np.nonzero((labels != IGNORE) & (pair > 0))):
    where.setdefault((int(r), int(pair[r, i])), []).append(i)
  return {(r, p): jnp.sum(logp[r, np.array(i), labels[r, np.array(i)]]) for (r, p), i in where.items()}


def test_talker_dpo_and_its_gradients_equal_the_direct_formula():
  c = _config(loss="sigmoid", ls=0.1, beta=0.2)
  policy, _ = _models(c)
  cfg = dpo_lib.settings(policy.talker)
  batch = _talker_batch()
  assert float(talker_objective.num_dpo_pairs(batch)) == 2

  def direct(model):
    with towers.shared_outputs():
      mine = _direct_talker_logps(model, batch)
    with towers.shared_outputs():
      ref = _direct_talker_logps(model.reference, batch)
    return _direct_loss(mine, jax.tree.map(jax.lax.stop_gradient, ref), cfg), ()

  want, _, want_grads = _grads(direct, policy)
  got, sums, got_grads = _grads(lambda m: _objective_mean("talker_dpo", m, batch), policy)
  assert float(sums["count"]) == 2
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  for path, w in want_grads.items():
    np.testing.assert_allclose(got_grads[path], w, atol=_grad_atol(want_grads), err_msg=jax.tree_util.keystr(path))
  assert any(np.any(g) for p, g in got_grads.items() if "thinker" in jax.tree_util.keystr(p)
             and "reference" not in jax.tree_util.keystr(p))  # the Talker's inputs train the Thinker too


def test_talker_reference_with_lora_on_the_talker_shares_the_thinker_forward():
  """LoRA on the Talker only: the Thinker does not train, so the reference reuses the policy's Thinker forward,
  and the reference Talker is the base Talker."""
  c = _config(lora={"talker": ["q_proj", "v_proj"]})
  model = omni.OmniModel(c, rngs=nnx.Rngs(0))
  plain = _config()
  base = omni.OmniModel(plain, rngs=nnx.Rngs(0))
  _set_adapters(model, 5)
  batch = _talker_batch()
  ref = _reference_logps(model, batch, key="talker")
  with towers.shared_outputs():
    want = _direct_talker_logps(base, batch)
  np.testing.assert_allclose(ref.chosen[:, 0], [want[(0, 1)], want[(1, 1)]], rtol=1e-6)
  np.testing.assert_allclose(ref.rejected[:, 0], [want[(0, 2)], want[(1, 2)]], rtol=1e-6)
  with towers.shared_outputs():
    moved = _direct_talker_logps(model, batch)
  assert abs(float(moved[(0, 1)] - want[(0, 1)])) > 1e-3

  calls = []
  forward = Thinker.__call__

  def counting(self, *a, **k):
    calls.append(1)
    return forward(self, *a, **k)

  Thinker.__call__ = counting
  try:
    _objective_mean("talker_dpo", model, batch)
  finally:
    Thinker.__call__ = forward
  assert len(calls) == 1  # one Thinker forward for the policy and the reference


# --------------------------------------------------------------------------------------- config and metrics


def test_config_dpo_is_checked_by_key():
  c = _config()
  towers.validate(c)
  assert dpo_lib.DpoConfig.from_config(c) == dpo_lib.DpoConfig(max_pairs_per_row=3)
  bad = [("beta", 0.0, "config.dpo.beta"), ("label_smoothing", 0.5, "config.dpo.label_smoothing"),
         ("loss", "hinge", "config.dpo.loss"), ("max_pairs_per_row", 0, "config.dpo.max_pairs_per_row"),
         ("reference", "base", "config.dpo.reference"), ("sft_weight", -1.0, "config.dpo.sft_weight"),
         ("temperature", 1.0, "config.dpo: unknown keys")]
  for key, value, message in bad:
    c = _config()
    c.dpo[key] = value
    with pytest.raises(ConfigError, match=message):
      towers.validate(c)
  c = _config(loss="ipo", ls=0.1)
  with pytest.raises(ConfigError, match="config.dpo.label_smoothing"):
    towers.validate(c)
  c = _config()
  del c["dpo"]
  with pytest.raises(ConfigError, match="config.train.objectives.thinker_dpo: preference tuning needs config.dpo"):
    towers.validate(c)
  c = _config()
  c.train.objectives = ml_collections.ConfigDict({"thinker_text": 1.0})
  with pytest.raises(ConfigError, match="config.dpo: set, but"):
    towers.validate(c)
  # Without config.train.objectives the DPO objectives are not among the default ones.
  c = lib.config()
  with c.unlocked():
    del c.train["objectives"]
  assert "thinker_dpo" not in towers.objective_weights(c) and "thinker_text" in towers.objective_weights(c)


def test_metrics_report_rewards_margins_and_accuracy():
  sums = {"thinker_text": {"loss_sum": np.array([2.0, 0, 0, 0]), "count": np.array([4.0, 0, 0, 0])},
          "thinker_dpo": {"loss_sum": 1.5, "count": 3.0, "chosen_reward": 0.6, "rejected_reward": -0.3,
                          "margin": 0.9, "correct": 2.0}}
  out = metrics_lib.summarize(sums, "eval")
  assert out["eval/loss"] == 0.5
  assert out["eval/thinker_dpo/loss"] == 0.5 and out["eval/thinker_dpo/pairs"] == 3
  assert out["eval/thinker_dpo/rewards_chosen"] == pytest.approx(0.2)
  assert out["eval/thinker_dpo/rewards_rejected"] == pytest.approx(-0.1)
  assert out["eval/thinker_dpo/margin"] == pytest.approx(0.3)
  assert out["eval/thinker_dpo/accuracy"] == pytest.approx(2 / 3)
  assert "eval/thinker_dpo/ppl" not in out
  table = summary_lib.table(dict(metrics=out, evaluators={}, split="eval", step=3))  # the eval report's headline
  for name in ("loss", "accuracy", "margin", "rewards_chosen", "rewards_rejected"):
    assert f"eval/thinker_dpo/{name} " in table
  assert "eval/thinker_dpo/pairs" not in table


def test_batches_without_pairs_give_zero_sums():
  c = _config()
  policy, _ = _models(c)
  batch = {k: v for k, v in _thinker_batch().items() if k != "dpo_pair"}
  with towers.shared_outputs():
    sums = towers.objective("thinker_dpo").loss(policy, batch, jax.random.key(0))
  assert set(sums) == set(preference.SUM_KEYS) and all(float(v) == 0 for v in sums.values())
  assert float(thinker_objective.num_dpo_pairs(batch)) == 0


# --------------------------------------------------------------------------------------- meshes


MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=2, tensor=4)]


def _lora_dpo_step(shape):
  """One step of both DPO objectives with LoRA on both towers, on `shape`: (loss, grad_norm, objective sums)."""
  from omni_jax.train import data as data_lib  # noqa: PLC0415
  from omni_jax.train import state as state_lib  # noqa: PLC0415
  from omni_jax.train import step as step_lib  # noqa: PLC0415

  c = _config(lora={"thinker": ["q_proj", "v_proj", "up_proj"], "talker": ["q_proj", "down_proj"]}, batch_size=8,
              seq_len=48, warmup_steps=0)
  c.train.objectives = ml_collections.ConfigDict({"thinker_dpo": 1.0, "talker_dpo": 0.5})
  mesh = lib.mesh_of(shape)
  setup = state_lib.Setup(c, mesh)
  batch = data_lib.to_global(jax.device_get(_talker_batch(rows=8, texts_differ=True)), mesh, c.sharding_rules, 8)
  step = step_lib.jit_train_step(setup)
  state, _ = step(setup.init(), batch)  # B = 0 at the start: the second step has a margin to show
  _, m = step(state, batch)
  m = jax.device_get(m)
  return float(m["loss"]), float(m["grad_norm"]), m["objectives"]


@pytest.fixture(scope="module")
def one_device_step():
  return _lora_dpo_step(dict(data=1))


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(str(s[a]) for a in ("data", "fsdp", "tensor")))
def test_meshes_give_the_one_device_dpo_step(shape, one_device_step):
  loss, grad_norm, sums = _lora_dpo_step(shape)
  want_loss, want_norm, want = one_device_step
  assert float(want["thinker_dpo"]["count"]) == 8 and float(want["talker_dpo"]["count"]) == 8
  assert abs(float(want["thinker_dpo"]["margin"])) > 0 and abs(float(want["talker_dpo"]["margin"])) > 0
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(grad_norm, want_norm, rtol=1e-4)
  for name in ("thinker_dpo", "talker_dpo"):
    for key, value in want[name].items():
      np.testing.assert_allclose(sums[name][key], value, rtol=1e-4, atol=1e-6, err_msg=f"{name}/{key}")

"""The tower registry (omni_jax.towers): a toy tower registered here, and nowhere else, is built, trained
through its own objective, converted both ways and validated; a tower registered here adds its own batch field
through its data hook, which the data pipeline packs into the batches the step trains on; objectives get a
fresh key every step; a mesh axis dropped from a parameter dimension is logged."""

import json
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx, traverse_util
from safetensors.numpy import save_file

import train_testlib as lib
from omni_jax import sharding, towers
from omni_jax.convert import hf
from omni_jax.convert.rules import Rule, transpose
from omni_jax import batch as batch_lib
from omni_jax.errors import ConfigError
from omni_jax.input.tokenizer import Tokenizer
from omni_jax.layers.linear import Linear
from omni_jax.models import omni
from omni_jax.train import data as data_lib
from omni_jax.train import metrics as metrics_lib
from omni_jax.train import state as state_lib
from omni_jax.train import step as step_lib


class Toy(nnx.Module):
  def __init__(self, dim, rt, rngs):
    self.proj = Linear(dim, dim, use_bias=True, names=("embed", "mlp"), rngs=rngs, dtype=rt.dtype,
                       param_dtype=rt.param_dtype)


def _view(config):
  dim = config.model.toy.dim
  if not isinstance(dim, int) or dim <= 0:
    raise ConfigError(f"config.model.toy.dim: must be a positive integer, got {dim!r}")
  return dim


def _toy_loss(model, batch, rng, evaluate=False):
  """sum over rows of |proj(noise)|^2, noise drawn from the step's key; `draw` exposes the key's first draw."""
  rows = batch["input_ids"].shape[0]
  noise = jax.random.normal(rng, (rows, model.toy.proj.kernel.shape[0]))
  out = model.toy.proj(noise)
  return {"loss_sum": jnp.sum(out.astype(jnp.float32) ** 2), "count": jnp.float32(rows), "draw": noise[0, 0]}


TOY = towers.Tower(
    name="toy", section="model.toy", view=_view, build=lambda config, rt, rngs: Toy(_view(config), rt, rngs),
    rules=(Rule(r"toy\.proj\.kernel", "toy.projection.weight", transpose, transpose),),
    objectives=(towers.Objective("toy_l2", _toy_loss, lambda batch: batch["input_ids"].shape[0]),))


@pytest.fixture
def toy():
  towers.register(TOY)
  yield TOY
  towers.unregister("toy")


def _config(**train):
  c = lib.config(**train)
  c.model.toy = ml_collections.ConfigDict(dict(dim=8))
  c.train.objectives = ml_collections.ConfigDict({"thinker_text": 1.0, "toy_l2": 0.5})
  return c


def _steps(c, n):
  mesh = lib.mesh_of(dict(data=1))
  setup = state_lib.Setup(c, mesh)
  state = setup.init()
  first = jax.device_get(state.params)
  step = step_lib.jit_train_step(setup)
  rows = data_lib.process_rows(mesh, c.sharding_rules, c.train.batch_size, c.train.seq_len)
  source = data_lib.make_source(c, "train", c.train.batch_size, rows)
  metrics = []
  for _ in range(n):
    state, m = step(state, data_lib.to_global(next(source), mesh, c.sharding_rules, c.train.batch_size))
    metrics.append(jax.tree.map(np.asarray, jax.device_get(m)))
  return metrics, first, state, setup


def test_a_registered_tower_builds_trains_and_converts(toy, tmp_path):
  c = _config()
  towers.validate(c)
  metrics, first, state, setup = _steps(c, 2)
  m = metrics[0]
  assert set(m["objectives"]) == {"thinker_text", "toy_l2"}
  thinker, toy_sums = m["objectives"]["thinker_text"], m["objectives"]["toy_l2"]
  assert float(toy_sums["count"]) == c.train.batch_size and float(toy_sums["loss_sum"]) > 0
  expected = thinker["loss_sum"].sum() / thinker["count"].sum() + 0.5 * toy_sums["loss_sum"] / toy_sums["count"]
  np.testing.assert_allclose(float(m["loss"]), expected, rtol=1e-5)
  scalars = metrics_lib.summarize(m["objectives"], "train")
  np.testing.assert_allclose(scalars["train/toy_l2/loss"], toy_sums["loss_sum"] / toy_sums["count"], rtol=1e-6)
  assert "train/loss_text" in scalars  # the thinker's names are unchanged
  # Its gradient reached its parameters; the FLOPs counter skips a tower without a formula.
  after = jax.device_get(state.params)
  assert not np.array_equal(after["toy"]["proj"]["kernel"], first["toy"]["proj"]["kernel"])
  assert set(metrics_lib.FlopCounter(c).towers) == {"thinker", "talker"}

  # Conversion: its rule renames the kernel, the generic leaf rule maps the bias; both round-trip.
  graphdef, abstract = omni.abstract_model(c)
  params = nnx.merge(graphdef, after)
  tensors = hf.state_to_tensors(nnx.state(params))
  assert "toy.projection.weight" in tensors and "toy.proj.bias" in tensors
  np.testing.assert_array_equal(tensors["toy.projection.weight"], after["toy"]["proj"]["kernel"].T)
  save_file(tensors, tmp_path / "model.safetensors")
  loaded = hf.load_state(str(tmp_path), abstract, hf_config={"model_type": "qwen2_5_omni"})
  flat_after = traverse_util.flatten_dict(after)
  for path, value in traverse_util.flatten_dict(nnx.to_pure_dict(loaded)).items():
    np.testing.assert_array_equal(value, flat_after[path])

  # Without its section the tower is not built, and its tensors in a checkpoint are reported, not fatal.
  plain = lib.config()
  assert [t.name for t in towers.built(plain)] == ["thinker", "talker"]
  _, plain_abstract = omni.abstract_model(plain)
  assert "toy" not in nnx.to_pure_dict(plain_abstract)
  hf.load_state(str(tmp_path), plain_abstract, hf_config={"model_type": "qwen2_5_omni"})


def _expected_draw(rng_data, k, rows):
  """The step's key scheme: split(state.rng) -> (next, step key); k micro-batch keys; fold_in(objective index)."""
  step_key = jax.random.split(jax.random.wrap_key_data(rng_data))[1]
  keys = [step_key] if k == 1 else list(jax.random.split(step_key, k))
  return sum(float(jax.random.normal(jax.random.fold_in(key, 1), (rows, 8))[0, 0]) for key in keys)


def test_objectives_get_a_fresh_key_every_step_and_micro_batch(toy):
  c = _config()
  metrics, _, state, setup = _steps(c, 3)
  draws = [float(m["objectives"]["toy_l2"]["draw"]) for m in metrics]
  assert len(set(draws)) == 3  # a different key at each step
  rng = jax.device_get(setup.init().rng)
  np.testing.assert_allclose(draws[0], _expected_draw(rng, 1, 8), rtol=1e-6)
  assert [float(m["objectives"]["toy_l2"]["draw"]) for m in _steps(c, 3)[0]] == draws  # reproducible
  # Two micro-batches: each draws with its own key.
  accum = _steps(_config(grad_accum_steps=2), 1)[0][0]["objectives"]["toy_l2"]
  assert float(accum["count"]) == 8
  np.testing.assert_allclose(float(accum["draw"]), _expected_draw(rng, 2, 4), rtol=1e-5)


def test_objective_weights_are_validated(toy):
  c = _config()
  c.train.objectives.nope = 1.0
  with pytest.raises(ConfigError, match=r"config.train.objectives.nope: unknown objective"):
    towers.validate(c)
  c = _config()
  c.train.objectives.toy_l2 = -1.0
  with pytest.raises(ConfigError, match=r"config.train.objectives.toy_l2: the weight must be a number >= 0"):
    towers.validate(c)
  c = _config()
  del c.model["toy"]
  with pytest.raises(ConfigError, match=r"config.train.objectives.toy_l2: its tower 'toy' is not built"):
    towers.validate(c)
  c = _config()
  c.train.objectives = ml_collections.ConfigDict({"thinker_text": 0.0, "toy_l2": 0.0})
  with pytest.raises(ConfigError, match=r"config.train.objectives: at least one objective needs a positive"):
    towers.validate(c)
  c = _config()
  c.model.toy.dim = 0
  with pytest.raises(ConfigError, match=r"config.model.toy.dim"):
    towers.validate(c)  # the tower's own view checks its section


def test_weight_zero_objective_is_left_out_of_training(toy):
  c = _config()
  c.train.objectives.toy_l2 = 0.0
  towers.validate(c)
  assert [o.name for o, _ in towers.weighted_objectives(c)] == ["thinker_text"]
  assert set(_steps(c, 1)[0][0]["objectives"]) == {"thinker_text"}


# --------------------------------------------------------------------------------------- a tower with its own data


class WordCounts(towers.Targets):
  """The target of a sample: the number of words of its last reply."""

  def sample(self, name, messages, spans, pair):
    reply = [m for m in messages if m["role"] == "assistant"][-1]
    return len(" ".join(p["text"] for p in reply["content"] if p["type"] == "text").split())

  def bucket_sizes(self, seq_len):
    return {"words_slots": 4}


class WordsData(towers.TowerData):
  """words [B, words_slots] int32: the word counts of a row's samples, one slot per sample (0: no sample)."""
  name = "words"
  fields = {"words": 2}
  sizes = {"words_slots": 0}

  def targets(self, config, preference, train_sources):
    return WordCounts() if towers.trains(config, "words_l2") else None

  def fits(self, targets, sizes):
    return len(targets) <= sizes.get("words_slots", 0)

  def empty(self, rows, sizes, pairs):
    return {"words": np.zeros((rows, sizes["words_slots"]), np.int32)} if sizes.get("words_slots") else {}

  def write(self, batch, row, cursor, at, segment, target, pair):
    batch["words"][row, cursor] = target
    return cursor + 1


class Words(nnx.Module):
  def __init__(self, rt, rngs):
    self.proj = Linear(1, 1, use_bias=True, names=("embed", "mlp"), rngs=rngs, dtype=rt.dtype,
                       param_dtype=rt.param_dtype)


def _words_loss(model, batch, rng, evaluate=False):
  """Squared error of one learned guess (proj of 1) at every filled word-count slot."""
  words = batch["words"].astype(jnp.float32)
  guess = model.words.proj(jnp.ones((1, 1), jnp.float32))[0, 0].astype(jnp.float32)
  filled = words > 0
  return {"loss_sum": jnp.sum(jnp.where(filled, (guess - words) ** 2, 0.0)),
          "count": jnp.sum(filled, dtype=jnp.float32)}


WORDS = towers.Tower(
    name="words", section="model.words", view=lambda config: None, build=lambda config, rt, rngs: Words(rt, rngs),
    objectives=(towers.Objective("words_l2", _words_loss, lambda batch: jnp.sum(batch["words"] > 0)),),
    data=WordsData())


@pytest.fixture
def words():
  towers.register(WORDS)
  yield WORDS
  towers.unregister("words")


def test_a_tower_adds_its_own_batch_field_through_its_data_hook(words, tmp_path):
  from configs import tiny  # noqa: PLC0415

  lines = [{"messages": [{"role": "user", "content": f"Count {i}."},
                         {"role": "assistant", "content": " ".join(["word"] * (i + 1))}]} for i in range(6)]
  (tmp_path / "t.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  c = tiny.get_config()
  c.model.words = ml_collections.ConfigDict()
  c.train.objectives = ml_collections.ConfigDict({"words_l2": 1.0})
  c.train.update(dict(batch_size=2, warmup_steps=1))
  c.data.update(dict(source="jsonl", shuffle=False, tfds_data_dir=str(tmp_path / "tfds"), worker_count=0,
                     buckets=(dict(seq_len=64, max_images=0, max_image_patches=0, max_videos=0, max_video_patches=0,
                                   max_audios=0, max_audio_frames=0),)))
  c.data.datasets = ml_collections.ConfigDict({"t": str(tmp_path / "t.jsonl")})
  c.data.mixture = ml_collections.ConfigDict({"t": 1.0})
  towers.validate(c)
  mesh = lib.mesh_of(dict(data=1))
  setup = state_lib.Setup(c, mesh)
  state = setup.init()
  rows = data_lib.process_rows(mesh, c.sharding_rules, c.train.batch_size, c.train.seq_len)
  source = data_lib.make_source(c, "train", c.train.batch_size, rows)
  host = next(source)
  # Packing wrote each sample's word count into its row's slots, in the row's segment order.
  tok = Tokenizer()
  assert host["words"].shape == (2, 4) and host["words"].dtype == np.int32
  for r in range(2):
    segments = int(host["segment_ids"][r].max())
    assert 1 <= segments <= 4 and not host["words"][r, segments:].any()
    for seg in range(1, segments + 1):
      labels = host["labels"][r][host["segment_ids"][r] == seg]
      reply = tok.decode([int(t) for t in labels if t != batch_lib.IGNORE and t < tok.special["<|endoftext|>"]])
      assert host["words"][r, seg - 1] == len(reply.split()) > 0
  # The step trains on it: its objective counts the filled slots, and its parameters move (after the first step,
  # whose learning rate the warmup makes 0).
  first = jax.device_get(state.params["words"])
  step = step_lib.jit_train_step(setup)
  for batch in (host, next(source)):
    state, m = step(state, data_lib.to_global(batch, mesh, c.sharding_rules, c.train.batch_size))
    assert float(m["objectives"]["words_l2"]["count"]) == (batch["words"] > 0).sum()
    assert float(m["objectives"]["words_l2"]["loss_sum"]) > 0
  assert not np.array_equal(jax.device_get(state.params["words"])["proj"]["bias"], first["proj"]["bias"])
  data_lib.close(source)


class _Wide(nnx.Module):
  def __init__(self, rngs):
    self.proj = Linear(6, 16, use_bias=False, names=("embed", "mlp"), rngs=rngs)


def test_dropped_mesh_axis_is_logged_once_per_parameter(caplog):
  abstract = nnx.state(nnx.eval_shape(lambda: _Wide(nnx.Rngs(0))))
  mesh = lib.mesh_of(dict(fsdp=4, tensor=2))  # fsdp=4 does not divide embed=6; tensor=2 divides mlp=16
  rules = (("embed", ("fsdp",)), ("mlp", ("tensor",)))
  with caplog.at_level(logging.WARNING, logger="omni_jax.sharding"):
    specs = sharding.state_specs(abstract, mesh, rules)
    sharding.state_specs(abstract, mesh, rules)
    sharding.logical_to_spec(("embed",), (6,), mesh, rules)  # activations and other callers: no warning
  assert specs["proj"]["kernel"].get_value() == jax.sharding.PartitionSpec(None, "tensor")
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1, warnings
  msg = warnings[0]
  assert "proj.kernel" in msg and "'fsdp' (size 4)" in msg and "'embed' dimension of size 6" in msg

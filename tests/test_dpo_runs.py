"""train.py's loop with DPO on JSONL pairs: full DPO keeps a frozen copy of the starting weights that no checkpoint
holds and every resume reloads from init_from; LoRA DPO's reference is the base (adapters off)."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx, traverse_util

import train_testlib as tl
from configs import tiny
from omni_jax import checkpoint, towers
from omni_jax.errors import ConfigError
from omni_jax.models import omni
from omni_jax.train import loop

WORDS = ["red", "blue", "green", "tea", "coffee", "cat", "dog", "sun", "moon", "rain"]


def _pairs(path: str, n: int, seed: int) -> None:
  """TRL-style text pairs: the chosen reply repeats the question's last word, the rejected one does not."""
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for i in range(n):
      a, b = rng.choice(WORDS, 2, replace=False)
      f.write(json.dumps({"prompt": f"say {a}", "chosen": f"{a} {a}", "rejected": f"{b} no"}) + "\n")


def _config(tmp_path, lora: bool):
  c = towers.without(tiny.get_config(), "talker")  # the real tokenizer's ids: the pairs are text
  c.train.update(dict(steps=2, checkpoint_every=2, log_every=1, warmup_steps=1, async_checkpointing=False))
  c.data.source = "jsonl"
  train, held = str(tmp_path / "prefs.train.jsonl"), str(tmp_path / "prefs.validation.jsonl")
  _pairs(train, 24, 0)
  _pairs(held, 8, 1)
  c.data.datasets = ml_collections.ConfigDict({"prefs": {"train": train, "validation": held}})
  c.data.mixture = ml_collections.ConfigDict({"prefs": 1.0})
  c.data.preference = ("prefs",)
  c.data.buckets = (dict(seq_len=64),)
  c.train.update(dict(batch_size=4, seq_len=64, eval_every=2))
  c.eval.update(dict(steps=1, batch_size=4))
  c.dpo = ml_collections.ConfigDict(dict(beta=0.1, loss="sigmoid", label_smoothing=0.0, max_pairs_per_row=2,
                                         reference="auto", sft_weight=0.0))
  c.train.objectives = ml_collections.ConfigDict({"thinker_dpo": 1.0})
  if lora:
    c.lora = ml_collections.ConfigDict(dict(targets={"thinker": [r"model\.layers\..*_proj"]}, rank=4, alpha=8.0))
  return c


def _base(tmp_path, c) -> str:
  plain = c.copy_and_resolve_references()
  for key in ("dpo", "lora"):
    if key in plain:
      del plain[key]
  _, state, _ = omni.create_sharded(plain, tl.mesh_of(dict(data=1)))
  path = str(tmp_path / "base")
  checkpoint.save_params(path, state, plain)
  return path


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_run_checkpoints_no_reference_and_resumes(tmp_path, lora):
  c = _config(tmp_path, lora)
  if not lora:  # a frozen copy of the starting weights needs starting weights: refused before any data opens
    with pytest.raises(ConfigError, match="init_from"):
      loop.run(c, str(tmp_path / "no_base"), tl.hooks(), devices=tl.one_device())
  c.init_from = _base(tmp_path, c)
  workdir = str(tmp_path / "run")
  last = loop.run(c, workdir, tl.hooks(), devices=tl.one_device())
  assert np.isfinite(last["train/thinker_dpo/loss"]) and last["train/thinker_dpo/pairs"] > 0
  assert "eval/thinker_dpo/margin" in last and "eval/thinker_dpo/accuracy" in last
  stored = checkpoint.stored_tree(os.path.join(checkpoint.params_dir(workdir), "params"))
  assert not any(k.startswith("reference.") for k in stored)  # the reference is never written
  if lora:
    assert all(".lora." in k for k in stored)
  c.train.steps = 3
  loop.run(c, workdir, tl.hooks(), devices=tl.one_device())  # resumes: the reference comes back from init_from
  assert checkpoint.params_dir(workdir).endswith("/3")


def test_full_dpo_reference_is_the_starting_weights_and_stays_frozen(tmp_path):
  from omni_jax.train import state as state_lib

  c = _config(tmp_path, lora=False)
  c.init_from = _base(tmp_path, c)
  setup = state_lib.Setup(c, tl.mesh_of(dict(data=1)))
  assert setup.reference == ("thinker",)
  assert all(k in setup.frozen for k in traverse_util.flatten_dict(setup.abstract_params) if k[0] == "reference")
  external = loop._external(setup, c.init_from)  # pylint: disable=protected-access
  start = jax.device_get(checkpoint.restore_pure(checkpoint.params_dir(c.init_from),
                                                 {"thinker": setup.abstract_params["thinker"]}))
  flat_ref = traverse_util.flatten_dict(jax.device_get(external["reference"]))
  for k, v in traverse_util.flatten_dict(start).items():
    np.testing.assert_array_equal(flat_ref[k], v)

"""The recipes (configs/recipes): each validates and freezes what its docstring says; fine-tuning starts
from a converter-written checkpoint via --config.init_from."""

import copy
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx, traverse_util

import hf_reference as ref
import train_testlib as lib
from omni_jax import checkpoint
from omni_jax.errors import ConfigError
from omni_jax.layers import lora
from omni_jax.models import omni
from omni_jax.towers import validate
from omni_jax.convert import cli
from omni_jax.train import loop
from omni_jax.train import state as state_lib


def _recipe(name, arg=None):
  return importlib.import_module(f"configs.recipes.{name}").get_config(arg)


def _frozen_modules(c):
  setup = state_lib.Setup(c, lib.mesh_of(dict(data=1)))
  return {".".join(p[:3]) for p in setup.frozen}, {".".join(p[:3]) for p in
                                                    traverse_util.flatten_dict(setup.abstract_params)}


@pytest.mark.parametrize("name,arg,frozen", [
    ("stage1", "phase=adapters", {"thinker.model.embed_tokens", "thinker.model.layers", "thinker.model.norm",
                                  "thinker.lm_head.kernel", "thinker.visual.patch_embed", "thinker.visual.blocks",
                                  "thinker.audio_tower.conv1", "thinker.audio_tower.conv2",
                                  "thinker.audio_tower.layers", "thinker.audio_tower.ln_post"}),
    ("stage1", None, {"thinker.model.embed_tokens", "thinker.model.layers", "thinker.model.norm",
                      "thinker.lm_head.kernel"}),
    ("stage2", None, set()),
    ("stage3", None, set()),
])
def test_recipes_freeze_what_they_say(name, arg, frozen):
  c = _recipe(name, arg)
  validate(c)
  got, _ = _frozen_modules(c)
  assert got == frozen


def test_finetune_freezes_the_encoders_and_needs_init_from():
  c = _recipe("finetune")
  with pytest.raises(ConfigError, match="config.init_from: this recipe fine-tunes a checkpoint"):
    validate(c)
  c.init_from = "/some/dir"
  validate(c)
  got, all_modules = _frozen_modules(c)
  assert got == {m for m in all_modules if m.startswith(("thinker.visual", "thinker.audio_tower"))}


@pytest.mark.parametrize("name", ["stage1", "stage2", "stage3", "finetune", "lora", "dpo"])
@pytest.mark.parametrize("model", ["3b", "7b"])
def test_recipes_at_released_sizes_validate(name, model):
  c = _recipe(name, f"model={model}")
  c.init_from = "/ckpt"
  validate(c)
  assert c.train.seq_len == (32768 if name == "stage3" else 8192)


@pytest.mark.slow
def test_finetune_starts_from_a_converted_checkpoint(tmp_path):
  ref.build_thinker("gqa4", seed=5).save_pretrained(tmp_path / "hf")
  cli.main(["--hf_dir", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "orbax")])
  workdir = tmp_path / "ft"
  cmd = [sys.executable, "train.py", "--config", "configs/recipes/finetune.py", "--workdir", str(workdir),
         f"--config.init_from={tmp_path / 'orbax'}", "--config.train.steps=2", "--config.train.seq_len=32",
         "--config.train.batch_size=8", "--config.eval.batch_size=8"]
  out = subprocess.run(cmd, cwd=lib.ROOT, capture_output=True, text=True, timeout=400)
  assert out.returncode == 0, out.stderr[-3000:]
  before = traverse_util.flatten_dict(checkpoint.restore_pure(str(tmp_path / "orbax"), None))
  after = traverse_util.flatten_dict(checkpoint.restore_pure(str(workdir / "checkpoints" / "2"), None))
  assert set(before) == set(after)
  for k, v in before.items():
    same = np.array_equal(np.asarray(v), np.asarray(after[k]))
    assert same == (k[1] in ("visual", "audio_tower")), k  # frozen encoders identical, the rest trained


# ------------------------------------------------------------------------------------------- LoRA and DPO

LM_PROJECTIONS = {f"{group}.{p}" for group, names in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
                  for p in (f"{n}_proj" for n in names)}


def _adapted(c):
  """{tower: {adapted module path inside the tower}} and whether every other parameter is frozen."""
  setup = state_lib.Setup(c, lib.mesh_of(dict(data=1)))
  flat = traverse_util.flatten_dict(setup.abstract_params)
  out = {}
  for k in flat:
    if lora.is_adapter(k):
      i = k.index("lora")
      out.setdefault(k[0], set()).add(".".join(k[1:i]))
  frozen_rest = setup.frozen == frozenset(k for k in flat if not lora.is_adapter(k))
  return out, frozen_rest


@pytest.mark.parametrize("name,arg,towers,objectives", [
    ("lora", None, ("thinker",), {"thinker_text"}),
    ("lora", "towers=talker", ("talker",), {"talker_codes"}),
    ("lora", "towers=both,quant=int8", ("thinker", "talker"), {"thinker_text", "talker_codes"}),
    ("dpo", None, ("thinker",), {"thinker_dpo"}),
    ("dpo", "tower=talker", ("talker",), {"talker_dpo"}),
])
def test_lora_recipes_adapt_the_decoder_projections_only(name, arg, towers, objectives):
  c = _recipe(name, arg)
  with pytest.raises(ConfigError, match="config.init_from: this recipe fine-tunes a checkpoint"):
    validate(c)
  c.init_from = "/ckpt"
  validate(c)
  assert {k for k, v in c.train.objectives.items() if v > 0} == objectives
  assert ("talker" in c.model) == ("talker" in towers)  # the Talker is built only where it trains
  adapted, frozen_rest = _adapted(c)
  assert frozen_rest  # no base parameter has optimizer state
  assert adapted == {t: {f"model.layers.{p}" for p in LM_PROJECTIONS} for t in towers}
  assert c.lora.base_dtype == ("int8" if "quant=int8" in (arg or "") else "bfloat16")
  if name == "dpo":
    assert dict(c.dpo) == dict(beta=0.1, loss="sigmoid", label_smoothing=0.0, max_pairs_per_row=8,
                               reference="auto", sft_weight=0.0)
    assert tuple(c.data.preference) == ("prefs",) and c.data.source == "jsonl"


def test_full_dpo_recipe_trains_the_tower_without_adapters():
  c = _recipe("dpo", "lora=0")
  c.init_from = "/ckpt"
  validate(c)
  assert c.get("lora") is None and dict(c.train.objectives) == {"thinker_dpo": 1.0}
  got, every = _frozen_modules(c)
  # The encoders, and model.reference: the frozen copy of the starting Thinker that full DPO compares with.
  assert got == {m for m in every if m.startswith(("thinker.visual", "thinker.audio_tower", "reference.thinker"))}
  assert {m for m in every if m.startswith("reference.")}
  c = _recipe("dpo", "tower=talker,lora=0")
  assert tuple(c.train.freeze) == ("thinker",) and dict(c.train.objectives) == {"talker_dpo": 1.0}


@pytest.mark.parametrize("name,model,rank,lr", [("lora", "7b", 16, 1e-4), ("lora", "3b", 16, 2e-4),
                                                ("lora", "tiny", 8, None), ("dpo", "7b", 16, None)])
def test_lora_recipe_sizes(name, model, rank, lr):
  c = _recipe(name, f"model={model}")
  assert c.lora.rank == rank and c.lora.alpha == 2.0 * rank and c.lora.base_dtype == "bfloat16"
  if model != "tiny":
    assert (c.train.seq_len, c.model.remat_policy, c.model.attention_impl) == (8192, "full", "auto")
  if lr is not None:
    assert c.train.lr == lr


def test_recipe_data_argument_names_the_splits(tmp_path):
  c = _recipe("lora", f"data={tmp_path}/chat.{{split}}.jsonl")
  assert c.data.source == "jsonl" and dict(c.data.datasets.sft) == {
      "train": f"{tmp_path}/chat.train.jsonl", "validation": f"{tmp_path}/chat.validation.jsonl"}
  c = _recipe("dpo", f"data={tmp_path}/prefs.jsonl")
  assert dict(c.data.datasets.prefs) == {"train": f"{tmp_path}/prefs.jsonl"} and c.train.eval_every == 0
  for name, arg in (("lora", "towers=vision"), ("lora", "quant=int4"), ("dpo", "tower=both"), ("dpo", "lora=2")):
    with pytest.raises(ValueError, match="recipe"):
      _recipe(name, arg)


def _base_checkpoint(path, c):
  """A random base of `c`'s architecture, as a converter would write it (no adapters)."""
  plain = copy.deepcopy(c)
  with plain.unlocked():
    for key in ("lora", "dpo"):
      if key in plain:
        del plain[key]
  _, state, _ = omni.create_sharded(plain, lib.mesh_of(dict(data=1)))
  checkpoint.save_params(str(path), nnx.to_pure_dict(state), plain)
  return str(path)


def _short(c, tmp_path, steps=2):
  c.train.update(dict(steps=steps, batch_size=2, log_every=1, checkpoint_every=0, eval_every=0, warmup_steps=1))
  c.eval.batch_size = 2
  if c.data.source == "jsonl":
    c.data.tfds_data_dir = str(tmp_path / "tfds")
    c.data.worker_count = 0
    c.data.buckets = (dict(seq_len=c.train.seq_len, max_images=0, max_image_patches=0, max_videos=0,
                           max_video_patches=0, max_audios=0, max_audio_frames=0,
                           **({"talker_seq_len": 256} if "talker" in c.model else {})),)
  return c


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_lora_recipe_trains_adapters_over_its_base(tmp_path):
  c = _short(_recipe("lora"), tmp_path)
  c.train.seq_len = 64
  c.init_from = _base_checkpoint(tmp_path / "base", c)
  workdir = str(tmp_path / "run")
  loop.run(c, workdir, devices=lib.one_device())
  losses = [r["train/loss"] for r in _metrics(workdir) if "train/loss" in r]
  assert len(losses) == 2 and np.all(np.isfinite(losses))
  stored = checkpoint.stored_tree(os.path.join(checkpoint.params_dir(workdir), "params"))
  assert stored and all(".lora." in k for k in stored)  # adapters only; the base stays where init_from is


def _pairs(path, records):
  with open(path, "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.slow
@pytest.mark.parametrize("tower", ["thinker", "talker"])
def test_dpo_recipe_runs_on_preference_pairs(tmp_path, tower):
  if tower == "thinker":  # text pairs (TRL's prompt / chosen / rejected)
    records = [{"prompt": f"Question {i}?", "chosen": "A good answer.", "rejected": f"Nonsense {i}."}
               for i in range(8)]
  else:  # the same text, two code sequences (a spoken pair)
    records = [{"prompt": f"Count to {i}.", "speaker": "Ethan",
                "chosen": {"content": f"One to {i}.", "codes": [1 + i, 2, 3, 4]},
                "rejected": {"content": f"One to {i}.", "codes": [5, 6, 7, 8, 9, 10 + i]}} for i in range(8)]
  _pairs(tmp_path / "prefs.train.jsonl", records)
  _pairs(tmp_path / "prefs.validation.jsonl", records[:2])
  c = _short(_recipe("dpo", f"tower={tower},data={tmp_path}/prefs.{{split}}.jsonl"), tmp_path)
  c.train.seq_len = 128
  c.init_from = _base_checkpoint(tmp_path / "base", c)
  workdir = str(tmp_path / "run")
  loop.run(c, workdir, devices=lib.one_device())
  rows = [r for r in _metrics(workdir) if f"train/{tower}_dpo/loss" in r]
  assert len(rows) == 2
  first = rows[0]
  assert first[f"train/{tower}_dpo/pairs"] > 0
  # Step 1: the adapters' B is zero, so the policy is its reference: loss log 2, no margin.
  assert first[f"train/{tower}_dpo/loss"] == pytest.approx(np.log(2), abs=1e-4)
  assert first[f"train/{tower}_dpo/margin"] == pytest.approx(0.0, abs=1e-4)

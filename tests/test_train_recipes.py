"""The recipes (configs/recipes): each validates and freezes what its docstring says; fine-tuning starts
from a converter-written checkpoint via --config.init_from."""

import importlib
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util

import hf_reference as ref
import train_testlib as lib
from omni_jax import checkpoint
from omni_jax.config import ConfigError
from omni_jax.towers import validate
from omni_jax.convert import cli
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


@pytest.mark.parametrize("name", ["stage1", "stage2", "stage3", "finetune"])
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

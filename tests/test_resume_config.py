"""A step whose own config (config/config.json) is truncated is a damaged step: the resume falls back to the
previous intact step with one warning naming the file, eval.py / generate.py take that step too, and a
config edited by hand (still valid JSON) keeps its step usable."""

import json
import logging
import os

import pytest

import train_testlib as lib
from omni_jax import checkpoint
from omni_jax.train import loop

RUN = dict(steps=4, checkpoint_every=2, async_checkpointing=False)


def _truncate(path):
  text = path.read_text()
  path.write_text(text[:len(text) // 2])


def test_a_truncated_step_config_is_skipped_and_the_run_resumes_from_the_previous_step(tmp_path, caplog):
  workdir = tmp_path / "run"
  loop.run(lib.config(**RUN), str(workdir))
  step2, step4 = workdir / "checkpoints" / "2", workdir / "checkpoints" / "4"
  # A hand edit that stays valid JSON (eos ids set before an export, say) leaves the step intact.
  edited = json.loads((step2 / "config" / "config.json").read_text())
  edited["note"] = "edited by hand"
  (step2 / "config" / "config.json").write_text(json.dumps(edited, indent=1))
  assert checkpoint.step_problem(str(step2), ("params", "train", "data")) is None
  _truncate(step4 / "config" / "config.json")
  problem = checkpoint.step_problem(str(step4), ("params",))
  assert problem and problem.startswith("config/config.json is unreadable"), problem
  assert checkpoint.params_dir(str(workdir)) == str(step2)  # eval.py, generate.py and convert alike
  with caplog.at_level(logging.INFO):
    loop.run(lib.config(**dict(RUN, steps=6)), str(workdir))
  skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped checkpoint")]
  assert len(skips) == 1 and "/checkpoints/4 (config/config.json is unreadable" in skips[0], skips
  assert "resuming from step 2" in skips[0]
  assert sorted(lib.jsonl_losses(workdir))[-2:] == [5, 6]
  assert os.path.isdir(str(step4) + ".damaged")
  # The step written again by the resumed run is whole, its config with it.
  assert checkpoint.step_problem(str(step4), ("params", "train", "data")) is None


def test_an_unreadable_config_json_is_one_checkpoint_error(tmp_path):
  (tmp_path / "config.json").write_text('{"model": {"thinker"')
  with pytest.raises(checkpoint.CheckpointError, match=r"config\.json is unreadable \(JSONDecodeError"):
    checkpoint.load_config(str(tmp_path))

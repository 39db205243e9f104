"""The README's main job learns: configs/demo.py trained for its steps on the demo corpus, evaluated before the
first step (untrained) and at the end. The held-out loss of every modality it trains falls; the held-out
spoken digits (2 voices never heard in training) go from chance (10%) to clearly better. The run trains the
Thinker (no speech codes given); the main job also trains the Talker on the spoken replies (README figures)."""

import json
import os
import subprocess
import sys

import pytest

from configs import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory, demo_dir):
  """{step: eval scalars} of the main job's training (train.py as run.sh runs it: one CPU device, the
  config's steps), evaluated at step 0 (untrained) and at the end."""
  work = tmp_path_factory.mktemp("demo_learns") / "work"
  steps = demo.get_config().train.steps
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = [sys.executable, "train.py", "--config", "configs/demo.py", f"--config.data.demo_dir={demo_dir}",
         "--workdir", str(work), f"--config.train.eval_every={steps}", f"--config.train.checkpoint_every={steps}",
         "--config.eval.train_tasks=loss,asr", f"--config.eval.files.asr={demo_dir}/tasks/asr/digits.jsonl",
         "--config.eval.max_new_tokens.asr=4"]  # a digit and the end of turn
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
  evals = {r["step"]: r for r in rows if "eval/loss" in r}
  assert sorted(evals) == [0, steps]
  return evals[0], evals[steps]


@pytest.mark.slow
def test_held_out_loss_falls_on_every_trained_modality(evaluations):
  before, after = evaluations
  modalities = [k[len("eval/loss_"):] for k in before if k.startswith("eval/loss_")]
  assert set(modalities) >= {"text", "image", "audio", "video"}
  for m in modalities:
    assert after[f"eval/loss_{m}"] < before[f"eval/loss_{m}"] - 1.0, m
  # Every dataset was scored on the same records at both evaluations.
  assert {k: v for k, v in before.items() if k.startswith("eval/samples/")} == {
      k: v for k, v in after.items() if k.startswith("eval/samples/")}


@pytest.mark.slow
def test_held_out_digits_go_from_chance_to_clearly_better(evaluations):
  before, after = evaluations
  digits_before, digits_after = before["eval/asr/digits/accuracy"], after["eval/asr/digits/accuracy"]
  assert digits_before <= 0.2  # an untrained model: at most chance (10%)
  # Clearly better than chance on 40 held-out clips: >= 30% is 12 or more right where chance gives 4 +- 1.9.
  # Measured: 50-55% at step 200 on earlier commits, 42.5% in the fresh-clone CI run of 2026-12-01 after the
  # data pipeline stopped building Talker rows for runs that do not train the Talker (other batches).
  assert digits_after >= 0.3 and digits_after >= digits_before + 0.25

"""The README's main job learns: configs/demo.py trained for its steps on the demo corpus, evaluated before the
first step (untrained) and at the end. The held-out loss of every modality it trains falls, and the held-out
spoken digits (2 voices never heard in training) go from an untrained model's 0% well past chance (10%)."""

import json
import os
import subprocess
import sys

import pytest

from configs import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_the_demo_task_is_learned_within_the_main_jobs_steps(tmp_path, demo_dir):
  # train.py as the main job runs it: one CPU device (not the 8 test devices), its config's steps.
  steps = demo.get_config().train.steps
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = [sys.executable, "train.py", "--config", "configs/demo.py", f"--config.data.demo_dir={demo_dir}",
         "--workdir", str(tmp_path / "work"), f"--config.train.eval_every={steps}",  # evaluations at 0 and the end
         f"--config.train.checkpoint_every={steps}", "--config.eval.train_tasks=loss,asr",
         f"--config.eval.files.asr={demo_dir}/tasks/asr/digits.jsonl",
         "--config.eval.max_new_tokens.asr=4"]  # a digit and the end of turn
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
  assert out.returncode == 0, out.stderr[-3000:]

  rows = [json.loads(line) for line in open(tmp_path / "work" / "metrics.jsonl")]
  evals = {r["step"]: r for r in rows if "eval/loss" in r}
  assert sorted(evals) == [0, steps]
  before, after = evals[0], evals[steps]
  modalities = [k[len("eval/loss_"):] for k in before if k.startswith("eval/loss_")]
  assert set(modalities) >= {"text", "image", "audio", "video"}
  for m in modalities:
    assert after[f"eval/loss_{m}"] < before[f"eval/loss_{m}"] - 1.0, m
  digits_before, digits_after = before["eval/asr/digits/accuracy"], after["eval/asr/digits/accuracy"]
  print(f"held-out digit accuracy {digits_before:.3f} -> {digits_after:.3f}; loss " + ", ".join(
      f"{m} {before[f'eval/loss_{m}']:.2f} -> {after[f'eval/loss_{m}']:.2f}" for m in modalities))
  assert digits_before <= 0.2  # an untrained model: at most chance (10%)
  assert digits_after >= 0.5 and digits_after >= digits_before + 0.3

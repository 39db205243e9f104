"""The README's main job learns: configs/demo.py trained for its steps on the demo corpus, evaluated before the
first step (untrained) and at the end. The held-out loss of every modality it trains falls, and the held-out
spoken digits (2 voices never heard in training) go from an untrained model's 0% well past chance (10%)."""

import json

import pytest

from configs import demo
from omni_jax.train import loop


@pytest.mark.slow
def test_the_demo_task_is_learned_within_the_main_jobs_steps(tmp_path, demo_dir):
  c = demo.get_config()
  c.data.demo_dir = demo_dir
  c.mesh = {"data": 1}  # the main job's layout (one CPU device), not the 8 test devices
  c.data.worker_count = 0
  steps = c.train.steps
  c.train.eval_every = c.train.checkpoint_every = steps  # evaluations at 0 and at the end only
  c.eval.train_tasks = "loss,asr"
  c.eval.files.asr = f"{demo_dir}/tasks/asr/digits.jsonl"
  c.eval.max_new_tokens.asr = 4  # a digit and the end of turn
  loop.run(c, str(tmp_path / "work"))

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
  assert digits_before <= 0.2  # an untrained model: at most chance
  assert digits_after >= 0.5 and digits_after >= digits_before + 0.3

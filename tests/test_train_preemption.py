"""SIGTERM: the run saves at the next step boundary, exits with status 0, and the checkpoint resumes."""

import re
import signal

import pytest

import train_testlib as lib
from omni_jax import checkpoint
from omni_jax.train import loop

STEPS = 30


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_the_checkpoint_resumes(tmp_path):
  workdir = tmp_path / "run"
  run = dict(steps=STEPS, checkpoint_every=0)
  proc = lib.launch(workdir, **run)
  assert lib.wait_for_step(workdir, 3, proc), lib.log_text(workdir)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, lib.log_text(workdir)
  saved = checkpoint.TrainCheckpointer(str(workdir / "checkpoints")).latest_step()
  assert saved is not None and 3 <= saved < STEPS, saved
  # Between steps "preempted: saved step N"; during the wait for the next batch "... saving step N".
  assert re.search(rf"preempted(: saved| while waiting for data: saving) step {saved}\b", lib.log_text(workdir))
  assert max(lib.jsonl_losses(workdir)) == saved  # it stopped right after the step it saved
  loop.run(lib.config(**run), str(workdir))  # resumes from the saved step
  losses = lib.jsonl_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert checkpoint.TrainCheckpointer(str(workdir / "checkpoints")).latest_step() == STEPS

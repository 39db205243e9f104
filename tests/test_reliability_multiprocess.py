"""Issue 14, points 6 and 7: preemption of a multi-process run, and resuming on another number of processes.

- SIGTERM on one process of a two-process run (jax.distributed on localhost): both processes save the same
  step and exit with status 0.
- That checkpoint resumes on one process: the model, and the synthetic source's data position (a global batch
  index), continue exactly, so the losses equal an uninterrupted one-process run's.
- A data state that is per process (the grain pipeline's) cannot be carried to another process count: the run
  says so in one warning and the stream starts again.
- Kill -9 soak: a run killed at random points (during steps, asynchronous saves and evaluations) and restarted
  each time ends with exactly the losses of an uninterrupted run.
"""

import json
import logging
import os
import random
import re
import signal
import socket
import time

import pytest

import train_testlib as lib
import xla_env
from omni_jax import checkpoint
from omni_jax.checkpoint import handlers
from omni_jax.train import loop


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_on_one_process_saves_the_same_step_everywhere_and_resumes_on_one_process(tmp_path):
  workdir = tmp_path / "two"
  address = f"localhost:{_free_port()}"
  # A constant learning rate after warmup: the schedule does not depend on config.train.steps, so the
  # preempted run, its resume and the reference (each with its own step count) train alike.
  run = dict(steps=200, checkpoint_every=0, end_lr_factor=1.0)
  procs = []
  for pid in range(2):
    env = xla_env.env(4, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                      JAX_PROCESS_ID=str(pid))
    procs.append(lib.launch(workdir, env=env, log_as=tmp_path / f"process{pid}", **run))
  try:
    assert lib.wait_for_step(workdir, 3, procs[0], timeout=300), lib.log_text(tmp_path / "process0")
    procs[1].send_signal(signal.SIGTERM)  # not the coordinator: the others learn of it through jax
    codes = [p.wait(timeout=180) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  logs = [lib.log_text(tmp_path / f"process{pid}") for pid in range(2)]
  assert codes == [0, 0], logs
  saved = [int(re.search(r"preempted: saved step (\d+) to", text).group(1)) for text in logs]
  assert saved[0] == saved[1], saved
  step = saved[0]
  assert 3 <= step < run["steps"]
  assert checkpoint.TrainCheckpointer(str(workdir / "checkpoints")).latest_step() == step
  assert sorted(os.listdir(workdir / "checkpoints" / str(step) / "data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  assert max(lib.jsonl_losses(workdir)) == step  # it stopped right after the step it saved
  assert not os.path.exists(workdir / "lock")

  # Resume on one process (8 devices, the same global mesh): the run goes on where it stopped, exactly.
  more = step + 3
  loop.run(lib.config(steps=more, end_lr_factor=1.0), str(workdir))
  reference = tmp_path / "one"
  loop.run(lib.config(steps=more, end_lr_factor=1.0), str(reference))
  losses, expected = lib.jsonl_losses(workdir), lib.jsonl_losses(reference)
  assert sorted(losses) == sorted(expected) == list(range(1, more + 1))
  for s in expected:
    assert abs(losses[s] - expected[s]) <= 1e-5 * abs(expected[s]), (s, losses, expected)


class _PerProcessState:
  """A data iterator whose state is its own process's position (like the grain pipeline's)."""

  def __init__(self):
    self.state = {"position": 0}

  def get_state(self):
    return dict(self.state)

  def set_state(self, state):
    self.state = dict(state)


class _GlobalState(_PerProcessState):
  state_fits_any_process_count = True


def _saved_by_two(tmp_path):
  d = tmp_path / "data"
  d.mkdir()
  for pid, position in enumerate((7, 9)):
    (d / f"process_{pid}-of-2.json").write_text(json.dumps({"position": position}))
  return d


def test_a_per_process_data_state_restarts_with_a_warning_on_another_process_count(tmp_path, caplog):
  d = _saved_by_two(tmp_path)
  item = _PerProcessState()
  with caplog.at_level(logging.WARNING, logger="omni_jax.checkpoint.handlers"):
    handlers.IteratorHandler().restore(d, handlers.IteratorRestore(item))
  assert item.state == {"position": 0}  # starts again
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  assert (f"{d}: the data position was saved by 2 processes and this run has 1; it cannot be carried over, so "
          "the data stream starts again from its beginning") in warnings[0]


def test_a_global_data_state_continues_on_another_process_count(tmp_path, caplog):
  item = _GlobalState()
  with caplog.at_level(logging.WARNING, logger="omni_jax.checkpoint.handlers"):
    handlers.IteratorHandler().restore(_saved_by_two(tmp_path), handlers.IteratorRestore(item))
  assert item.state == {"position": 7} and not caplog.records


def test_no_data_state_at_all_is_still_an_error(tmp_path):
  (tmp_path / "data").mkdir()
  with pytest.raises(FileNotFoundError, match="no iterator state for this process"):
    handlers.IteratorHandler().restore(tmp_path / "data", handlers.IteratorRestore(_PerProcessState()))


SOAK = dict(steps=14, checkpoint_every=2, eval_every=3, async_checkpointing=True)


@pytest.mark.slow
def test_kill_9_at_random_points_then_restart_reproduces_the_uninterrupted_losses(tmp_path):
  reference = tmp_path / "reference"
  loop.run(lib.config(**SOAK), str(reference), lib.hooks())
  expected = lib.jsonl_losses(reference)
  assert sorted(expected) == list(range(1, SOAK["steps"] + 1))

  workdir = tmp_path / "run"
  kills = []
  for seed in range(3):
    rng = random.Random(seed)
    start = max(lib.jsonl_losses(workdir), default=0) if (workdir / "metrics.jsonl").exists() else 0
    target = min(start + rng.randint(1, 4), SOAK["steps"] - 1)
    proc = lib.launch(workdir, log_as=tmp_path / f"run{seed}", **SOAK)
    try:
      reached = lib.wait_for_step(workdir, target, proc, timeout=300)
      time.sleep(rng.uniform(0.0, 0.4))  # somewhere in the next step, save or evaluation
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    assert reached, lib.log_text(tmp_path / f"run{seed}")
    kills.append(max(lib.jsonl_losses(workdir)))
  loop.run(lib.config(**SOAK), str(workdir), lib.hooks())  # the last restart runs to the end
  losses = lib.jsonl_losses(workdir)
  assert sorted(losses) == list(range(1, SOAK["steps"] + 1)), kills
  for step in expected:
    assert losses[step] == expected[step], (step, losses[step], expected[step], kills)  # exactly
  assert checkpoint.TrainCheckpointer(str(workdir / "checkpoints")).latest_step() == SOAK["steps"]

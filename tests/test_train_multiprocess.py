"""Two processes x 4 CPU devices joined by jax.distributed train like one process x 8 devices."""

import os
import socket

import pytest

import train_testlib as lib
import xla_env
from omni_jax.train import loop

STEPS = 6


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  run = dict(steps=STEPS, checkpoint_every=3)
  loop.run(lib.config(**run), str(tmp_path / "one"))
  reference = lib.jsonl_losses(tmp_path / "one")

  workdir = tmp_path / "two"
  address = f"localhost:{_free_port()}"
  procs = []
  for pid in range(2):
    env = xla_env.env(4, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                      JAX_PROCESS_ID=str(pid))
    procs.append(lib.launch(workdir, env=env, log_as=tmp_path / f"process{pid}", **run))
  for pid, p in enumerate(procs):
    assert p.wait(timeout=400) == 0, lib.log_text(tmp_path / f"process{pid}")
  losses = lib.jsonl_losses(workdir)
  assert sorted(losses) == sorted(reference) == list(range(1, STEPS + 1))
  for step in reference:
    assert abs(losses[step] - reference[step]) <= 1e-5 * abs(reference[step]), (step, losses, reference)
  # Both processes wrote their data-iterator state into the shared checkpoint.
  data = workdir / "checkpoints" / str(STEPS) / "data"
  assert sorted(os.listdir(data)) == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

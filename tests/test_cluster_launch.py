"""Joining a multi-process run from a cluster manager's environment (omni_jax.distributed auto-detection)."""

import os
import socket

import pytest

import train_testlib as lib
import xla_env
from omni_jax import distributed
from omni_jax.train import loop

STEPS = 4
_JAX_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_PORT")


def _slurm_env(pid: int, ntasks: int, port: int) -> dict:
  """The variables srun sets for task `pid` of a one-node job step (jax derives the port from the job id)."""
  job_id = port - (65535 - 2 ** 12 + 1)
  return {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": str(ntasks),
          "SLURM_PROCID": str(pid), "SLURM_LOCALID": str(pid), "SLURM_STEP_NUM_NODES": "1", "SLURM_NNODES": "1"}


def _free_slurm_port() -> int:
  """A free port in the range jax picks SLURM coordinator ports from ([61440, 65535])."""
  for port in range(61440 + os.getpid() % 3000, 65536):
    with socket.socket() as s:
      try:
        s.bind(("localhost", port))
        return port
      except OSError:
        continue
  raise RuntimeError("no free port in [61440, 65535]")


@pytest.fixture
def recorded(monkeypatch):
  """jax.distributed.initialize replaced by a recorder (nothing joins)."""
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  for var in _JAX_VARS:
    monkeypatch.delenv(var, raising=False)
  return calls


def test_slurm_environment_is_detected(monkeypatch, recorded):
  for k, v in _slurm_env(1, 2, 62000).items():
    monkeypatch.setenv(k, v)
  assert distributed.detect_cluster() == ("slurm", 2)
  monkeypatch.setattr(distributed.jax, "process_index", lambda: 1)
  monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
  distributed.initialize()
  assert recorded == [dict(coordinator_address=None, process_id=None, cluster_detection_method=None)]


def test_explicit_settings_win_over_the_cluster(monkeypatch, recorded):
  for k, v in _slurm_env(1, 2, 62000).items():
    monkeypatch.setenv(k, v)
  monkeypatch.setattr(distributed.jax, "process_index", lambda: 0)
  monkeypatch.setattr(distributed.jax, "process_count", lambda: 4)
  distributed.initialize(num_processes=1)  # an explicit single process: SLURM's 2 tasks are ignored
  assert recorded == []
  distributed.initialize(coordinator_address="head:1234", num_processes=4, process_id=3)
  assert recorded == [dict(coordinator_address="head:1234", num_processes=4, process_id=3)]
  recorded.clear()
  distributed.initialize(coordinator_address="head:1234")  # address given, count and id from SLURM
  assert recorded == [dict(coordinator_address="head:1234", process_id=None, cluster_detection_method=None)]
  recorded.clear()
  distributed.initialize(cluster_detection="none")
  assert recorded == []


def test_no_cluster_is_one_process(monkeypatch, recorded):
  for k in _slurm_env(0, 1, 62000):
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setenv("SLURM_JOB_ID", "7")  # an allocation without a job step (no srun) is not a cluster run
  distributed.initialize()
  assert recorded == []
  with pytest.raises(ValueError, match="--cluster_detection=slurm"):
    distributed.initialize(cluster_detection="slurm")


@pytest.mark.slow
def test_two_slurm_tasks_train_like_one_process(tmp_path):
  run = dict(steps=STEPS)
  loop.run(lib.config(**run), str(tmp_path / "one"))  # this process: 8 CPU devices (conftest)
  reference = lib.jsonl_losses(tmp_path / "one")

  workdir = tmp_path / "two"
  port = _free_slurm_port()
  base = {k: v for k, v in os.environ.items() if k not in _JAX_VARS and not k.startswith("SLURM_")}
  procs = []
  for pid in range(2):
    env = xla_env.env(4, base, JAX_PLATFORMS="cpu", **_slurm_env(pid, 2, port))
    procs.append(lib.launch(workdir, env=env, log_as=tmp_path / f"task{pid}", **run))
  for pid, p in enumerate(procs):
    assert p.wait(timeout=400) == 0, lib.log_text(tmp_path / f"task{pid}")
  assert "joined via slurm (detected)" in lib.log_text(tmp_path / "task1")
  losses = lib.jsonl_losses(workdir)
  assert sorted(losses) == sorted(reference) == list(range(1, STEPS + 1))
  for step in reference:
    assert abs(losses[step] - reference[step]) <= 1e-5 * abs(reference[step]), (step, losses, reference)


def test_launch_examples_are_well_formed():
  """The examples under launch/ parse (bash -n, YAML) and name configs and train.py flags that exist."""
  import re
  import subprocess

  import yaml

  launch = os.path.join(lib.ROOT, "launch")
  scripts = sorted(f for f in os.listdir(launch) if f.endswith((".sh", ".sbatch")))
  assert {"slurm_gpu.sbatch", "tpu_vm.sh", "xpk.sh"} <= set(scripts)
  for name in scripts:
    text = open(os.path.join(launch, name)).read()
    assert subprocess.run(["bash", "-n", os.path.join(launch, name)]).returncode == 0, name
    assert "train.py" in text
    for config in re.findall(r"configs/[\w/]+\.py", text):
      assert os.path.exists(os.path.join(lib.ROOT, config)), (name, config)
  jobset = yaml.safe_load(open(os.path.join(launch, "gke_jobset.yaml")))
  command = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["command"]
  assert command[:2] == ["python", "train.py"] and os.path.exists(os.path.join(lib.ROOT, command[3]))
  assert "#SBATCH --ntasks-per-node" in open(os.path.join(launch, "slurm_gpu.sbatch")).read()

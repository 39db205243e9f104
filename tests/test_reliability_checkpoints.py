"""Fault injection on checkpoints and workdirs (issue 14, points 3 and 4): a damaged latest step falls back to
the newest intact one, a real mismatch names the parameter and both shapes, a locked workdir keeps a second
run out, a stale lock is taken over, and a failing resume leaves the workdir's configs as they were."""

import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import train_testlib as lib
import xla_env
from omni_jax import checkpoint
from omni_jax.train import loop
from omni_jax.train import workdir as workdir_lib

RUN = dict(steps=6, checkpoint_every=3, async_checkpointing=False)
# The runs here train on one host device (in this process and in train.py's): what they check is what happens to
# checkpoints and workdirs, which no mesh changes.


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A workdir with checkpoints 3 and 6 (trained in this process)."""
  workdir = tmp_path_factory.mktemp("base") / "run"
  loop.run(lib.config(**RUN), str(workdir), devices=lib.one_device())
  assert sorted(lib.jsonl_losses(workdir)) == list(range(1, 7))
  assert not os.path.exists(workdir / "lock")  # released at the end
  return workdir


def _copy(base, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(base, workdir)
  return workdir


def _truncate_array_files(step):
  files = glob.glob(str(step / "params" / "d" / "*"))
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)


def _delete_array_file(step):
  os.remove(sorted(glob.glob(str(step / "params" / "d" / "*")))[0])


def _empty(step):
  shutil.rmtree(step)
  os.makedirs(step)


DAMAGE = dict(
    truncated_array_file=(_truncate_array_files, "truncated"),
    missing_array_file=(_delete_array_file, "is missing"),
    missing_item=(lambda step: shutil.rmtree(step / "train"), "train/"),
    missing_manifest=(lambda step: os.remove(step / "params" / "manifest.ocdbt"), "manifest.ocdbt"),
    missing_metadata=(lambda step: os.remove(step / "params" / "_METADATA"), "_METADATA"),
    empty_step_dir=(_empty, "empty"),
)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_step_is_skipped_and_the_run_resumes_from_the_previous_one(base, tmp_path, caplog,
                                                                                     damage):
  workdir = _copy(base, tmp_path)
  hurt, reason = DAMAGE[damage]
  hurt(workdir / "checkpoints" / "6")
  assert checkpoint.params_dir(str(workdir)) == str(workdir / "checkpoints" / "3")  # eval.py / convert alike
  with caplog.at_level(logging.INFO):
    loop.run(lib.config(**dict(RUN, steps=9)), str(workdir), devices=lib.one_device())
  assert any(r.getMessage().startswith("mesh {'data': 1,") and " over 1 devices " in r.getMessage()
             for r in caplog.records)  # the devices it was given, not the process's 8
  skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped checkpoint")]
  assert len(skips) == 1 and "/checkpoints/6 (" in skips[0] and reason in skips[0], skips
  assert "resuming from step 3" in skips[0]
  assert any(r.getMessage().endswith("resumed from %s/3" % (workdir / "checkpoints")) for r in caplog.records)
  assert os.path.isdir(workdir / "checkpoints" / "6.damaged")  # kept for inspection, out of the way
  ckpt = checkpoint.TrainCheckpointer(str(workdir / "checkpoints"))
  assert ckpt.all_steps() == [6, 9]  # step 6 written again by the resumed run (tiny.py keeps the latest 2)
  ckpt.close()
  assert checkpoint.step_problem(str(workdir / "checkpoints" / "6"), ("params", "train", "data")) is None


def test_the_cli_resumes_past_a_truncated_step_with_one_log_line(base, tmp_path):
  workdir = _copy(base, tmp_path)
  _truncate_array_files(workdir / "checkpoints" / "6")
  proc = lib.launch(workdir, env=xla_env.env(1), **dict(RUN, steps=7))
  assert proc.wait(timeout=300) == 0, lib.log_text(workdir)
  text = lib.log_text(workdir)
  assert "Traceback" not in text
  skips = [line for line in text.splitlines() if "skipped checkpoint" in line]
  assert len(skips) == 1 and "checkpoints/6 (" in skips[0] and "truncated" in skips[0], text
  assert 7 in lib.jsonl_losses(workdir)


def test_params_dir_and_find_config_take_the_newest_intact_step_and_its_own_config(base, tmp_path):
  workdir = _copy(base, tmp_path)
  step6, step3 = workdir / "checkpoints" / "6", workdir / "checkpoints" / "3"
  assert checkpoint.find_config(str(step6)) == str(step6 / "config")  # the step's own config first
  assert checkpoint.load_config(str(step6 / "config")).to_json() == checkpoint.load_config(str(workdir)).to_json()
  _delete_array_file(step6)
  assert checkpoint.params_dir(str(workdir)) == str(step3)
  _empty(step3)
  with pytest.raises(checkpoint.CheckpointError, match=r"no intact checkpoint \(6: .*is missing; 3: .*empty\)"):
    checkpoint.params_dir(str(workdir))
  # eval.py turns it into one line
  out = subprocess.run([sys.executable, os.path.join(lib.ROOT, "eval.py"), "--checkpoint", str(workdir),
                        *lib.flags()], cwd=lib.ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: "), out.stderr
  assert "no intact checkpoint" in out.stderr and "Traceback" not in out.stderr


def test_a_real_shape_mismatch_names_the_parameter_and_both_shapes_and_changes_no_config(base, tmp_path):
  workdir = _copy(base, tmp_path)
  before = {p: open(p).read() for p in [str(workdir / "config.json"),
                                         *glob.glob(str(workdir / "checkpoints" / "*" / "config" / "config.json"))]}
  assert len(before) == 3
  proc = lib.launch(workdir, env=xla_env.env(1), extra=["--config.model.thinker.text.vocab_size=320"],
                    **dict(RUN, steps=9))
  assert proc.wait(timeout=300) == 2  # a user error
  text = lib.log_text(workdir)
  last = text.strip().splitlines()[-1]
  assert "Traceback" not in text
  assert last.startswith("error: ") and "/checkpoints/6 does not fit this config: params." in last, text
  assert "params.thinker.lm_head.kernel has shape (64, 256) in the checkpoint, (64, 320) in this config" in last
  assert {p: open(p).read() for p in before} == before  # WORKDIR/config.json and the steps' configs unchanged
  assert not os.path.exists(workdir / "lock")
  assert not glob.glob(str(workdir / "checkpoints" / "*.damaged"))  # a mismatch is not damage


def test_a_second_run_on_a_locked_workdir_exits_at_once_and_the_first_is_unaffected(tmp_path):
  workdir = tmp_path / "run"
  first = lib.launch(workdir, env=xla_env.env(1), log_as=tmp_path / "first", steps=10_000, checkpoint_every=0)
  try:
    assert lib.wait_for_step(workdir, 2, first), lib.log_text(tmp_path / "first")
    holder = json.loads((workdir / "lock").read_text())
    assert holder == dict(pid=first.pid, host=socket.gethostname())
    started = time.time()
    second = lib.launch(workdir, env=xla_env.env(1), log_as=tmp_path / "second", steps=10_000, checkpoint_every=0)
    assert second.wait(timeout=120) == 2  # a user error
    text = lib.log_text(tmp_path / "second")
    last = text.strip().splitlines()[-1]
    assert last == (f"error: workdir {workdir} is in use by another run (pid {first.pid} on host "
                    f"{socket.gethostname()}, see {workdir}/lock); wait for it to end or pick another --workdir. "
                    f"If that run is dead, delete the lock file."), text
    assert "Traceback" not in text and time.time() - started < 120
    assert first.poll() is None  # still training
    assert json.loads((workdir / "lock").read_text()) == holder
    at = max(lib.jsonl_losses(workdir))
    assert lib.wait_for_step(workdir, at + 2, first)
  finally:
    first.send_signal(signal.SIGTERM)
    code = first.wait(timeout=300)
  assert code == 0, lib.log_text(tmp_path / "first")
  assert not os.path.exists(workdir / "lock")
  steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl") if "train/loss" in line]
  assert steps == list(range(1, len(steps) + 1))  # one run's metrics, no interleaving
  assert checkpoint.params_dir(str(workdir)).endswith(f"/checkpoints/{steps[-1]}")


def test_a_stale_lock_of_a_killed_run_is_taken_over(base, tmp_path, caplog):
  workdir = _copy(base, tmp_path)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (workdir / "lock").write_text(json.dumps(dict(pid=dead.pid, host=socket.gethostname())))
  with caplog.at_level(logging.WARNING):
    loop.run(lib.config(**dict(RUN, steps=7)), str(workdir), devices=lib.one_device())
  assert any("taking over the stale lock of process %d" % dead.pid in r.getMessage() for r in caplog.records)
  assert 7 in lib.jsonl_losses(workdir) and not os.path.exists(workdir / "lock")


def test_a_live_or_foreign_lock_is_never_taken_over(tmp_path):
  (tmp_path / "lock").write_text(json.dumps(dict(pid=os.getpid(), host=socket.gethostname())))
  with pytest.raises(workdir_lib.WorkdirLocked, match=f"pid {os.getpid()} on host"):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  (tmp_path / "lock").write_text(json.dumps(dict(pid=1 << 30, host="elsewhere")))  # no such pid here
  with pytest.raises(workdir_lib.WorkdirLocked, match="pid 1073741824 on host elsewhere"):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  os.remove(tmp_path / "lock")
  with workdir_lib.WorkdirLock(str(tmp_path)):
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
  assert not os.path.exists(tmp_path / "lock")

"""The training loop end to end: SIGKILL + restart resumes exactly; a NaN loss stops the run."""

import os
import signal

import jax
import numpy as np
import pytest

import train_testlib as lib
from omni_jax import checkpoint
from omni_jax.train import loop

STEPS = 24
RUN = dict(steps=STEPS, checkpoint_every=3, async_checkpointing=False)  # synchronous saves slow the run down


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Losses of an uninterrupted run (in this process: the same program on the same 8 devices)."""
  workdir = tmp_path_factory.mktemp("reference")
  loop.run(lib.config(**dict(RUN, checkpoint_every=0)), str(workdir))  # checkpoints do not change losses
  losses = lib.jsonl_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return losses


@pytest.mark.slow
def test_sigkill_then_restart_continues_the_same_loss_sequence(reference, tmp_path):
  workdir = tmp_path / "run"
  proc = lib.launch(workdir, **RUN)
  assert lib.wait_for_step(workdir, 8, proc), lib.log_text(workdir)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(lib.jsonl_losses(workdir))
  resume = checkpoint.TrainCheckpointer(str(workdir / "checkpoints")).latest_step()
  assert resume is not None and resume < STEPS and killed_at < STEPS, "the run ended before it was killed"
  loop.run(lib.config(**RUN), str(workdir))  # same workdir: resumes from `resume`
  losses = lib.jsonl_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  for step in range(resume + 1, STEPS + 1):
    assert losses[step] == reference[step], (step, losses[step], reference[step])  # exactly


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  c = lib.config(steps=12, checkpoint_every=3, debug_nan_at_step=8)
  with pytest.raises(loop.NonFiniteLoss, match=r"step 8: loss=nan .* latest checkpoint is .*/checkpoints/6"):
    loop.run(c, str(tmp_path))
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path / "checkpoints"))
  assert ckpt.all_steps() == [3, 6]  # nothing from step 8 (or 9, dispatched before the check) was written
  ckpt.close()
  params = checkpoint.restore_pure(str(tmp_path / "checkpoints" / "6"), jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lib.setup_of(c, lib.mesh_of(dict(data=8)))[0].abstract_params))
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(params))
  assert "train/loss" in open(os.path.join(tmp_path, "metrics.jsonl")).readline()

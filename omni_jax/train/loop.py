"""The training loop, meant to be read top to bottom (and forked for a project that needs more).

  run(config, workdir):
    mesh -> train-state setup -> data -> state (resume > init_from > fresh) -> jitted step
    for each step: batch -> step -> (one step later) check + log metrics -> eval -> checkpoint
    SIGTERM: save at the next step boundary and return. Non-finite loss: stop, never save that state.

Metrics of step s are read back while step s+1 runs, so the host never stalls the device except to
save a checkpoint (whose step's loss is checked first) or to evaluate.
"""

import logging
import os
import signal
import time
from typing import Optional

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from omni_jax import checkpoint
from omni_jax import config as config_lib
from omni_jax import sharding, towers
from omni_jax.evaluate import loss as eval_lib
from omni_jax.train import data as data_lib
from omni_jax.train import metrics as metrics_lib
from omni_jax.train import state as state_lib
from omni_jax.train import step as step_lib

log = logging.getLogger(__name__)


class NonFiniteLoss(FloatingPointError):
  """A step produced a NaN/Inf loss or gradient; the run stops without saving that state."""


class _Preemption:
  """Whether this run was asked to stop (SIGTERM); across processes, jax's preemption sync point."""

  def __init__(self):
    self.requested = False
    self.multi = jax.process_count() > 1
    self._previous = None
    if not self.multi:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def reached(self, step: int) -> bool:
    if self.multi:
      from jax.experimental import multihost_utils  # local: multi-process runs only

      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _initial_state(setup: state_lib.Setup, ckpt: checkpoint.TrainCheckpointer, init_from: Optional[str],
                   data) -> state_lib.TrainState:
  """Resume from the workdir's newest intact checkpoint (damaged ones are skipped with a warning and moved
  aside), else start from init_from's parameters, else from scratch."""
  target = setup.abstract_with_shardings()
  resumed = ckpt.restore_newest_intact(target.params, dict(step=target.step, opt_state=target.opt_state,
                                                           rng=target.rng), data)
  if resumed is not None:
    step, params, train = resumed
    log.info("resumed from %s/%d", ckpt.directory, step)
    return state_lib.TrainState(params=params, **train)
  if init_from:
    path = checkpoint.params_dir(init_from)
    params = checkpoint.restore_pure(path, setup.abstract_with_shardings().params)
    log.info("initialised parameters from %s", path)
    return setup.init(params)
  return setup.init()


def _check_finite(step: int, m: dict, ckpt: checkpoint.TrainCheckpointer) -> None:
  if np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]):
    return
  ckpt.wait()  # let a save in flight finish: it holds the last good state
  last = ckpt.latest_step()
  where = f"{ckpt.directory}/{last}" if last is not None else "none was written"
  raise NonFiniteLoss(f"step {step}: loss={m['loss']} grad_norm={m['grad_norm']} is not finite; stopping. "
                      f"No checkpoint was written from this state; the latest checkpoint is {where}.")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train config.train.steps steps in workdir (resuming if it holds checkpoints). Returns the last metrics.

  The workdir is locked (WORKDIR/lock) for the run: a second run on it raises checkpoint.WorkdirLocked."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  lock = checkpoint.WorkdirLock(workdir)
  if jax.process_index() == 0:
    lock.acquire()
  try:
    return _run(config, workdir)
  finally:
    lock.release()


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  if config.get("init_from"):
    config = checkpoint.adopt_model_config(config, checkpoint.params_dir(config.init_from))
  towers.validate(config)
  t = config.train
  primary = jax.process_index() == 0

  # Devices and the train state's layout.
  mesh = sharding.make_mesh(config.mesh)
  rules = config.sharding_rules
  setup = state_lib.Setup(config, mesh)
  log.info("mesh %s over %d devices (%d processes); %.2f M parameters, %.2f M trainable",
           dict(mesh.shape), mesh.size, jax.process_count(), setup.num_params() / 1e6,
           setup.num_params(trainable_only=True) / 1e6)

  # Data: this process builds only the rows its devices hold.
  rows = data_lib.process_rows(mesh, rules, t.batch_size, t.seq_len)
  train_data = data_lib.make_source(config, "train", t.batch_size, rows)

  # State: resume, or start.
  ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints,
                                      keep_every=t.keep_every, async_save=t.async_checkpointing, config=config)
  state = _initial_state(setup, ckpt, config.get("init_from"), train_data)
  if primary:  # only now: a resume that fails leaves the workdir's config.json as it was
    checkpoint.save_config(workdir, config)
  start = int(jax.device_get(state.step))

  train_step = step_lib.jit_train_step(setup)
  eval_step = eval_lib.jit_eval_step(setup.graphdef, mesh, rules, setup.param_shardings,
                                     list(towers.objective_weights(config)))
  eval_rows = data_lib.process_rows(mesh, rules, config.eval.batch_size, t.seq_len)

  def evaluate() -> dict:
    source = data_lib.make_source(config, config.eval.split, config.eval.batch_size, eval_rows)
    try:
      batches = (data_lib.to_global(next(source), mesh, rules, config.eval.batch_size)
                 for _ in range(config.eval.steps))
      return eval_lib.evaluate(eval_step, state.params, batches, prefix=config.eval.split)
    finally:
      data_lib.close(source)

  saved = [ckpt.latest_step()]

  def save(step: int) -> None:
    ckpt.save(step, state.params, dict(step=state.step, opt_state=state.opt_state, rng=state.rng), train_data)
    saved[0] = step

  writer = metrics_lib.Writer(workdir, enabled=primary)
  progress = metrics_lib.Progress(t.steps, start, enabled=primary)
  flops = metrics_lib.FlopCounter(config, setup.frozen, tuple(traverse_util.flatten_dict(setup.abstract_params)))
  throughput = metrics_lib.Throughput(mesh.size, metrics_lib.peak_flops(config))
  preemption = _Preemption()
  pending = None  # (step, device metrics, flops, real tokens) of the step in flight
  last: dict = {}

  def finish(step, m_dev, step_flops, tokens):
    """Read back one step's metrics (blocks until it is done), check them, log every log_every steps."""
    nonlocal last
    m = jax.tree.map(np.asarray, jax.device_get(m_dev))
    m["loss"], m["grad_norm"] = float(m["loss"]), float(m["grad_norm"])
    _check_finite(step, m, ckpt)
    throughput.step_done(tokens, step_flops)
    if step % t.log_every == 0 or step == t.steps:
      scalars = metrics_lib.summarize(m["objectives"], "train")
      if len(m["objectives"]) > 1:
        scalars["train/weighted_loss"] = m["loss"]  # what the optimizer minimises (config.train.objectives)
      scalars.update({"train/grad_norm": m["grad_norm"], "train/lr": float(m["lr"]), **throughput.report(),
                      **data_lib.counters(train_data)})
      writer.write(step, scalars)
      progress.update(step, m["loss"], scalars.get("perf/tokens_per_s", 0.0), scalars.get("perf/step_time", 0.0))
      last = scalars

  try:
    step = start
    for step in range(start + 1, t.steps + 1):
      try:
        host = next(train_data)
      except StopIteration:
        progress.write(f"the data ran out before step {step}; stopping")
        step -= 1
        break
      batch = data_lib.to_global(host, mesh, rules, t.batch_size)
      state, m_dev = train_step(state, batch)
      if pending is not None:
        finish(*pending)  # the previous step, read while this one runs
      scale = t.batch_size / len(host["input_ids"])  # this process's rows -> the global batch
      pending = (step, m_dev, flops.step_flops(host) * scale, float(np.sum(host["segment_ids"] > 0)) * scale)

      stop = preemption.reached(step)
      due_eval = t.eval_every and step % t.eval_every == 0
      due_save = stop or step == t.steps or (t.checkpoint_every and step % t.checkpoint_every == 0)
      if not (due_eval or due_save):
        continue
      finish(*pending)  # never evaluate or save a state whose step is unchecked
      pending = None
      paused_from = time.perf_counter()
      if due_eval:
        scalars = evaluate()
        writer.write(step, scalars)
        progress.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()
                                                    if k.split("/")[1] in ("loss", "ppl", "accuracy")))
        last = {**last, **scalars}
      if due_save:
        save(step)
      throughput.pause(time.perf_counter() - paused_from)
      if stop:
        progress.write(f"preempted: saved step {step} to {ckpt.directory}; exiting")
        break
    if pending is not None:
      finish(*pending)
    if saved[0] != step:
      save(step)
  finally:
    ckpt.close()  # waits for the last async save
    data_lib.close(train_data)
    progress.close()
    writer.close()
    preemption.close()
  return last

"""The training loop, meant to be read top to bottom (and forked for a project that needs more).

  run(config, workdir, hooks):
    hooks settle the config -> mesh -> train-state setup -> data -> hooks open -> state (resume > init_from >
    fresh) -> jitted step
    for each step: batch -> step -> (one step later) check + log metrics -> checkpoint -> due hooks
    SIGTERM: save at the next step boundary and return; while waiting for data, save the last step done.
    Non-finite loss: stop, never save that state.

The hooks are the caller's (levanter-style): train.py passes the evaluation (omni_jax.evaluate.hook) and the
Talker's speech-unit check, so this loop imports no evaluator and no tower.

Metrics of step s are read back while step s+1 runs, so the host never stalls the device except to
save a checkpoint (whose step's loss is checked first) or to run a hook.
"""

import dataclasses
import logging
import os
import signal
import sys
import time
from typing import Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from omni_jax import adapters, checkpoint
from omni_jax import sharding, towers
from omni_jax.errors import ConfigError, UserError
from omni_jax.layers import lora
from omni_jax.train import data as data_lib
from omni_jax.train import metrics as metrics_lib
from omni_jax.train import state as state_lib
from omni_jax.train import step as step_lib
from omni_jax.train.workdir import WorkdirLock

log = logging.getLogger(__name__)


class NonFiniteLoss(UserError, FloatingPointError):
  """A step produced a NaN/Inf loss or gradient; the run stops without saving that state."""


@dataclasses.dataclass(frozen=True)
class Run:
  """What a hook sees of its run (Hook.open)."""
  config: ml_collections.ConfigDict  # as the run trains it: adopted from init_from, settled, validated
  workdir: str
  mesh: jax.sharding.Mesh
  setup: state_lib.Setup  # the train state's layout: graphdef, parameter shardings


class Hook:
  """Work a run does besides its steps, given by the caller (train.py builds the list). A hook overrides what
  it needs; this base does nothing.

  every: call the hook every `every` steps (0: never), after that step's checkpoint is saved and never at a
  preemption's last step; at_start: also at step 0 of a fresh run. Both are read after open.
  """
  every: int = 0
  at_start: bool = False

  def settle(self, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Before anything is built: check the config against what the workdir holds, or fix a value it leaves open."""

  def open(self, run: Run) -> None:
    """Once the mesh, the state's layout and the training data exist; raising ends the run before any step."""

  def __call__(self, step: int, params) -> dict:
    """Scalars to log at `step`. A failure the run should survive is the hook's to catch and report."""
    return {}

  def close(self) -> None:
    """At the end of the run, however it ended (also after a failed open, or none)."""


class Settle(Hook):
  """A hook that only settles the config: fn(config, workdir) before anything is built."""

  def __init__(self, fn: Callable[[ml_collections.ConfigDict, str], object]):
    self.fn = fn

  def settle(self, config, workdir):
    self.fn(config, workdir)


class _PreemptedWhileWaiting(BaseException):
  """SIGTERM came while the loop waited for a batch (a BaseException: no `except Exception` swallows it)."""


def _packing():
  """omni_jax.input.packing if the run uses it (never imported here: the synthetic source needs no grain)."""
  return sys.modules.get("omni_jax.input.packing")


class _Frozen:
  """A data iterator's state taken earlier, for a checkpoint written after the iterator was interrupted."""

  def __init__(self, state):
    self._state = state

  def get_state(self):
    return self._state


class _Preemption:
  """Whether this run was asked to stop (SIGTERM); across processes, jax's preemption sync point.

  While the loop waits for a batch (`waiting`), a SIGTERM also interrupts the wait: in-process packers stop at
  their next record and the wait raises _PreemptedWhileWaiting, so a stream that gives no batch cannot hold
  the run past its preemption.
  """

  def __init__(self):
    self.requested = False
    self.waiting = False
    self.multi = jax.process_count() > 1
    self._previous = None
    if _packing() is not None:
      _packing().clear_interrupt()
    if not self.multi:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True
    if self.waiting:
      self.waiting = False
      if _packing() is not None:
        _packing().interrupt()
      raise _PreemptedWhileWaiting()

  def next_batch(self, data):
    """next(data), interruptible by SIGTERM (single-process runs)."""
    if self.requested and not self.multi:
      raise _PreemptedWhileWaiting()
    self.waiting = not self.multi
    try:
      return next(data)
    finally:
      self.waiting = False

  def reached(self, step: int) -> bool:
    if self.multi:
      from jax.experimental import multihost_utils  # local: multi-process runs only

      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self):
    self.waiting = False
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    if _packing() is not None:
      _packing().clear_interrupt()


def _external(setup: state_lib.Setup, init_from: Optional[str]) -> Optional[dict]:
  """The parameters a run never saves and reloads at each start (None: every parameter is saved): a LoRA run's
  frozen base (init_from's parameters, else a seeded random initialisation), or a full DPO run's reference
  (model.reference: copies of init_from's trained towers)."""
  if setup.reference:
    if not init_from:
      raise ConfigError("config.dpo without config.lora trains against a frozen copy of the starting weights: "
                        "set config.init_from (the checkpoint to tune)")
    target = setup.abstract_with_shardings().params["reference"]
    return {"reference": checkpoint.restore_pure(checkpoint.params_dir(init_from), target)}
  if setup.lora is None:
    return None
  if init_from:
    where = checkpoint.find_config(checkpoint.params_dir(init_from))
    if where is not None and checkpoint.load_config(where).get("lora") is not None:
      raise ConfigError(f"config.init_from={init_from}: a LoRA run's adapters, not a base. Merge them first "
                        f"(python -m omni_jax.convert --orbax_dir {init_from} --out_dir MERGED) and start from that")
    base = adapters.load_base(init_from, setup.abstract_params, setup.param_shardings)
    log.info("LoRA base: %s (%s)", checkpoint.params_dir(init_from), setup.lora.base_dtype)
    return base
  log.warning("config.lora without config.init_from: the adapters train over a randomly initialised base")
  return lora.without_adapters(setup.init().params)


def _saved(setup: state_lib.Setup, params: dict) -> dict:
  """What a checkpoint stores of the parameters: all but the external ones (_external)."""
  if setup.lora is not None:
    return lora.adapters(params)
  return {k: v for k, v in params.items() if k != "reference"}


def _initial_state(setup: state_lib.Setup, ckpt: checkpoint.TrainCheckpointer, init_from: Optional[str],
                   data, external: Optional[dict] = None) -> state_lib.TrainState:
  """Resume from the workdir's newest intact checkpoint (damaged ones are skipped with a warning and moved
  aside), else start from init_from's parameters, else from scratch. The `external` parameters (a LoRA run's
  base, a DPO run's reference) are never in a checkpoint: they are the ones given."""
  target = setup.abstract_with_shardings()
  resumed = ckpt.restore_newest_intact(_saved(setup, target.params), dict(
      step=target.step, opt_state=target.opt_state, rng=target.rng), data)
  if resumed is not None:
    step, params, train = resumed
    if setup.lora is not None:
      adapters.check_base(os.path.join(ckpt.directory, str(step)), adapters.fingerprint(external))
    if external is not None:
      params = state_lib.combine(external, params)
    log.info("resumed from %s/%d", ckpt.directory, step)
    return state_lib.TrainState(params=params, **train)
  if setup.lora is not None:
    return setup.init(state_lib.combine(external, adapters.init_adapters(setup.config, setup.param_shardings)))
  if init_from:
    path = checkpoint.params_dir(init_from)
    target = _saved(setup, setup.abstract_with_shardings().params)
    # A tower the checkpoint does not hold (a Talker added to a converted Thinker) starts from scratch.
    stored = {k.split(".")[0] for k in checkpoint.stored_tree(os.path.join(path, "params"))}
    absent = sorted(k for k in target if k not in stored)
    params = checkpoint.restore_pure(path, {k: v for k, v in target.items() if k not in absent})
    if absent:
      log.warning("%s holds no %s parameters: initialised from scratch", path, ", ".join(absent))
      params = {**params, **setup.init_params(only=absent)}
    log.info("initialised parameters from %s", path)
    return setup.init(params if external is None else state_lib.combine(external, params))
  return setup.init()


def _check_finite(step: int, m: dict, ckpt: checkpoint.TrainCheckpointer) -> None:
  if np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]):
    return
  ckpt.wait()  # let a save in flight finish: it holds the last good state
  last = ckpt.latest_step()
  where = f"{ckpt.directory}/{last}" if last is not None else "none was written"
  raise NonFiniteLoss(f"step {step}: loss={m['loss']} grad_norm={m['grad_norm']} is not finite; stopping. "
                      f"No checkpoint was written from this state; the latest checkpoint is {where}.")


def run(config: ml_collections.ConfigDict, workdir: str, hooks: Sequence[Hook] = (),
        devices: Optional[Sequence[jax.Device]] = None) -> dict:
  """Train config.train.steps steps in workdir (resuming if it holds checkpoints), running `hooks` (Hook) on
  the way, on config.mesh laid over `devices` (default: every device of every process). Returns the last metrics.

  The workdir is locked (WORKDIR/lock) for the run: a second run on it raises train.workdir.WorkdirLocked."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  lock = WorkdirLock(workdir)
  if jax.process_index() == 0:
    lock.acquire()
  try:
    return _run(config, workdir, hooks, devices)
  finally:
    lock.release()


def _close(hooks: Sequence[Hook]) -> None:
  for hook in hooks:
    hook.close()


def _run(config: ml_collections.ConfigDict, workdir: str, hooks: Sequence[Hook],
         devices: Optional[Sequence[jax.Device]]) -> dict:
  if config.get("init_from"):
    config = checkpoint.adopt_model_config(config, checkpoint.params_dir(config.init_from))
  towers.validate(config)
  for hook in hooks:
    hook.settle(config, workdir)
  t = config.train
  primary = jax.process_index() == 0

  # Devices and the train state's layout.
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = config.sharding_rules
  setup = state_lib.Setup(config, mesh)
  log.info("mesh %s over %d devices (%d processes); %.2f M parameters, %.2f M trainable",
           dict(mesh.shape), mesh.size, jax.process_count(), setup.num_params() / 1e6,
           setup.num_params(trainable_only=True) / 1e6)

  # The parameters no checkpoint holds (a LoRA run's base, a DPO run's reference): loaded first, so that a
  # missing base fails before any data opens. A LoRA run's checkpoints record its base's path and fingerprint.
  external = _external(setup, config.get("init_from"))
  if setup.lora is not None:
    config = adapters.record_base(config, config.get("init_from"), adapters.fingerprint(external))

  # Data: this process builds only the rows its devices hold.
  rows = data_lib.process_rows(mesh, rules, t.batch_size, t.seq_len)
  train_data = data_lib.make_source(config, "train", t.batch_size, rows)
  # The hooks open now, with the sources they read: a missing evaluation split fails before any training.
  try:
    for hook in hooks:
      hook.open(Run(config, workdir, mesh, setup))
  except BaseException:
    data_lib.close(train_data)
    _close(hooks)
    raise

  ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints,
                                      keep_every=t.keep_every, async_save=t.async_checkpointing, config=config)
  state = _initial_state(setup, ckpt, config.get("init_from"), train_data, external)
  del external  # the state holds it
  if primary:  # only now: a resume that fails leaves the workdir's config.json as it was
    checkpoint.save_config(workdir, config)
  start = int(jax.device_get(state.step))

  train_step = step_lib.jit_train_step(setup)

  saved = [ckpt.latest_step()]
  save_data = [train_data]  # what the checkpoint's data state comes from

  def save(step: int) -> None:
    ckpt.save(step, _saved(setup, state.params), dict(step=state.step, opt_state=state.opt_state, rng=state.rng), save_data[0])
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
      skipped = {k[len("data/skipped/"):]: v for k, v in scalars.items() if k.startswith("data/skipped/")}
      progress.update(step, m["loss"], scalars.get("perf/tokens_per_s", 0.0), scalars.get("perf/step_time", 0.0),
                      skipped)
      last = scalars

  def run_hooks(step: int, due: Sequence[Hook]) -> None:
    """Call the due hooks and log their scalars (the headline ones on the progress bar too)."""
    nonlocal last
    for hook in due:
      scalars = hook(step, state.params)
      if not scalars:
        continue
      writer.write(step, scalars)
      headline = [f"{k}={v:.4g}" for k, v in scalars.items()
                  if k.split("/")[-1] in ("loss", "ppl", "accuracy", "wer")]
      if headline:
        progress.write(f"step {step}: " + ", ".join(headline))
      last = {**last, **scalars}

  try:
    step = start
    if start == 0:
      run_hooks(0, [h for h in hooks if h.every and h.at_start])  # e.g. the untrained model's evaluation
    for step in range(start + 1, t.steps + 1):
      before = train_data.get_state()  # the data position of the last step done, if the wait is interrupted
      try:
        host = preemption.next_batch(train_data)
      except StopIteration:
        progress.write(f"the data ran out before step {step}; stopping")
        step -= 1
        break
      except _PreemptedWhileWaiting:
        step -= 1
        save_data[0] = _Frozen(before)
        progress.write(f"preempted while waiting for data: saving step {step} to {ckpt.directory}; exiting")
        break
      batch = data_lib.to_global(host, mesh, rules, t.batch_size)
      state, m_dev = train_step(state, batch)
      if pending is not None:
        finish(*pending)  # the previous step, read while this one runs
      scale = t.batch_size / len(host["input_ids"])  # this process's rows -> the global batch
      pending = (step, m_dev, flops.step_flops(host) * scale, float(np.sum(host["segment_ids"] > 0)) * scale)

      stop = preemption.reached(step)
      due = [h for h in hooks if h.every and step % h.every == 0]
      due_save = stop or step == t.steps or (t.checkpoint_every and step % t.checkpoint_every == 0)
      if not (due or due_save):
        continue
      finish(*pending)  # never hand a hook, or save, a state whose step is unchecked
      pending = None
      paused_from = time.perf_counter()
      if due_save:
        save(step)  # first: a save never waits on a hook (and an asynchronous one overlaps it)
      if due and not stop:
        run_hooks(step, due)
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
    _close(hooks)
    progress.close()
    writer.close()
    preemption.close()
  return last

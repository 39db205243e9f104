"""The training loop, meant to be read top to bottom (and forked for a project that needs more).

  run(config, workdir):
    mesh -> train-state setup -> data -> state (resume > init_from > fresh) -> jitted step
    for each step: batch -> step -> (one step later) check + log metrics -> checkpoint -> eval
    SIGTERM: save at the next step boundary and return; while waiting for data, save the last step done.
    Non-finite loss: stop, never save that state. A failing evaluation is logged and recorded; training goes on.

Metrics of step s are read back while step s+1 runs, so the host never stalls the device except to
save a checkpoint (whose step's loss is checked first) or to evaluate.
"""

import logging
import os
import json
import signal
import sys
import time
from typing import Optional

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from omni_jax import adapters, checkpoint
from omni_jax import sharding, towers
from omni_jax.config import ConfigError
from omni_jax.evaluate import loss as eval_lib
from omni_jax.layers import lora
from omni_jax.evaluate import run as eval_run
from omni_jax.evaluate.tasks import loss as loss_task
from omni_jax.talker import targets as talker_targets
from omni_jax.train import data as data_lib
from omni_jax.train import metrics as metrics_lib
from omni_jax.train import state as state_lib
from omni_jax.train import step as step_lib

log = logging.getLogger(__name__)


class NonFiniteLoss(FloatingPointError):
  """A step produced a NaN/Inf loss or gradient; the run stops without saving that state."""


class _PreemptedWhileWaiting(BaseException):
  """SIGTERM came while the loop waited for a batch (a BaseException: no `except Exception` swallows it)."""


def _packing():
  """omni_jax.input.packing if the run uses it (never imported here: the synthetic source needs no grain)."""
  return sys.modules.get("omni_jax.input.packing")


def _is_data_error(e: BaseException) -> bool:
  sources = sys.modules.get("omni_jax.input.sources")
  return sources is not None and isinstance(e, sources.DataError)


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
      fresh = setup.init().params
      params = {**params, **{k: fresh[k] for k in absent}}
    log.info("initialised parameters from %s", path)
    return setup.init(params if external is None else state_lib.combine(external, params))
  return setup.init()


def _open_eval(config: ml_collections.ConfigDict, rows: tuple[int, int]):
  """The evaluation source; a data error says that it is the evaluation's (config.train.eval_every)."""
  try:
    return data_lib.make_source(config, config.eval.split, config.eval.batch_size, rows)
  except Exception as e:
    if _is_data_error(e):
      raise type(e)(f"config.train.eval_every={config.train.eval_every} needs the evaluation data "
                    f"(config.eval.split={config.eval.split!r}), which cannot be opened: {e} "
                    f"(add that split to each dataset, or set config.train.eval_every=0)") from None
    raise


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
  # One speech-unit set per run: the codes index, the config and the checkpoint resumed or started from agree.
  talker_targets.settle_units(config, workdir)
  t = config.train
  primary = jax.process_index() == 0

  # Devices and the train state's layout.
  mesh = sharding.make_mesh(config.mesh)
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
  # Every source the run needs opens now: a missing evaluation split fails before any training.
  eval_rows = data_lib.process_rows(mesh, rules, config.eval.batch_size, t.seq_len)
  eval_source = evaluation = None
  if t.eval_every:
    try:
      if eval_run.wants_loss(config):
        eval_source = _open_eval(config, eval_rows)
      # The other evaluators of config.eval.tasks (generation), built once: task files read at startup.
      evaluation = eval_run.in_loop(config, mesh, setup.graphdef, setup.param_shardings)
    except BaseException:
      data_lib.close(train_data)
      if eval_source is not None:
        data_lib.close(eval_source)
      raise

  ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints,
                                      keep_every=t.keep_every, async_save=t.async_checkpointing, config=config)
  state = _initial_state(setup, ckpt, config.get("init_from"), train_data, external)
  del external  # the state holds it
  if primary:  # only now: a resume that fails leaves the workdir's config.json as it was
    checkpoint.save_config(workdir, config)
  start = int(jax.device_get(state.step))

  train_step = step_lib.jit_train_step(setup)
  eval_step = eval_lib.jit_eval_step(setup.graphdef, mesh, rules, setup.param_shardings,
                                     list(towers.objective_weights(config)))
  # Each evaluation reads the same batches: the source goes back to its opening state.
  eval_start = [eval_source.get_state() if eval_source is not None else None, False]  # (state, used)

  def evaluate() -> dict:
    nonlocal eval_source
    scalars = {}
    if eval_run.wants_loss(config):
      if eval_source is None:  # reopened after a failed evaluation
        eval_source = _open_eval(config, eval_rows)
        eval_start[:] = [eval_source.get_state(), False]
      elif eval_start[1]:
        eval_source.set_state(eval_start[0])
      eval_start[1] = True
      scalars = loss_task.score(eval_step, state.params, eval_source, config, mesh, rules).scalars
    if evaluation is not None:
      scalars.update(evaluation(state.params)[0])
    return scalars

  def evaluate_or_report(step: int) -> dict:
    """The evaluation's scalars; a failure is logged, recorded (metrics eval/failed, eval_errors.jsonl) and
    survived: the step's checkpoint is already saved, and training goes on."""
    nonlocal eval_source
    try:
      return evaluate()
    except Exception as e:  # noqa: BLE001 - an evaluation must not cost training work
      msg = " ".join(f"{type(e).__name__}: {e}".split())
      if _is_data_error(e):
        log.error("evaluation at step %d failed: %s", step, msg)  # the message says it all
      else:
        log.exception("evaluation at step %d failed", step)
      progress.write(f"step {step}: evaluation failed, training goes on: {msg}")
      writer.write(step, {f"{config.eval.split}/failed": 1.0})
      if primary:
        with open(os.path.join(workdir, "eval_errors.jsonl"), "a") as f:
          f.write(json.dumps({"step": int(step), "time": time.time(), "error": msg}) + "\n")
      source, eval_source = eval_source, None
      try:
        data_lib.close(source)
      except Exception:  # noqa: BLE001 - a broken source may not close cleanly; it is dropped either way
        log.exception("closing the evaluation source")
      return {}

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

  def evaluate_and_log(step: int) -> None:
    nonlocal last
    scalars = evaluate_or_report(step)
    if scalars:
      writer.write(step, scalars)
      progress.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()
                                                  if k.split("/")[-1] in ("loss", "ppl", "accuracy", "wer")))
      last = {**last, **scalars}

  try:
    step = start
    if t.eval_every and start == 0 and config.eval.get("at_start"):
      evaluate_and_log(0)  # the untrained baseline that later evaluations are compared with
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
      due_eval = t.eval_every and step % t.eval_every == 0
      due_save = stop or step == t.steps or (t.checkpoint_every and step % t.checkpoint_every == 0)
      if not (due_eval or due_save):
        continue
      finish(*pending)  # never evaluate or save a state whose step is unchecked
      pending = None
      paused_from = time.perf_counter()
      if due_save:
        save(step)  # first: a save never waits on an evaluation (and an asynchronous one overlaps it)
      if due_eval and not stop:
        evaluate_and_log(step)
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
    if eval_source is not None:
      data_lib.close(eval_source)
    if evaluation is not None:
      evaluation.close()
    progress.close()
    writer.close()
    preemption.close()
  return last

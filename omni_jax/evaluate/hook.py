"""Evaluation during training: the training loop's hook (omni_jax.train.loop.Hook) that train.py passes in.

Every config.train.eval_every steps (and at step 0 of a fresh run with config.eval.at_start): the loss on the
evaluation split, then the other evaluators of config.eval.tasks (generation). Every evaluation reads the
same batches. A failing evaluation is logged and recorded (metric <split>/failed, a line of
WORKDIR/eval_errors.jsonl) and training goes on: the step's checkpoint is saved before any hook runs.
"""

import json
import logging
import os
import time

import jax

from omni_jax import towers
from omni_jax.evaluate import loss as eval_lib
from omni_jax.evaluate import run as eval_run
from omni_jax.evaluate.tasks import loss as loss_task
from omni_jax.input import sources
from omni_jax.train import data as data_lib
from omni_jax.train import loop

log = logging.getLogger(__name__)


class Evaluate(loop.Hook):
  """config.eval.tasks every config.train.eval_every steps (nothing when that is 0)."""

  def __init__(self):
    self.source = None  # the loss's batches; None until opened, and again after a failed evaluation
    self.evaluation = None  # the other evaluators, or None

  def open(self, run: loop.Run) -> None:
    config = run.config
    self.every = config.train.eval_every
    if not self.every:
      return
    self.at_start = bool(config.eval.get("at_start"))
    self.config, self.workdir, self.mesh = config, run.workdir, run.mesh
    self.rows = data_lib.process_rows(run.mesh, config.sharding_rules, config.eval.batch_size,
                                      config.train.seq_len)
    self.wants_loss = eval_run.wants_loss(config)
    if self.wants_loss:
      self._open_source()
    # The other evaluators of config.eval.tasks (generation), built once: task files are read at startup.
    self.evaluation = eval_run.in_loop(config, run.mesh, run.setup.graphdef, run.setup.param_shardings)
    self.eval_step = eval_lib.jit_eval_step(run.setup.graphdef, run.mesh, config.sharding_rules,
                                            run.setup.param_shardings, list(towers.objective_weights(config)))

  def _open_source(self) -> None:
    """The evaluation's batches; a data error says that they are the evaluation's (config.train.eval_every)."""
    config = self.config
    try:
      self.source = data_lib.make_source(config, config.eval.split, config.eval.batch_size, self.rows)
    except sources.DataError as e:
      raise type(e)(f"config.train.eval_every={self.every} needs the evaluation data "
                    f"(config.eval.split={config.eval.split!r}), which cannot be opened: {e} "
                    f"(add that split to each dataset, or set config.train.eval_every=0)") from None
    # Each evaluation reads the same batches: the source goes back to this state.
    self.start, self.used = self.source.get_state(), False

  def evaluate(self, params) -> dict:
    scalars = {}
    if self.wants_loss:
      if self.source is None:  # reopened after a failed evaluation
        self._open_source()
      elif self.used:
        self.source.set_state(self.start)
      self.used = True
      scalars = loss_task.score(self.eval_step, params, self.source, self.config, self.mesh,
                                self.config.sharding_rules).scalars
    if self.evaluation is not None:
      scalars.update(self.evaluation(params)[0])
    return scalars

  def __call__(self, step: int, params) -> dict:
    """The evaluation's scalars; a failure is logged and recorded, and training goes on."""
    try:
      return self.evaluate(params)
    except Exception as e:  # noqa: BLE001 - an evaluation must not cost training work
      msg = " ".join(f"{type(e).__name__}: {e}".split())
      if isinstance(e, sources.DataError):
        log.error("step %d: evaluation failed, training goes on: %s", step, msg)  # the message says it all
      else:
        log.exception("step %d: evaluation failed, training goes on: %s", step, msg)
      if jax.process_index() == 0:
        with open(os.path.join(self.workdir, "eval_errors.jsonl"), "a") as f:
          f.write(json.dumps({"step": int(step), "time": time.time(), "error": msg}) + "\n")
      self._close_source()
      return {f"{self.config.eval.split}/failed": 1.0}

  def _close_source(self) -> None:
    source, self.source = self.source, None
    try:
      data_lib.close(source)
    except Exception:  # noqa: BLE001 - a broken source may not close cleanly; it is dropped either way
      log.exception("closing the evaluation source")

  def close(self) -> None:
    if self.source is not None:
      data_lib.close(self.source)
      self.source = None
    if self.evaluation is not None:
      self.evaluation.close()
      self.evaluation = None

"""A training run's checkpoints: a CheckpointManager over WORKDIR/checkpoints.

Each step directory holds:
  params/  the same PyTree as a parameters checkpoint (so eval.py and init_from read both alike)
  train/   step, optimizer state, RNG
  data/    the data iterator's state, one JSON per process (handlers.py)
  config/  config.json: the config the step was written with (find_config prefers it to the workdir's)
and, once the step is complete on disk, files.json (integrity.py). A resume takes the newest intact step.
"""

import logging
import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from omni_jax.checkpoint.handlers import ConfigSave, StatefulIterator, data_args
from omni_jax.checkpoint.integrity import (LISTING_FILE, CheckpointError, first_line, step_problem, tree_mismatch,
                                           write_listing)
from omni_jax.errors import ConfigError

log = logging.getLogger(__name__)


class TrainCheckpointer:
  """CheckpointManager over WORKDIR/checkpoints: async saves, the latest `keep` plus every `keep_every`-th.
  With `config`, each step keeps the config it was written with (its config/ item)."""

  def __init__(self, directory: str, *, keep: int = 3, keep_every: int = 0, async_save: bool = True,
               config: Optional[ml_collections.ConfigDict] = None):
    policies = [checkpoint_managers.LatestN(n=max(1, keep))]
    if keep_every:
      policies.append(checkpoint_managers.EveryNSteps(interval_steps=keep_every))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies))
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.config_json = None if config is None else config.to_json_best_effort(indent=2)
    self._unlisted: list[int] = []  # steps saved here whose files.json is not written yet

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def _write_listings(self) -> None:
    """files.json for the steps whose save has finished (call after wait_until_finished)."""
    if jax.process_index() == 0:
      for step in self._unlisted:
        step_dir = os.path.join(self.directory, str(step))
        if os.path.isdir(step_dir):
          try:
            write_listing(step_dir)
          except OSError as e:  # a listing only helps to detect damage later; never fail a run for it
            log.warning("%s: could not write %s (%s)", step_dir, LISTING_FILE, e)
    self._unlisted = []

  def save(self, step: int, params: Any, train: Any, data: Optional[StatefulIterator] = None) -> None:
    """Start saving (returns once arrays are copied off the devices; files are written in the background)."""
    self.manager.wait_until_finished()  # orbax waits for the previous save anyway
    self._write_listings()
    items = dict(params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train))
    if data is not None:
      items["data"] = data_args(data, save=True)
    if self.config_json is not None:
      items["config"] = ConfigSave(self.config_json)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._unlisted.append(step)

  def restore(self, step: int, params: Any, train: Any, data: Optional[StatefulIterator] = None):
    """(params, train) restored onto the abstract targets (ShapeDtypeStructs with shardings); the data
    iterator, if given, is moved to its saved state."""
    items = dict(params=ocp.args.StandardRestore(params), train=ocp.args.StandardRestore(train))
    if data is not None:
      items["data"] = data_args(data, save=False)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["params"], out["train"]

  def restore_newest_intact(self, params: Any, train: Any, data: Optional[StatefulIterator] = None):
    """(step, params, train) of the newest step that restores, or None when there is no step at all.

    A damaged step (step_problem, or a restore that fails) is skipped with one warning naming it and why,
    and moved aside to <step>.damaged (so that saving that step again works); a step whose trees or
    shapes differ from the targets raises ConfigError naming the first differing parameter; CheckpointError
    when every step is damaged."""
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      return None
    items = ("params", "train") + (("data",) if data is not None else ())
    skipped = []
    for step in steps:
      step_dir = os.path.join(self.directory, str(step))
      problem = step_problem(step_dir, items)
      if problem is None:
        for item, target in (("params", params), ("train", train)):
          mismatch = tree_mismatch(os.path.join(step_dir, item), target)
          if mismatch:
            raise ConfigError(
                f"{step_dir} does not fit this config: {item}.{mismatch} (a different model, config.train.freeze "
                f"or optimizer?). Resume with the config it was written with, or start a new --workdir with "
                f"--config.init_from={step_dir} to take its parameters only.")
        try:
          restored = self.restore(step, params, train, data)
        except Exception as e:  # noqa: BLE001 - tensorstore/orbax raise many kinds for damaged files
          problem = first_line(e)
      if problem is None:
        if skipped:
          log.warning("skipped checkpoint %s; resuming from step %d",
                      "; ".join(f"{self.directory}/{s} ({p})" for s, p in skipped), step)
          self._move_aside([s for s, _ in skipped])
        return (step,) + tuple(restored)
      skipped.append((step, problem))
    raise CheckpointError(f"{self.directory}: no intact checkpoint to resume from (" + "; ".join(
        f"step {s}: {p}" for s, p in skipped) + "). Move the damaged steps away to start afresh.")

  def _move_aside(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      for step in steps:
        src = os.path.join(self.directory, str(step))
        dst, n = src + ".damaged", 1
        while os.path.exists(dst):
          dst, n = f"{src}.damaged{n}", n + 1
        os.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # local: multi-process runs only

      multihost_utils.sync_global_devices("omni_jax: damaged checkpoints moved aside")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()
    self._write_listings()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self._write_listings()
    self.manager.close()

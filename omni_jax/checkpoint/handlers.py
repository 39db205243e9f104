"""The items a training step stores beside the arrays: the data iterator's position and the step's config.

Each is a small orbax handler writing plain files. The data item is one JSON per process from the
get_state()/set_state() protocol below, or grain's own handler for grain iterators.
"""

import dataclasses
import json
import logging
from typing import Any, Protocol

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


class StatefulIterator(Protocol):
  """What a data source offers to be checkpointed: a JSON-able state, and a way to jump back to it."""

  def get_state(self) -> dict: ...

  def set_state(self, state: dict) -> None: ...


def _process_file(directory: epath.Path) -> epath.Path:
  return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class _FileHandler(ocp.CheckpointHandler):
  """An item stored as plain files that its subclass writes and reads; no metadata, nothing to finalize."""

  def metadata(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass


class IteratorHandler(_FileHandler):
  """Saves StatefulIterator.get_state() as one JSON per process; restore calls set_state()."""

  def save(self, directory: epath.Path, args: "IteratorSave"):
    _process_file(epath.Path(directory)).write_text(json.dumps(args.item.get_state(), indent=1))

  def restore(self, directory: epath.Path, args: "IteratorRestore"):
    f = _process_file(epath.Path(directory))
    if not f.exists():
      written = sorted(epath.Path(directory).glob("process_*-of-*.json"))
      if not written:
        raise FileNotFoundError(f"{f}: no iterator state for this process")
      _restore_other_process_count(args.item, written, epath.Path(directory))
      return args.item
    args.item.set_state(json.loads(f.read_text()))
    return args.item


def _restore_other_process_count(item: Any, written: list, directory: epath.Path) -> None:
  """A data state saved by another number of processes. A source whose state is global (the same on every
  process, like the synthetic source's batch index: `state_fits_any_process_count`) continues exactly; any
  other starts again from its beginning, and the run says so."""
  counts = sorted({p.name.rsplit("-of-", 1)[1][:-len(".json")] for p in written})
  saved_by = "/".join(counts)
  if getattr(item, "state_fits_any_process_count", False):
    item.set_state(json.loads(written[0].read_text()))
    log.info("%s: data position saved by %s processes, continued on %d", directory, saved_by, jax.process_count())
    return
  log.warning("%s: the data position was saved by %s processes and this run has %d; it cannot be carried over, "
              "so the data stream starts again from its beginning (samples seen before this checkpoint will be "
              "seen again); resume on %s processes to continue exactly", directory, saved_by, jax.process_count(),
              saved_by)


@ocp.args.register_with_handler(IteratorHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(IteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
  item: Any


class ConfigHandler(_FileHandler):
  """The config a step was written with, as config.json in the step's config/ item (process 0 writes it)."""

  def save(self, directory: epath.Path, args: "ConfigSave"):
    if jax.process_index() == 0:
      (epath.Path(directory) / "config.json").write_text(args.item)

  def restore(self, directory: epath.Path, args: "ConfigRestore" = None):
    return (epath.Path(directory) / "config.json").read_text()


@ocp.args.register_with_handler(ConfigHandler, for_save=True)
@dataclasses.dataclass
class ConfigSave(ocp.args.CheckpointArgs):
  item: str  # the config as JSON


@ocp.args.register_with_handler(ConfigHandler, for_restore=True)
@dataclasses.dataclass
class ConfigRestore(ocp.args.CheckpointArgs):
  pass


def _is_grain(it: Any) -> bool:
  try:
    import grain  # local: only runs with a grain data iterator need it

    kinds = (grain.DatasetIterator,) + ((grain.DataLoaderIterator,) if hasattr(grain, "DataLoaderIterator") else ())
    return isinstance(it, kinds)
  except ImportError:
    return False


def data_args(it: Any, save: bool):
  """The orbax args that save (or restore) data iterator `it` as a step's data item."""
  if _is_grain(it):
    import grain.checkpoint  # local: registers grain's handler with orbax

    return grain.checkpoint.CheckpointSave(it) if save else grain.checkpoint.CheckpointRestore(it)
  return IteratorSave(it) if save else IteratorRestore(it)

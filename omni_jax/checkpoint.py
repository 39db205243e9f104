"""Orbax checkpoints: model parameters alone, and full train states with the data iterator beside them.

A parameters checkpoint is a directory holding `params/` (an orbax PyTree of the nnx state as a plain nested
dict) and `config.json` (the model config it was written with); `python -m omni_jax.convert` writes one.

A training run keeps a CheckpointManager under WORKDIR/checkpoints. Each step directory holds three items:
  params/  the same PyTree as a parameters checkpoint (so eval.py and init_from read both alike)
  train/   step, optimizer state, RNG
  data/    the data iterator's state, one JSON per process (grain's handler for grain iterators, else the
           get_state()/set_state() protocol below)
Restores take abstract targets carrying the current mesh's shardings, so arrays land directly in the
layout of whatever devices are present (resharding on restore: save on fsdp=8, resume on fsdp=4 x tensor=2).
"""

import dataclasses
import json
import logging
import os
from typing import Any, Optional, Protocol

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from orbax.checkpoint import checkpoint_managers

log = logging.getLogger(__name__)


def _pure(state) -> dict:
  return nnx.to_pure_dict(state)


# ---------------------------------------------------------------------------------------------------------
# Parameters checkpoints (the converter's format).


def save_params(path: str, state, config: Optional[ml_collections.ConfigDict] = None) -> None:
  """Write `state` (an nnx.State of arrays, or its pure dict) under path/params, the config as config.json."""
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), state if isinstance(state, dict) else _pure(state), force=True)
  if config is not None:
    save_config(path, config)


def save_config(path: str, config: ml_collections.ConfigDict) -> None:
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def load_config(path: str) -> ml_collections.ConfigDict:
  with open(os.path.join(path, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `abstract` placed by the matching tree of `shardings`."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def restore_pure(path: str, target: dict) -> dict:
  """The nested dict stored under path/params, restored onto `target`'s shapes and shardings."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(os.path.abspath(path), "params"), target)


def restore_params(path: str, abstract_state, shardings: Optional[Any] = None):
  """nnx.State with the values stored under path/params, placed by `shardings` (a matching State of
  NamedShardings) or on the default device."""
  target = abstract_state if shardings is None else with_shardings(abstract_state, shardings)
  pure = restore_pure(path, _pure(target))
  state = jax.tree.map(lambda x: x, abstract_state)
  nnx.replace_by_pure_dict(state, pure)
  return state


def params_dir(path: str) -> str:
  """The directory holding `params/` that `path` names: a parameters checkpoint or a step directory as is;
  a training workdir (or its checkpoints/ directory) -> its latest step."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "params")):
    return path
  for root in (os.path.join(path, "checkpoints"), path):
    steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
    steps = [s for s in steps if os.path.isdir(os.path.join(root, str(s), "params"))]
    if steps:
      return os.path.join(root, str(steps[-1]))
  raise FileNotFoundError(f"{path}: no parameters checkpoint (params/), training workdir (checkpoints/<step>/) "
                          f"or checkpoint directory found")


def find_config(params_path: str) -> Optional[str]:
  """config.json written with a checkpoint: beside params/ (converter) or in the workdir (training)."""
  for d in (params_path, os.path.dirname(params_path), os.path.dirname(os.path.dirname(params_path))):
    if os.path.isfile(os.path.join(d, "config.json")):
      return d
  return None


def tuples(tree):
  """JSON turns tuples into lists; configs use tuples (hashable, static under jit)."""
  if isinstance(tree, dict):
    return {k: tuples(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return tuple(tuples(v) for v in tree)
  return tree


def adopt_model_config(config: ml_collections.ConfigDict, params_path: str) -> ml_collections.ConfigDict:
  """config with each tower's section (model.thinker, ...: omni_jax.towers) replaced by the architecture
  stored with a checkpoint (if any), so that a --config with other model sizes still restores it; a
  differing architecture is logged."""
  from omni_jax import towers  # local: the registry imports the model code

  where = find_config(params_path)
  if where is None:
    return config
  saved = load_config(where)
  if "model" not in saved:
    return config
  for tower in towers.registered():
    key = tower.section.split(".", 1)[1]  # "model.thinker" -> "thinker"
    if key not in saved.model:
      continue
    stored = tuples(saved.model[key].to_dict())
    current = config.model.get(key)
    if current is not None and stored == tuples(current.to_dict()):
      continue
    log.warning("using the model architecture stored in %s/config.json (config.%s differs)", where, tower.section)
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.model[key] = ml_collections.ConfigDict(stored)
  return config


# ---------------------------------------------------------------------------------------------------------
# The data iterator item.


class StatefulIterator(Protocol):
  """What a data source offers to be checkpointed: a JSON-able state, and a way to jump back to it."""

  def get_state(self) -> dict: ...

  def set_state(self, state: dict) -> None: ...


def _process_file(directory: epath.Path) -> epath.Path:
  return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class IteratorHandler(ocp.CheckpointHandler):
  """Saves StatefulIterator.get_state() as one JSON per process; restore calls set_state()."""

  def save(self, directory: epath.Path, args: "IteratorSave"):
    _process_file(epath.Path(directory)).write_text(json.dumps(args.item.get_state(), indent=1))

  def restore(self, directory: epath.Path, args: "IteratorRestore"):
    f = _process_file(epath.Path(directory))
    if not f.exists():
      raise FileNotFoundError(f"{f}: no iterator state for this process (was the run saved with "
                              f"{jax.process_count()} processes?)")
    args.item.set_state(json.loads(f.read_text()))
    return args.item

  def metadata(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(IteratorHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(IteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
  item: Any


def _is_grain(it: Any) -> bool:
  try:
    import grain  # local: only runs with a grain data iterator need it

    kinds = (grain.DatasetIterator,) + ((grain.DataLoaderIterator,) if hasattr(grain, "DataLoaderIterator") else ())
    return isinstance(it, kinds)
  except ImportError:
    return False


def _data_args(it: Any, save: bool):
  if _is_grain(it):
    import grain.checkpoint  # local: registers grain's handler with orbax

    return grain.checkpoint.CheckpointSave(it) if save else grain.checkpoint.CheckpointRestore(it)
  return IteratorSave(it) if save else IteratorRestore(it)


# ---------------------------------------------------------------------------------------------------------
# The training run's manager.


class TrainCheckpointer:
  """CheckpointManager over WORKDIR/checkpoints: async saves, the latest `keep` plus every `keep_every`-th."""

  def __init__(self, directory: str, *, keep: int = 3, keep_every: int = 0, async_save: bool = True):
    policies = [checkpoint_managers.LatestN(n=max(1, keep))]
    if keep_every:
      policies.append(checkpoint_managers.EveryNSteps(interval_steps=keep_every))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies))
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, params: Any, train: Any, data: Optional[StatefulIterator] = None) -> None:
    """Start saving (returns once arrays are copied off the devices; files are written in the background)."""
    items = dict(params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train))
    if data is not None:
      items["data"] = _data_args(data, save=True)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, params: Any, train: Any, data: Optional[StatefulIterator] = None):
    """(params, train) restored onto the abstract targets (ShapeDtypeStructs with shardings); the data
    iterator, if given, is moved to its saved state."""
    items = dict(params=ocp.args.StandardRestore(params), train=ocp.args.StandardRestore(train))
    if data is not None:
      items["data"] = _data_args(data, save=False)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["params"], out["train"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

"""Orbax checkpoints: model parameters alone, and full train states with the data iterator beside them.

A parameters checkpoint is a directory holding `params/` (an orbax PyTree of the nnx state as a plain nested
dict) and `config.json` (the model config it was written with); `python -m omni_jax.convert` writes one.

A training run keeps a CheckpointManager under WORKDIR/checkpoints. Each step directory holds three items:
  params/  the same PyTree as a parameters checkpoint (so eval.py and init_from read both alike)
  train/   step, optimizer state, RNG
  data/    the data iterator's state, one JSON per process (grain's handler for grain iterators, else the
           get_state()/set_state() protocol below)
  config/  config.json: the config the step was written with (find_config prefers it to the workdir's)
and, once the step is complete on disk, files.json (every file's size but config/'s) so that a truncated or
missing file is found without reading the arrays; config/config.json, which may be edited by hand, must parse
as a JSON object instead (any step, whatever its files.json lists). step_problem() says why a step cannot be
restored; the run and params_dir skip such steps and take the newest intact one. WORKDIR/lock keeps a second
run out of a workdir.
Restores take abstract targets carrying the current mesh's shardings, so arrays land directly in the
layout of whatever devices are present (resharding on restore: save on fsdp=8, resume on fsdp=4 x tensor=2).
"""

import dataclasses
import json
import logging
import os
import socket
from typing import Any, Optional, Protocol

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from orbax.checkpoint import checkpoint_managers

from omni_jax.config import ConfigError

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
  """path/config.json; CheckpointError (one line from the CLIs) when it does not parse as a JSON object."""
  file = os.path.join(path, "config.json")
  problem = _config_problem(file)
  if problem:
    raise CheckpointError(f"{file} is unreadable ({problem})")
  with open(file) as f:
    return ml_collections.ConfigDict(json.load(f))


def _config_problem(file: str) -> Optional[str]:
  """Why a config.json does not parse as a JSON object (a truncated write, say), or None."""
  try:
    with open(file) as f:
      value = json.load(f)
  except FileNotFoundError:  # no config is no damage: the caller decides (load_config: as open() would)
    raise
  except (OSError, ValueError) as e:
    return _first_line(e)
  return None if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"


# Top-level keys of a transformers config.json (Qwen2.5-Omni's sub-configs included); the configs stored here
# (ml_collections: model, data, train, ...) have none of them.
_TRANSFORMERS_KEYS = ("model_type", "architectures", "thinker_config", "talker_config", "token2wav_config")


def is_transformers_dir(path: str) -> bool:
  """Whether `path` is a transformers checkpoint directory, by its config.json's content (a transformers config,
  not ours) and no params/: other files do not decide (a workdir keeps speakers.safetensors beside its own
  config.json)."""
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file) or os.path.isdir(os.path.join(path, "params")):
    return False
  try:
    with open(file) as f:
      value = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(value, dict) and any(k in value for k in _TRANSFORMERS_KEYS)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `abstract` placed by the matching tree of `shardings`."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class CheckpointError(FileNotFoundError, ConfigError):
  """A checkpoint is missing, incomplete or damaged (a FileNotFoundError and a ConfigError: the CLIs report
  it as one line)."""


def _first_line(e: BaseException, limit: int = 300) -> str:
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = f"{type(e).__name__}: {text}"
  return text if len(text) <= limit else text[:limit] + "..."


def stored_tree(item_dir: str) -> dict:
  """{dotted path: (shape, dtype)} of the arrays an orbax PyTree item holds (read from its metadata only)."""
  # The item's own handler: a manager's step keeps the checkpoint-level metadata one level up, where a
  # Checkpointer would look for it in vain (and warn).
  md = ocp.PyTreeCheckpointHandler().metadata(epath.Path(os.path.abspath(item_dir)))
  md = getattr(md, "tree", md)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(md)[0]:
    out[_dotted(path)] = (tuple(getattr(leaf, "shape", ()) or ()), str(getattr(leaf, "dtype", "")))
  return out


def _dotted(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def tree_mismatch(item_dir: str, target: Any, *, shapes_only: bool = False) -> Optional[str]:
  """None when the item's stored arrays have `target`'s tree and shapes, else the first difference (a
  parameter missing on one side, or one parameter with both shapes). shapes_only: compare only common leaves."""
  stored = stored_tree(item_dir)
  wanted = {_dotted(p): tuple(getattr(x, "shape", None) or ()) for p, x in
            jax.tree_util.tree_flatten_with_path(target)[0]}
  for key in sorted(set(stored) | set(wanted)):
    if key not in stored:
      if not shapes_only:
        return f"{key} is in this config's model but not in the checkpoint"
    elif key not in wanted:
      if not shapes_only:
        return f"{key} is in the checkpoint but not in this config's model"
    elif stored[key][0] != wanted[key]:
      return f"{key} has shape {stored[key][0]} in the checkpoint, {wanted[key]} in this config"
  return None


def restore_pure(path: str, target: dict) -> dict:
  """The nested dict stored under path/params, restored onto `target`'s shapes and shardings."""
  item = os.path.join(os.path.abspath(path), "params")
  problem = step_problem(os.path.abspath(path), ("params",))
  if problem:
    raise CheckpointError(f"{path}: cannot be restored ({problem})")
  mismatch = tree_mismatch(item, target, shapes_only=True)  # orbax would silently pad or cut the array
  if mismatch:
    raise ConfigError(f"{path} does not fit this config: {mismatch}")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(item, target)


def restore_params(path: str, abstract_state, shardings: Optional[Any] = None):
  """nnx.State with the values stored under path/params, placed by `shardings` (a matching State of
  NamedShardings) or on the default device."""
  target = abstract_state if shardings is None else with_shardings(abstract_state, shardings)
  pure = restore_pure(path, _pure(target))
  state = jax.tree.map(lambda x: x, abstract_state)
  nnx.replace_by_pure_dict(state, pure)
  return state


_LISTING = "files.json"
_STEP_CONFIG = os.path.join("config", "config.json")  # a step's own config (ConfigHandler)


def _listing(step_dir: str) -> dict:
  """{relative path: size} of every file under step_dir but the listing itself and config/ (which may be
  edited by hand, e.g. to set eos ids before an export)."""
  out = {}
  for root, _, files in os.walk(step_dir):
    for f in files:
      full = os.path.join(root, f)
      rel = os.path.relpath(full, step_dir)
      if rel not in (_LISTING, _LISTING + ".tmp") and not rel.startswith("config" + os.sep):
        out[rel] = os.path.getsize(full)
  return out


def write_listing(step_dir: str) -> None:
  """Record the size of every file of a complete step (atomically), for step_problem to check."""
  sizes = _listing(step_dir)
  tmp = os.path.join(step_dir, _LISTING + ".tmp")
  with open(tmp, "w") as f:
    json.dump(sizes, f, indent=0, sort_keys=True)
  os.replace(tmp, os.path.join(step_dir, _LISTING))


def step_problem(step_dir: str, items=("params",)) -> Optional[str]:
  """Why the checkpoint in step_dir cannot be restored (an empty directory, a missing item, metadata or
  manifest, a missing or truncated file), or None when it looks intact. Reads metadata and file sizes, never
  the arrays."""
  if not os.path.isdir(step_dir):
    return "no such directory"
  if not os.listdir(step_dir):
    return "the step directory is empty"
  listed = os.path.join(step_dir, _LISTING)
  if os.path.isfile(listed):
    try:
      with open(listed) as f:
        sizes = json.load(f)
    except (OSError, ValueError) as e:
      return f"{_LISTING} is unreadable ({_first_line(e)})"
    for rel, size in sorted(sizes.items()):
      full = os.path.join(step_dir, rel)
      if not os.path.isfile(full):
        return f"{rel} is missing"
      if os.path.getsize(full) != size:
        return f"{rel} is truncated or changed ({os.path.getsize(full)} bytes, {size} were written)"
  # Not in files.json (hand edits are allowed), but find_config reads it before the parameters: a truncated
  # one makes the step unusable.
  if os.path.isfile(os.path.join(step_dir, _STEP_CONFIG)):
    problem = _config_problem(os.path.join(step_dir, _STEP_CONFIG))
    if problem:
      return f"{_STEP_CONFIG} is unreadable ({problem})"
  for item in items:
    item_dir = os.path.join(step_dir, item)
    if not os.path.isdir(item_dir):
      return f"the {item}/ item is missing"
    if item == "data":
      continue  # the iterator's own format; its restore reports a problem
    if not os.path.isfile(os.path.join(item_dir, "_METADATA")):
      return f"{item}/_METADATA is missing"
    if os.path.isdir(os.path.join(item_dir, "d")) and not os.path.isfile(os.path.join(item_dir, "manifest.ocdbt")):
      return f"{item}/manifest.ocdbt is missing"
    try:
      stored_tree(item_dir)
    except Exception as e:  # noqa: BLE001 - any unreadable metadata makes the step unusable
      return f"{item}/ metadata is unreadable ({_first_line(e)})"
  return None


def _steps(root: str) -> list[int]:
  return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def params_dir(path: str) -> str:
  """The directory holding `params/` that `path` names: a parameters checkpoint or a step directory as is;
  a training workdir (or its checkpoints/ directory) -> its newest intact step (damaged ones are skipped
  with a warning; CheckpointError when none is intact)."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "params")):
    return path
  for root in (os.path.join(path, "checkpoints"), path):
    steps = _steps(root)
    if not steps:
      continue
    skipped = []
    for step in reversed(steps):
      problem = step_problem(os.path.join(root, str(step)), ("params",))
      if problem is None:
        if skipped:
          log.warning("%s: skipped damaged step %s; using step %d", root, "; ".join(skipped), step)
        return os.path.join(root, str(step))
      skipped.append(f"{step}: {problem}")
    raise CheckpointError(f"{root}: no intact checkpoint (" + "; ".join(skipped) + ")")
  raise FileNotFoundError(f"{path}: no parameters checkpoint (params/), training workdir (checkpoints/<step>/) "
                          f"or checkpoint directory found")


def find_config(params_path: str) -> Optional[str]:
  """Directory of the config.json written with a checkpoint: beside params/ (converter), the step's own
  (config/ item of a training step), else the workdir's (older training runs)."""
  for d in (params_path, os.path.join(params_path, "config"), os.path.dirname(params_path),
            os.path.dirname(os.path.dirname(params_path))):
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
  absent = []
  for tower in towers.registered():
    key = tower.section.split(".", 1)[1]  # "model.thinker" -> "thinker"
    if key not in saved.model:
      if config.model.get(key) is not None:
        absent.append(tower)
      continue
    stored = tuples(saved.model[key].to_dict())
    current = config.model.get(key)
    if current is not None and stored == tuples(current.to_dict()):
      continue
    log.warning("using the model architecture stored in %s/config.json (config.%s differs)", where, tower.section)
    config = config.copy_and_resolve_references()
    added = _added_speakers(stored, current) if key == "talker" and current is not None else {}
    with config.unlocked():
      config.model[key] = ml_collections.ConfigDict(stored)
      if added:  # a new voice (docs/new_voice.md): names the run adds to the stored table keep their rows
        config.model[key].speakers.update(added)
        if current.get("default_speaker") in added:
          config.model[key].default_speaker = current.default_speaker
        log.warning("config.model.talker.speakers: adding %s to the stored speakers", added)
  for tower in absent:
    config = _new_tower(config, tower, where)
  return config


def _added_speakers(stored: dict, current) -> dict:
  """{name: bos row} the config's Talker adds to the stored speaker table (not architecture: a new voice is a
  new name over an unused Thinker row); a row the stored table already uses is an error."""
  have = dict(stored.get("speakers") or {})
  added = {k: int(v) for k, v in dict(current.get("speakers") or {}).items() if k not in have}
  clash = {k: v for k, v in added.items() if v in set(have.values())}
  if clash:
    raise ConfigError(f"config.model.talker.speakers: {clash} reuse rows of the stored speakers {have}")
  return added


def _new_tower(config: ml_collections.ConfigDict, tower, where: str) -> ml_collections.ConfigDict:
  """A tower the config builds but the checkpoint does not hold: kept (it starts from scratch, e.g. a Talker
  added to a converted Thinker) when it fits the stored towers, else left out with its objectives."""
  from omni_jax import towers  # local: the registry imports the model code

  try:
    tower.view(config)
    log.warning("%s holds no %s: this config's %s starts from scratch", where, tower.name, tower.section)
    return config
  except ConfigError as e:
    log.warning("%s holds no %s, and config.%s does not fit its other towers (%s): the %s is left out",
                where, tower.name, tower.section, e, tower.name)
  return towers.without(config, tower.name)


# ---------------------------------------------------------------------------------------------------------
# The data iterator item.


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


def _data_args(it: Any, save: bool):
  if _is_grain(it):
    import grain.checkpoint  # local: registers grain's handler with orbax

    return grain.checkpoint.CheckpointSave(it) if save else grain.checkpoint.CheckpointRestore(it)
  return IteratorSave(it) if save else IteratorRestore(it)


# ---------------------------------------------------------------------------------------------------------
# The training run's manager.


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
            log.warning("%s: could not write %s (%s)", step_dir, _LISTING, e)
    self._unlisted = []

  def save(self, step: int, params: Any, train: Any, data: Optional[StatefulIterator] = None) -> None:
    """Start saving (returns once arrays are copied off the devices; files are written in the background)."""
    self.manager.wait_until_finished()  # orbax waits for the previous save anyway
    self._write_listings()
    items = dict(params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train))
    if data is not None:
      items["data"] = _data_args(data, save=True)
    if self.config_json is not None:
      items["config"] = ConfigSave(self.config_json)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._unlisted.append(step)

  def restore(self, step: int, params: Any, train: Any, data: Optional[StatefulIterator] = None):
    """(params, train) restored onto the abstract targets (ShapeDtypeStructs with shardings); the data
    iterator, if given, is moved to its saved state."""
    items = dict(params=ocp.args.StandardRestore(params), train=ocp.args.StandardRestore(train))
    if data is not None:
      items["data"] = _data_args(data, save=False)
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
          problem = _first_line(e)
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


# ---------------------------------------------------------------------------------------------------------
# The workdir lock.


class WorkdirLocked(ConfigError):
  """Another run holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """WORKDIR/lock, holding {"pid", "host"} of the run that owns the workdir; created atomically (O_EXCL).

  A second run exits at once (WorkdirLocked naming the workdir and the holder); a lock left by a killed run
  on this host (its pid is gone) is taken over with a warning. A lock from another host is never taken over:
  remove the file by hand once that run is known to be dead."""

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), "lock")
    self.held = False

  def _mine(self) -> dict:
    return dict(pid=os.getpid(), host=socket.gethostname())

  def acquire(self) -> "WorkdirLock":
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._read()
        if holder == {}:  # released meanwhile
          continue
        if holder is None:  # being written right now, or garbage: look again, then take it if still garbage
          import time  # local: rare path

          time.sleep(0.2)
          holder = self._read()
          if holder is None:
            log.warning("%s: unreadable lock file; taking it over", self.path)
            self._remove()
            continue
        host, pid = holder.get("host"), holder.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
          log.warning("%s: taking over the stale lock of process %d on %s (no longer running)", self.path, pid,
                      host)
          self._remove()
          continue
        raise WorkdirLocked(
            f"workdir {os.path.dirname(self.path)} is in use by another run (pid {pid} on host {host}, see "
            f"{self.path}); wait for it to end or pick another --workdir. If that run is dead, delete the lock "
            f"file.")
      with os.fdopen(fd, "w") as f:
        json.dump(self._mine(), f)
      self.held = True
      return self
    raise WorkdirLocked(f"workdir {os.path.dirname(self.path)}: could not take {self.path} (another run keeps "
                        f"taking it)")

  def _read(self) -> Optional[dict]:
    try:
      with open(self.path) as f:
        out = json.load(f)
      return out if isinstance(out, dict) else None
    except FileNotFoundError:
      return {}
    except (OSError, ValueError):
      return None

  def _remove(self) -> None:
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass

  def release(self) -> None:
    if self.held and self._read() == self._mine():
      self._remove()
    self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
    return False

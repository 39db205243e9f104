"""Whether a checkpoint can be restored, read from metadata and file sizes only (never the arrays).

A complete training step holds files.json: the size of every file but config/'s (which may be edited by
hand, e.g. to set eos ids before an export), so that a truncated or missing file is found before a restore
fails halfway; config/config.json must parse as a JSON object instead. step_problem() says why a step
cannot be restored; params_dir() and the training run skip such steps and take the newest intact one.
"""

import json
import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from omni_jax.errors import ConfigError


log = logging.getLogger(__name__)

LISTING_FILE = "files.json"
STEP_CONFIG = os.path.join("config", "config.json")  # a step's own config (handlers.ConfigHandler)


class CheckpointError(FileNotFoundError, ConfigError):
  """A checkpoint is missing, incomplete or damaged (a FileNotFoundError and a ConfigError: the CLIs report
  it as one line)."""


def first_line(e: BaseException, limit: int = 300) -> str:
  """An exception as one short line: its type and the first line of its message."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = f"{type(e).__name__}: {text}"
  return text if len(text) <= limit else text[:limit] + "..."


def config_problem(file: str) -> Optional[str]:
  """Why a config.json does not parse as a JSON object (a truncated write, say), or None."""
  try:
    with open(file) as f:
      value = json.load(f)
  except FileNotFoundError:  # no config is no damage: the caller decides (load_config: as open() would)
    raise
  except (OSError, ValueError) as e:
    return first_line(e)
  return None if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"


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


def _listing(step_dir: str) -> dict:
  """{relative path: size} of every file under step_dir but the listing itself and config/."""
  out = {}
  for root, _, files in os.walk(step_dir):
    for f in files:
      full = os.path.join(root, f)
      rel = os.path.relpath(full, step_dir)
      if rel not in (LISTING_FILE, LISTING_FILE + ".tmp") and not rel.startswith("config" + os.sep):
        out[rel] = os.path.getsize(full)
  return out


def write_listing(step_dir: str) -> None:
  """Record the size of every file of a complete step (atomically), for step_problem to check."""
  sizes = _listing(step_dir)
  tmp = os.path.join(step_dir, LISTING_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(sizes, f, indent=0, sort_keys=True)
  os.replace(tmp, os.path.join(step_dir, LISTING_FILE))


def step_problem(step_dir: str, items=("params",)) -> Optional[str]:
  """Why the checkpoint in step_dir cannot be restored (an empty directory, a missing item, metadata or
  manifest, a missing or truncated file), or None when it looks intact."""
  if not os.path.isdir(step_dir):
    return "no such directory"
  if not os.listdir(step_dir):
    return "the step directory is empty"
  listed = os.path.join(step_dir, LISTING_FILE)
  if os.path.isfile(listed):
    try:
      with open(listed) as f:
        sizes = json.load(f)
    except (OSError, ValueError) as e:
      return f"{LISTING_FILE} is unreadable ({first_line(e)})"
    for rel, size in sorted(sizes.items()):
      full = os.path.join(step_dir, rel)
      if not os.path.isfile(full):
        return f"{rel} is missing"
      if os.path.getsize(full) != size:
        return f"{rel} is truncated or changed ({os.path.getsize(full)} bytes, {size} were written)"
  # Not in files.json (hand edits are allowed), but find_config reads it before the parameters: a truncated
  # one makes the step unusable.
  if os.path.isfile(os.path.join(step_dir, STEP_CONFIG)):
    problem = config_problem(os.path.join(step_dir, STEP_CONFIG))
    if problem:
      return f"{STEP_CONFIG} is unreadable ({problem})"
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
      return f"{item}/ metadata is unreadable ({first_line(e)})"
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

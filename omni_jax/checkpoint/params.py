"""Parameters checkpoints (the converter's format, and the params/ item of every training step).

A parameters checkpoint is a directory holding `params/` (an orbax PyTree of the nnx state as a plain nested
dict) and `config.json` (the config it was written with). Restores take abstract targets carrying the current
mesh's shardings, so arrays land directly in the layout of whatever devices are present (save on fsdp=8,
restore on fsdp=4 x tensor=2).
"""

import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from omni_jax.checkpoint.integrity import CheckpointError, step_problem, tree_mismatch
from omni_jax.checkpoint.stored_config import save_config
from omni_jax.errors import ConfigError


def save_params(path: str, state, config: Optional[ml_collections.ConfigDict] = None) -> None:
  """Write `state` (an nnx.State of arrays, or its pure dict) under path/params, the config as config.json."""
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), state if isinstance(state, dict) else nnx.to_pure_dict(state),
               force=True)
  if config is not None:
    save_config(path, config)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `abstract` placed by the matching tree of `shardings`."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


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
  pure = restore_pure(path, nnx.to_pure_dict(target))
  state = jax.tree.map(lambda x: x, abstract_state)
  nnx.replace_by_pure_dict(state, pure)
  return state

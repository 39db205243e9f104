"""Orbax checkpoints of model parameters (the training issue adds the full train-state manager).

A parameters checkpoint is a directory holding `params/` (an orbax PyTree of the nnx state as a plain nested
dict) and `config.json` (the model config it was written with). Restoring takes an abstract target with
shardings, so arrays land directly in the layout of whatever mesh is present (resharding on restore).
"""

import json
import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx


def _pure(state) -> dict:
  return nnx.to_pure_dict(state)


def save_params(path: str, state, config: Optional[ml_collections.ConfigDict] = None) -> None:
  """Write `state` (an nnx.State of arrays) under path/params, and the config as path/config.json."""
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), _pure(state), force=True)
  if config is not None:
    with open(os.path.join(path, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))


def load_config(path: str) -> ml_collections.ConfigDict:
  with open(os.path.join(path, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_params(path: str, abstract_state, shardings: Optional[Any] = None):
  """nnx.State with the values stored under path/params, placed by `shardings` (a matching State of
  NamedShardings) or on the default device."""
  path = os.path.abspath(path)
  target = abstract_state
  if shardings is not None:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                          shardings)
  with ocp.StandardCheckpointer() as ckptr:
    pure = ckptr.restore(os.path.join(path, "params"), _pure(target))
  state = jax.tree.map(lambda x: x, abstract_state)
  nnx.replace_by_pure_dict(state, pure)
  return state

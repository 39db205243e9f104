"""The config.json stored with a checkpoint: written, found, read; and whether a directory holds a
transformers checkpoint instead (told by its config.json's content)."""

import json
import os
from typing import Optional

import ml_collections

from omni_jax.checkpoint.integrity import CheckpointError, config_problem


def save_config(path: str, config: ml_collections.ConfigDict) -> None:
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def load_config(path: str) -> ml_collections.ConfigDict:
  """path/config.json; CheckpointError (one line from the CLIs) when it does not parse as a JSON object."""
  file = os.path.join(path, "config.json")
  problem = config_problem(file)
  if problem:
    raise CheckpointError(f"{file} is unreadable ({problem})")
  with open(file) as f:
    return ml_collections.ConfigDict(json.load(f))


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

"""The evaluator registry (big_vision style): each evaluator is one module under omni_jax/evaluate/tasks that
registers a class under its name; config.eval.tasks ("loss,asr,mcq,open,speech") selects them.

An evaluator is constructed once per job with an evaluate.context.Context and called with the parameters to
score; it returns a Scores (scalars for TensorBoard / JSONL, details for the JSON report).
"""

import dataclasses
import importlib
from typing import Any, Callable

from omni_jax.errors import ConfigError


_REGISTRY: dict[str, Callable] = {}
_MODULES = ("loss", "asr", "mcq", "open", "speech")  # omni_jax.evaluate.tasks.<name>
# Names kept for evaluators that need parts of the model not built yet; selecting one fails with this reason.
RESERVED: dict[str, str] = {}


@dataclasses.dataclass
class Scores:
  """scalars: {"<split>/<task>/<metric>": float}; details: JSON-serialisable facts for the report."""
  scalars: dict[str, float]
  details: dict[str, Any] = dataclasses.field(default_factory=dict)


def register(name: str):
  def wrap(cls):
    _REGISTRY[name] = cls
    return cls
  return wrap


def _load_all():
  for m in _MODULES:
    importlib.import_module(f"omni_jax.evaluate.tasks.{m}")


def names() -> list[str]:
  _load_all()
  return sorted(_REGISTRY)


def get(name: str) -> Callable:
  _load_all()
  if name in RESERVED:
    raise ConfigError(f"config.eval.tasks: {name!r} is not available: {RESERVED[name]}")
  if name not in _REGISTRY:
    raise ConfigError(f"config.eval.tasks: unknown evaluator {name!r}; known: {', '.join(names())}")
  return _REGISTRY[name]


def selected(config, in_training: bool = False) -> list[str]:
  """The evaluator names of config.eval.tasks (a comma-separated string or a sequence), validated, in order.
  in_training: those of config.eval.train_tasks when it is set (train.py's evaluations)."""
  key = "train_tasks" if in_training and config.eval.get("train_tasks") else "tasks"
  tasks = config.eval.get(key, "loss")
  if isinstance(tasks, str):
    tasks = [t.strip() for t in tasks.split(",")]
  tasks = [t for t in tasks if t]
  if len(set(tasks)) != len(tasks):
    raise ConfigError(f"config.eval.{key} names an evaluator twice: {tasks}")
  for t in tasks:
    get(t)
  return list(tasks)

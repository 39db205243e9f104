"""The converter's mapping-rule type, shared by omni_jax.convert.hf (the core) and the towers' rule tables
(registered with omni_jax.towers). No jax and no model imports."""

import dataclasses
from typing import Callable, Optional

import ml_collections
import numpy as np

from omni_jax.errors import UserError

Transform = Callable[[np.ndarray], np.ndarray]


class CheckpointMismatch(UserError, ValueError):
  """The checkpoint's tensors do not match the model the config describes; the message lists them."""


def identity(x):
  return x


def transpose(x):
  return np.ascontiguousarray(x.T)


@dataclasses.dataclass(frozen=True)
class Rule:
  """ours (regex over our dotted path) <-> disk (template with \\1 groups); to_disk/from_disk transforms."""
  ours: str
  disk: str
  to_disk: Transform = identity
  from_disk: Transform = identity
  # When to_disk alone cannot know the on-disk shape: (our config or None, to_disk's shape) -> shape.
  disk_shape: Optional[Callable[[Optional[ml_collections.ConfigDict], tuple], tuple]] = None


def dense(ours: str, disk: str) -> list[Rule]:
  """A Linear renamed: `ours`.kernel/.bias <-> `disk`.weight (transposed)/.bias (regexes/templates)."""
  return [Rule(ours + r"\.kernel", disk + ".weight", transpose, transpose), Rule(ours + r"\.bias", disk + ".bias")]

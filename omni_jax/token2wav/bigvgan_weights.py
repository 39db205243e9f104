"""BigVGAN tensors between transformers' on-disk names (spec §12, token2wav.code2wav_bigvgan_model.*) and ours.

Our module paths are the on-disk paths (omni_jax/models/bigvgan.py keeps the `ups.i.0` level), so the table is
only leaf renames and kernel layouts: torch Conv1d weights are [out, in, k], ConvTranspose1d weights
[in, out, k], ours are [k, in, out]. The Kaiser filters (`*.upsample.filter`, `*.downsample.filter`) are
non-persistent buffers, never in a checkpoint; they are accepted and ignored on input.
The converter proper (omni_jax/convert) can register RULES with its own prefixes.
"""

import re
from typing import Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni_jax.config import Runtime
from omni_jax.convert.rules import CheckpointMismatch, Rule
from omni_jax.models.bigvgan import BigVGAN, BigVGANConfig

DISK_PREFIX = "token2wav.code2wav_bigvgan_model."


def _conv_to_disk(k):  # [k, in, out] -> [out, in, k]
  return np.ascontiguousarray(np.transpose(k, (2, 1, 0)))


def _transposed_to_disk(k):  # [k, in, out] -> [in, out, k]
  return np.ascontiguousarray(np.transpose(k, (1, 2, 0)))


def _transposed_from_disk(w):  # [in, out, k] -> [k, in, out]
  return np.ascontiguousarray(np.transpose(w, (2, 0, 1)))


def rules(ours_prefix: str = "", disk_prefix: str = DISK_PREFIX) -> list[Rule]:
  """ours regex <-> disk template, for our vocoder at `ours_prefix` and the checkpoint's at `disk_prefix`."""
  o, d = re.escape(ours_prefix), disk_prefix
  return [
      Rule(o + r"(ups\.\d+\.0)\.kernel", d + r"\1.weight", _transposed_to_disk, _transposed_from_disk),
      Rule(o + r"(.*)\.kernel", d + r"\1.weight", _conv_to_disk, _conv_to_disk),  # conv_pre, convs1/2, conv_post
      Rule(o + r"(.*)\.(bias|alpha|beta)", d + r"\1.\2"),
  ]


RULES = rules()
_BUFFERS = re.compile(r".*\.(upsample|downsample)\.filter")


def _flat(state) -> Iterable[tuple[str, nnx.Variable]]:
  for path, var in nnx.to_flat_state(state):
    yield ".".join(str(p) for p in path), var


def _rule(path: str, table: list[Rule]) -> Rule:
  for rule in table:
    if re.fullmatch(rule.ours, path):
      return rule
  raise CheckpointMismatch(f"no BigVGAN mapping rule for parameter {path!r}")


def to_torch(model: nnx.Module, disk_prefix: str = DISK_PREFIX) -> dict[str, np.ndarray]:
  """Our vocoder's parameters as transformers' state dict (float32 numpy, on-disk names)."""
  table = rules("", disk_prefix)
  out = {}
  for path, var in _flat(nnx.state(model, nnx.Param)):
    rule = _rule(path, table)
    out[re.sub(rule.ours, rule.disk, path)] = rule.to_disk(np.asarray(var[...], np.float32))
  return out


def from_torch(cfg: BigVGANConfig, tensors: Mapping[str, np.ndarray], rt: Runtime = Runtime(),
               disk_prefix: str = DISK_PREFIX) -> BigVGAN:
  """Our vocoder built from transformers' state dict, without a random init (built abstract, then filled)."""
  model = nnx.eval_shape(lambda: BigVGAN(cfg, rt, rngs=nnx.Rngs(0)))
  load_torch(model, tensors, disk_prefix)
  return model


def load_torch(model: nnx.Module, tensors: Mapping[str, np.ndarray], disk_prefix: str = DISK_PREFIX) -> None:
  """Set our vocoder's parameters (concrete or abstract) from transformers' state dict (keys with `disk_prefix`;
  other keys, e.g. the DiT's, are ignored). Missing tensors or wrong shapes raise CheckpointMismatch naming
  them."""
  table = rules("", disk_prefix)
  state = nnx.state(model, nnx.Param)
  wanted, problems = set(), []
  for path, var in _flat(state):
    rule = _rule(path, table)
    key = re.sub(rule.ours, rule.disk, path)
    wanted.add(key)
    if key not in tensors:
      problems.append(f"missing {key}")
      continue
    value = rule.from_disk(np.asarray(tensors[key], np.float32))
    if value.shape != var.shape:
      problems.append(f"{key}: shape {tuple(np.shape(tensors[key]))} does not fit our {path} {tuple(var.shape)}")
      continue
    var.value = jnp.asarray(value, var.dtype)
  unexpected = sorted(k for k in tensors if k.startswith(disk_prefix) and k not in wanted and not _BUFFERS.fullmatch(k))
  problems += [f"unexpected {k}" for k in unexpected]
  if problems:
    raise CheckpointMismatch("BigVGAN tensors do not match the config: " + "; ".join(problems[:10])
                             + (f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""))
  nnx.update(model, state)

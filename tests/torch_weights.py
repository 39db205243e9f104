"""transformers' Token2Wav tensors (torch layouts, on-disk names) into our DiT and BigVGAN, and back, for the
parity tests and benches that build a transformers model in memory and need the same weights in ours.

The converter (omni_jax.convert) does this for checkpoints on disk with the towers' rules; these helpers take a
state dict (torch tensors or numpy arrays) and fill a module directly, abstract (nnx.eval_shape) or concrete.

DiT: our attribute paths are the checkpoint's names, so the mapping is a rule, not a table: `a.b.kernel` /
`a.b.embedding` <- `a.b.weight`, `a.b.bias` <- `a.b.bias`; Linear kernels are transposed ([out, in] ->
[in, out]), Conv1d kernels reordered ([out, in, k] -> [k, in, out]); stacked layers (a leading `layers` axis,
models.scan) read `name.N.*` for N = 0 .. layers - 1.
BigVGAN: the conversion rules of omni_jax.token2wav.bigvgan_weights; the Kaiser filters (`*.upsample.filter`,
`*.downsample.filter`) are non-persistent buffers, accepted and ignored on input.
"""

import re
from typing import Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni_jax.config import Runtime
from omni_jax.convert.rules import CheckpointMismatch, Rule
from omni_jax.models.bigvgan import BigVGAN, BigVGANConfig
from omni_jax.token2wav.bigvgan_weights import DISK_PREFIX, rules

# --------------------------------------------------------------------------------------- DiT

STACKED = ("transformer_blocks",)  # the DiT's attributes created with models.scan.create_stacked


def _torch_layout(name: str, value: np.ndarray, ndim: int) -> np.ndarray:
  """A torch tensor in our layout for a parameter of `ndim` dimensions (per layer)."""
  if name != "kernel":
    return value
  if ndim == 2:  # Linear [out, in]
    return value.T
  if ndim == 3:  # Conv1d [out, in, k]
    return np.transpose(value, (2, 1, 0))
  raise ValueError(f"no torch layout rule for a {ndim}-d kernel")


def _torch_name(path: tuple) -> tuple[str, bool]:
  """(the torch key of one of our parameter paths, with {} for the layer index when stacked; stacked?)."""
  parts = [str(p) for p in path]
  leaf = {"kernel": "weight", "embedding": "weight", "bias": "bias"}[parts[-1]]
  stacked = parts[0] in STACKED
  head = [parts[0], "{}"] if stacked else [parts[0]]
  return ".".join(head + parts[1:-1] + [leaf]), stacked


def _torch_shape(name: str, shape: tuple) -> tuple:
  """The torch shape of one (per-layer) parameter of ours."""
  if name == "kernel" and len(shape) == 2:
    return shape[::-1]
  if name == "kernel" and len(shape) == 3:
    return (shape[2], shape[1], shape[0])
  return shape


def dit_torch_shapes(model: nnx.Module) -> dict[str, tuple]:
  """The transformers tensors (on-disk name without prefix -> torch shape) that our DiT holds; works on an
  abstract model (nnx.eval_shape)."""
  out = {}
  for path, var in nnx.state(model, nnx.Param).flat_state():
    key, stacked = _torch_name(path)
    shape = tuple(var.get_value().shape)
    for i in range(shape[0]) if stacked else [None]:
      out[key.format(i) if stacked else key] = _torch_shape(str(path[-1]), shape[1:] if stacked else shape)
  return out


def load_dit(model: nnx.Module, state_dict: Mapping[str, object], prefix: str = "") -> None:
  """Load transformers' DiT tensors (`prefix` + on-disk name, e.g. "token2wav.code2wav_dit_model.") into `model`
  in place. Missing, unused or mis-shaped tensors raise one error listing the keys."""
  tensors = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  tensors = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in tensors.items()}
  params = nnx.state(model, nnx.Param)
  used, missing, bad_shape = set(), [], []
  updates = {}
  for path, var in params.flat_state():
    key, stacked = _torch_name(path)
    shape = tuple(var.get_value().shape)
    if stacked:
      keys = [key.format(i) for i in range(shape[0])]
      if any(k not in tensors for k in keys):
        missing += [k for k in keys if k not in tensors]
        continue
      value = np.stack([_torch_layout(str(path[-1]), tensors[k], len(shape) - 1) for k in keys])
    else:
      keys = [key]
      if key not in tensors:
        missing.append(key)
        continue
      value = _torch_layout(str(path[-1]), tensors[key], len(shape))
    used.update(keys)
    if value.shape != shape:
      bad_shape.append(f"{key}: {tensors[keys[0]].shape} (ours {shape})")
      continue
    updates[path] = value.astype(var.get_value().dtype)
  unused = sorted(set(tensors) - used)
  if missing or unused or bad_shape:
    raise ValueError(f"torch state dict does not fit the model: missing {missing[:8]}, unused {unused[:8]}, "
                     f"mis-shaped {bad_shape[:8]}")
  for path, var in params.flat_state():
    var.set_value(jnp.asarray(updates[path]))
  nnx.update(model, params)


# --------------------------------------------------------------------------------------- BigVGAN

_BUFFERS = re.compile(r".*\.(upsample|downsample)\.filter")


def _flat(state) -> Iterable[tuple[str, nnx.Variable]]:
  for path, var in nnx.to_flat_state(state):
    yield ".".join(str(p) for p in path), var


def _rule(path: str, table: list[Rule]) -> Rule:
  for rule in table:
    if re.fullmatch(rule.ours, path):
      return rule
  raise CheckpointMismatch(f"no BigVGAN mapping rule for parameter {path!r}")


def bigvgan_to_torch(model: nnx.Module, disk_prefix: str = DISK_PREFIX) -> dict[str, np.ndarray]:
  """Our vocoder's parameters as transformers' state dict (float32 numpy, on-disk names)."""
  table = rules("", disk_prefix)
  out = {}
  for path, var in _flat(nnx.state(model, nnx.Param)):
    rule = _rule(path, table)
    out[re.sub(rule.ours, rule.disk, path)] = rule.to_disk(np.asarray(var[...], np.float32))
  return out


def bigvgan_from_torch(cfg: BigVGANConfig, tensors: Mapping[str, np.ndarray], rt: Runtime = Runtime(),
                       disk_prefix: str = DISK_PREFIX) -> BigVGAN:
  """Our vocoder built from transformers' state dict, without a random init (built abstract, then filled)."""
  model = nnx.eval_shape(lambda: BigVGAN(cfg, rt, rngs=nnx.Rngs(0)))
  load_bigvgan(model, tensors, disk_prefix)
  return model


def load_bigvgan(model: nnx.Module, tensors: Mapping[str, np.ndarray], disk_prefix: str = DISK_PREFIX) -> None:
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

"""transformers' Token2Wav tensors (on-disk names, torch layouts) <-> our modules' parameters.

Our attribute paths are the checkpoint's names, so the mapping is a rule, not a table: `a.b.kernel` /
`a.b.embedding` <- `a.b.weight`, `a.b.bias` <- `a.b.bias`; Linear kernels are transposed ([out, in] ->
[in, out]), Conv1d kernels reordered ([out, in, k] -> [k, in, out]); stacked layers (a leading `layers` axis,
models.scan) read `name.N.*` for N = 0 .. layers - 1. The HF converter (omni_jax.convert) is built on this later.
"""

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

STACKED = ("transformer_blocks",)  # attributes created with models.scan.create_stacked


def _torch_layout(name: str, value: np.ndarray, ndim: int) -> np.ndarray:
  """A torch tensor in our layout for a parameter of `ndim` dimensions (per layer)."""
  if name != "kernel":
    return value
  if ndim == 2:  # Linear [out, in]
    return value.T
  if ndim == 3:  # Conv1d [out, in, k]
    return np.transpose(value, (2, 1, 0))
  raise ValueError(f"no torch layout rule for a {ndim}-d kernel")


def torch_names(path: tuple) -> tuple[str, bool]:
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


def torch_shapes(model: nnx.Module) -> dict[str, tuple]:
  """The transformers tensors (on-disk name without prefix -> torch shape) that `model` holds; works on an
  abstract model (nnx.eval_shape)."""
  out = {}
  for path, var in nnx.state(model, nnx.Param).flat_state():
    key, stacked = torch_names(path)
    shape = tuple(var.get_value().shape)
    for i in range(shape[0]) if stacked else [None]:
      out[key.format(i) if stacked else key] = _torch_shape(str(path[-1]), shape[1:] if stacked else shape)
  return out


def from_torch_state_dict(model: nnx.Module, state_dict: Mapping[str, object], prefix: str = "") -> None:
  """Load transformers' tensors (`prefix` + on-disk name, e.g. "token2wav.code2wav_dit_model.") into `model`
  in place. Missing, unused or mis-shaped tensors raise one error listing the keys."""
  tensors = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  tensors = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in tensors.items()}
  params = nnx.state(model, nnx.Param)
  used, missing, bad_shape = set(), [], []
  updates = {}
  for path, var in params.flat_state():
    key, stacked = torch_names(path)
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

"""LoRA: low-rank adapters on chosen dense projections, over a frozen base stored in bf16 or int8.

A targeted `Linear` computes  y = x @ W + scale * dropout(x) @ A @ B  with A [in, r] (PEFT's Kaiming-uniform
start) and B [r, out] (zeros, so a fresh adapter changes nothing). scale = alpha / r, or alpha / sqrt(r) with
rsLoRA. The low-rank path is computed as two thin matmuls, so its gradients cost O(tokens * r * (in + out))
and the base kernel never receives a gradient.

config.lora (absent: no adapters):
  targets     {tower: [patterns]}; a pattern selects a Linear whose dotted path inside the tower fully
              matches it ("model.layers.self_attn.q_proj", "model\\.layers\\..*_proj") or whose last name
              equals it (PEFT's target_modules: "q_proj"). A pattern that selects nothing is a config error.
  rank, alpha, dropout, rslora
  base_dtype  how the frozen base is held: "bfloat16", "float32", or "int8" (weight-only, per output
              channel, for every Linear kernel; dequantised inside each matmul).
  The base is config.init_from (a run records its path and fingerprint as base_path / base_fingerprint).

Every parameter that is not an adapter is frozen (omni_jax.train.state); adapter parameters carry the logical
axes of their kernel with `lora_rank` (replicated) in place of the side they do not share.
"""

import contextlib
import dataclasses
import math
import re
from typing import Any, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx, traverse_util

from omni_jax.errors import ConfigError


BASE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": jnp.int8}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  targets: tuple[tuple[str, tuple[str, ...]], ...]  # (tower, patterns) pairs: hashable for the graphdef
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  rslora: bool = False
  base_dtype: str = "bfloat16"
  # Written by a training run (omni_jax.adapters): the base checkpoint's absolute path and fingerprint, which a
  # resumed run and every loader check.
  base_path: Optional[str] = None
  base_fingerprint: Optional[str] = None

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Optional["LoraConfig"]:
    """The typed view of config.lora, or None when the config has no adapters. Errors name the key."""
    c = config.get("lora")
    if c is None:
      return None
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(c.keys()) - known)
    if unknown:
      raise ConfigError(f"config.lora: unknown keys {unknown}; known: {sorted(known)}")
    targets = c.get("targets")
    if not isinstance(targets, (Mapping, ml_collections.ConfigDict)) or not targets:
      raise ConfigError(f"config.lora.targets: must map tower names to module patterns, got {targets!r}")
    pairs = []
    for tower, patterns in targets.items():
      patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
      if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(f"config.lora.targets.{tower}: expected a list of module patterns, got {patterns!r}")
      for p in patterns:
        try:
          re.compile(p)
        except re.error as e:
          raise ConfigError(f"config.lora.targets.{tower}: {p!r} is not a regular expression ({e})") from None
      pairs.append((str(tower), patterns))
    out = cls(targets=tuple(pairs), **{k: c[k] for k in known - {"targets"} if k in c})
    ok_rank = isinstance(out.rank, int) and not isinstance(out.rank, bool) and out.rank > 0
    if not ok_rank:
      raise ConfigError(f"config.lora.rank: must be a positive integer, got {out.rank!r}")
    if not (isinstance(out.alpha, (int, float)) and out.alpha > 0):
      raise ConfigError(f"config.lora.alpha: must be a number > 0, got {out.alpha!r}")
    if not (isinstance(out.dropout, (int, float)) and 0 <= out.dropout < 1):
      raise ConfigError(f"config.lora.dropout: must be in [0, 1), got {out.dropout!r}")
    if out.base_dtype not in BASE_DTYPES:
      raise ConfigError(f"config.lora.base_dtype: {out.base_dtype!r}; choose one of {sorted(BASE_DTYPES)}")
    return out


# ------------------------------------------------------------------------------------- forward switches

_DISABLED = [0]
_DROPOUT_KEYS: list = []


@contextlib.contextmanager
def disabled() -> Iterator[None]:
  """Inside: every adapted Linear computes its base projection only (the adapter-free model, e.g. the frozen
  reference of preference tuning, without a second copy of the weights)."""
  _DISABLED[0] += 1
  try:
    yield
  finally:
    _DISABLED[0] -= 1


@contextlib.contextmanager
def dropout_key(key: Optional[jax.Array]) -> Iterator[None]:
  """Inside: adapter dropout draws its masks from `key` (training). Outside, or with None: no dropout."""
  _DROPOUT_KEYS.append(key)
  try:
    yield
  finally:
    _DROPOUT_KEYS.pop()


@contextlib.contextmanager
def layer(index: jax.Array) -> Iterator[None]:
  """Inside one layer of a scanned stack: its dropout masks differ from the other layers' (same modules)."""
  if not _DROPOUT_KEYS or _DROPOUT_KEYS[-1] is None:
    yield
    return
  with dropout_key(jax.random.fold_in(_DROPOUT_KEYS[-1], index)):
    yield


class Adapter(nnx.Module):
  """The low-rank pair (a [..., in, r], b [..., r, out]) of one Linear; leading axes follow its kernel."""

  def __init__(self, kernel: nnx.Param, cfg: LoraConfig, key: jax.Array, uid: int):
    *lead, d_in, d_out = kernel.shape
    meta = kernel.get_metadata()
    names = tuple(meta.get("out_sharding") or (None,) * kernel.ndim)
    units = tuple(meta.get("shard_units") or (1,) * kernel.ndim)
    bound = 1.0 / math.sqrt(d_in)  # PEFT: kaiming_uniform(a=sqrt(5)) on lora_A
    a = jax.random.uniform(key, (*lead, d_in, cfg.rank), jnp.float32, -bound, bound)
    b = jnp.zeros((*lead, cfg.rank, d_out), jnp.float32)
    self.a = _param(a, names[:-1] + ("lora_rank",), units[:-1] + (1,))
    self.b = _param(b, names[:-2] + ("lora_rank", names[-1]), units[:-2] + (1, units[-1]))
    self.scale, self.rate, self.uid = cfg.scale, float(cfg.dropout), uid

  def __call__(self, x: jax.Array, dtype) -> Optional[jax.Array]:
    """The adapter's addition to the Linear's output, or None while adapters are disabled."""
    if _DISABLED[0]:
      return None
    x = x.astype(dtype)
    key = _DROPOUT_KEYS[-1] if _DROPOUT_KEYS else None
    if self.rate > 0 and key is not None:
      keep = jax.random.bernoulli(jax.random.fold_in(key, self.uid), 1.0 - self.rate, x.shape)
      x = jnp.where(keep, x / (1.0 - self.rate), 0).astype(dtype)
    h = jnp.dot(x, self.a[...].astype(dtype))
    return jnp.dot(h, self.b[...].astype(dtype)) * jnp.asarray(self.scale, dtype)


def _param(value, names, units) -> nnx.Param:
  extra = {"shard_units": tuple(units)} if any(u != 1 for u in units) else {}
  return nnx.Param(value, sharding_names=tuple(names), eager_sharding=False, **extra)


# ------------------------------------------------------------------------------------------- building

def _linears(module: nnx.Module) -> Iterator[tuple[tuple, nnx.Module]]:
  from omni_jax.layers.linear import Linear  # local: linear.py imports this module

  for path, node in nnx.iter_graph(module):
    if isinstance(node, Linear):
      yield tuple(str(p) for p in path), node


def _selects(pattern: str, relative: tuple) -> bool:
  return re.fullmatch(pattern, ".".join(relative)) is not None or re.fullmatch(pattern, relative[-1]) is not None


def targeted(model: nnx.Module, cfg: LoraConfig) -> list[tuple[tuple, nnx.Module]]:
  """(path, Linear) of every projection cfg adapts; a tower or pattern that selects nothing is an error."""
  linears = list(_linears(model))
  chosen, seen = [], set()
  for tower, patterns in cfg.targets:
    if not hasattr(model, tower):
      raise ConfigError(f"config.lora.targets.{tower}: the model builds no tower {tower!r}")
    inside = [(p, m) for p, m in linears if p[0] == tower]
    for pattern in patterns:
      hits = [(p, m) for p, m in inside if _selects(pattern, p[1:])]
      if not hits:
        example = ".".join(inside[0][0][1:]) if inside else "-"
        raise ConfigError(f"config.lora.targets.{tower}: {pattern!r} selects no dense projection (their paths "
                          f"inside the tower look like {example!r})")
      for p, m in hits:
        if p not in seen:
          seen.add(p)
          chosen.append((p, m))
  return chosen


def _quantize(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 per output channel: w ~= q * s, q int8 [..., in, out], s float32 [..., out]."""
  w = w.astype(jnp.float32)
  s = jnp.max(jnp.abs(w), axis=-2) / 127.0
  s = jnp.where(s > 0, s, 1.0)
  q = jnp.clip(jnp.round(w / s[..., None, :]), -127, 127).astype(jnp.int8)
  return q, s


def attach(model: nnx.Module, cfg: LoraConfig, rngs: nnx.Rngs) -> None:
  """Give the targeted Linears their adapters and store every base parameter as cfg.base_dtype."""
  if cfg.base_dtype == "int8":
    for _, linear in _linears(model):
      q, s = _quantize(linear.kernel[...])
      meta = linear.kernel.get_metadata()
      names = tuple(meta.get("out_sharding") or (None,) * q.ndim)
      units = tuple(meta.get("shard_units") or (1,) * q.ndim)
      linear.kernel = _param(q, names, units)
      linear.kernel_scale = _param(s, names[:-2] + names[-1:], units[:-2] + units[-1:])
  base = BASE_DTYPES[cfg.base_dtype] if cfg.base_dtype != "int8" else jnp.bfloat16
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param) and jnp.issubdtype(var.dtype, jnp.floating):
      var.value = var.value.astype(base)
  key = rngs.params()
  for uid, (_, linear) in enumerate(targeted(model, cfg)):
    linear.lora = Adapter(linear.kernel, cfg, jax.random.fold_in(key, uid), uid)


# ------------------------------------------------------------------------------------ parameter trees

def is_adapter(path: tuple) -> bool:
  return "lora" in tuple(str(p) for p in path)


def adapters(params: Mapping) -> dict:
  """The adapter leaves of a nested parameter dict (what a LoRA checkpoint stores)."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if is_adapter(k)})


def without_adapters(params: Mapping) -> dict:
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_adapter(k)})


def dequantized(params: Mapping, dtype=jnp.float32) -> dict:
  """Base parameters in `dtype` with int8 kernels dequantised and their scales dropped (adapters kept)."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for k, v in flat.items():
    if k[-1] == "kernel_scale":
      continue
    scale = flat.get(k[:-1] + ("kernel_scale",)) if k[-1] == "kernel" else None
    if scale is not None:
      v = jnp.asarray(v, dtype) * jnp.asarray(scale, dtype)[..., None, :]
    elif jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating) and not is_adapter(k):
      v = jnp.asarray(v, dtype)
    out[k] = v
  return traverse_util.unflatten_dict(out)


def merge(params: Mapping, cfg: LoraConfig, dtype=jnp.float32) -> dict:
  """The parameters of the same model without adapters: kernel = dequant(kernel) + scale * a @ b."""
  flat = traverse_util.flatten_dict(dequantized(params, dtype))
  out = {}
  for k, v in flat.items():
    if is_adapter(k):
      continue
    if k[-1] == "kernel" and k[:-1] + ("lora", "a") in flat:
      a = jnp.asarray(flat[k[:-1] + ("lora", "a")], jnp.float32)
      b = jnp.asarray(flat[k[:-1] + ("lora", "b")], jnp.float32)
      v = (jnp.asarray(v, jnp.float32) + cfg.scale * jnp.matmul(a, b)).astype(dtype)
    out[k] = v
  return traverse_util.unflatten_dict(out)


def base_layout(params: Mapping, abstract: Mapping) -> dict:
  """Float base parameters (a checkpoint of the model without adapters) in the layout of `abstract` (the
  adapted model's abstract base): cast to its dtypes, int8 kernels quantised with their scales."""
  flat, want = traverse_util.flatten_dict(params), traverse_util.flatten_dict(abstract)
  out = {}
  for k, target in want.items():
    if is_adapter(k) or k[-1] == "kernel_scale":
      continue
    if target.dtype == jnp.int8 and k[-1] == "kernel":
      scale_key = k[:-1] + ("kernel_scale",)
      out[k], scale = _quantize(jnp.asarray(flat[k]))
      out[scale_key] = scale.astype(want[scale_key].dtype)
    else:
      out[k] = jnp.asarray(flat[k]).astype(target.dtype)
  return traverse_util.unflatten_dict(out)


def nbytes(tree: Any) -> int:
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

"""Checkpoints of LoRA runs: the adapters only, with a pointer to the frozen base and the base's fingerprint.

A LoRA run (config.lora, omni_jax.layers.lora) never writes its base: each step stores the adapters (and their
optimizer state), and the step's config records config.lora.base_path (the absolute config.init_from) and
config.lora.base_fingerprint. Resuming reloads the base from that path and refuses a base whose fingerprint
changed; loaders (generate, evaluate, convert, serve) rebuild base + adapters, merged by default.

The fingerprint is a hash of every base parameter's bits, computed on the devices in an order-independent way
(wrapping integer sums), so it is the same on any mesh and any number of processes.
"""

import hashlib
import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, traverse_util

from omni_jax import checkpoint
from omni_jax.errors import ConfigError
from omni_jax.layers import lora
from omni_jax.models import omni

log = logging.getLogger(__name__)


@jax.jit
def _leaf_sums(leaves: list) -> list:
  def one(x):
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
    bits = bits.reshape(-1).astype(jnp.uint32)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])

  return [one(x) for x in leaves]


def fingerprint(params: dict) -> str:
  """A hex digest of the parameters' paths, shapes, dtypes and bits (adapters excluded)."""
  flat = sorted((k, v) for k, v in traverse_util.flatten_dict(params).items() if not lora.is_adapter(k))
  sums = jax.device_get(_leaf_sums([v for _, v in flat]))
  h = hashlib.sha256()
  for (k, v), s in zip(flat, sums):
    h.update(f"{'.'.join(map(str, k))}:{tuple(v.shape)}:{jnp.dtype(v.dtype).name}:{int(s[0])}:{int(s[1])};".encode())
  return h.hexdigest()[:32]


def base_target(abstract_base: dict) -> dict:
  """The restore target of a float checkpoint for the base's layout: int8 kernels are read as bfloat16 (then
  quantised) and their scales are not on disk."""
  flat = traverse_util.flatten_dict(abstract_base)
  out = {}
  for k, v in flat.items():
    if lora.is_adapter(k) or k[-1] == "kernel_scale":
      continue
    dtype = jnp.bfloat16 if v.dtype == jnp.int8 else v.dtype
    out[k] = jax.ShapeDtypeStruct(v.shape, dtype, sharding=getattr(v, "sharding", None))
  return traverse_util.unflatten_dict(out)


def load_base(path: str, abstract_params: dict, shardings: Optional[dict] = None) -> dict:
  """The base parameters stored at `path` (a converter output, step directory or workdir) in the adapted
  model's base layout (dtypes of config.lora.base_dtype, int8 kernels quantised), placed by `shardings`."""
  params_path = checkpoint.params_dir(path)
  abstract = lora.without_adapters(abstract_params)
  if shardings is not None:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                            lora.without_adapters(shardings))
  stored = checkpoint.restore_pure(params_path, base_target(abstract))
  if shardings is None:
    return lora.base_layout(stored, abstract)
  # On the devices, each parameter cast (or quantised) where its shards lie.
  return jax.jit(lambda x: lora.base_layout(x, abstract), out_shardings=lora.without_adapters(shardings))(stored)


def init_adapters(config: ml_collections.ConfigDict, shardings: dict, seed: Optional[int] = None) -> dict:
  """Fresh adapters (b = 0) in their sharded layout; the base's random initialisation is never computed
  (XLA drops what the program does not return)."""
  seed = config.get("seed", 0) if seed is None else seed
  out_shardings = lora.adapters(shardings)

  @jax.jit(out_shardings=out_shardings)
  def init():
    return lora.adapters(nnx.to_pure_dict(nnx.split(omni.OmniModel(config, rngs=nnx.Rngs(seed)))[1]))

  return init()


def record_base(config: ml_collections.ConfigDict, path: Optional[str], digest: str) -> ml_collections.ConfigDict:
  """config with config.lora.base_path / base_fingerprint set (what every checkpoint of the run stores)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.lora.base_path = None if path is None else os.path.abspath(os.path.expanduser(path))
    config.lora.base_fingerprint = digest
  return config


def check_base(step_dir: str, digest: str) -> None:
  """Refuse to resume adapters trained over another base (the step's config records its fingerprint)."""
  where = checkpoint.find_config(step_dir)
  if where is None:
    return
  stored = checkpoint.load_config(where).get("lora") or {}
  want = stored.get("base_fingerprint")
  if want and want != digest:
    raise ConfigError(f"{step_dir}: its adapters were trained over the base {stored.get('base_path')} with "
                      f"fingerprint {want}; the base loaded now has fingerprint {digest}. Resume with that base "
                      f"(config.init_from), or start a new --workdir.")


def is_lora(config: ml_collections.ConfigDict) -> bool:
  return config.get("lora") is not None


def without_lora(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  with config.unlocked():
    del config["lora"]
  return config


def restore_adapters(params_path: str, config: ml_collections.ConfigDict) -> dict:
  """The adapters a LoRA checkpoint stores under params/ (nested dict of host arrays), without its base."""
  _, abstract = omni.abstract_model(config)
  stored = checkpoint.restore_pure(params_path, lora.adapters(nnx.to_pure_dict(abstract)))
  return jax.tree.map(np.asarray, stored)


def restore_merged(params_path: str, config: ml_collections.ConfigDict, base: Optional[str] = None,
                   dtype=jnp.float32) -> tuple[ml_collections.ConfigDict, dict]:
  """(config without adapters, merged parameters) of a LoRA checkpoint: the base from `base` (default: the
  path the run recorded), its fingerprint checked, the adapters folded into its kernels (host memory)."""
  cfg = lora.LoraConfig.from_config(config)
  base = base or cfg.base_path or config.get("init_from")
  _, abstract = omni.abstract_model(config)
  abstract_params = nnx.to_pure_dict(abstract)
  if base is None:
    raise ConfigError(f"{params_path}: a LoRA checkpoint whose config names no base (config.lora.base_path); "
                      f"pass the base checkpoint")
  params = load_base(base, abstract_params)
  digest = fingerprint(params)
  if cfg.base_fingerprint and cfg.base_fingerprint != digest:
    raise ConfigError(f"{params_path}: its adapters were trained over a base with fingerprint "
                      f"{cfg.base_fingerprint}; {base} has fingerprint {digest}")
  both = {**traverse_util.flatten_dict(params), **traverse_util.flatten_dict(restore_adapters(params_path, config))}
  # On the host: the restored arrays may sit on different devices (each as its checkpoint was written).
  merged = lora.merge(traverse_util.unflatten_dict({k: np.asarray(v) for k, v in both.items()}), cfg, dtype)
  log.info("%s: adapters merged into the base %s", params_path, base)
  return without_lora(config), jax.tree.map(np.asarray, merged)

"""Lower and compile the real train step for a topology, on abstract inputs (no accelerator needed).

The TPU devices come from libtpu's topology description (jax.experimental.topologies), as MaxText's
train_compile does; the mesh, the train state's shardings and the step are the ones train.py builds
(omni_jax.sharding.make_mesh, omni_jax.train.state.Setup, omni_jax.train.step.jit_for_layout).
"""

import copy
import dataclasses
import importlib.util
import logging
import math
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from omni_jax import batch as batch_lib
from omni_jax import sharding, sizes, towers
from omni_jax.aot import hardware
from omni_jax.talker import layout as talker_layout
from omni_jax.train import state as state_lib
from omni_jax.train import step as step_lib

log = logging.getLogger(__name__)

# Media per row of the representative multimodal batch when config.data.buckets sets no media limits:
# one image of 1024 patches (256 merged tokens, ~448x448 pixels) and one 30 s audio clip.
DEFAULT_MEDIA = dict(max_images=1, max_image_patches=1024, max_audios=1, max_audio_frames=3000)


class TpuUnavailable(RuntimeError):
  """libtpu (the `tpu` extra) is not installed, so no TPU topology can be described."""


class DoesNotFit(RuntimeError):
  """The compiler ran out of device memory. .partial: the Compiled without a program (for the buffer lists)."""

  def __init__(self, message: str, partial: "Compiled"):
    super().__init__(message)
    self.partial = partial


def gpu_devices(topology: hardware.Topology) -> Optional[list]:
  """XLA:GPU's compile-only devices for `topology`'s GPUs (one node), described by
  hardware.gpu_target_config: no GPU needed. None when jax's CUDA plugin is not installed (or its start-up
  checks for CUDA libraries failed, which JAX_PLATFORMS=cpu skips)."""
  from jax.experimental import topologies

  try:
    desc = topologies.get_topology_desc(topology.chip.name, "cuda", topology=f"1x1x{topology.num_chips}",
                                        target_config=hardware.gpu_target_config(topology.chip))
  except NotImplementedError:
    return None
  except Exception as e:  # noqa: BLE001 - the plugin's message says what it rejects
    raise hardware.TopologyError(f"--topology {topology.spec}: XLA:GPU rejects it: {' '.join(str(e).split())[:300]}") \
        from None
  return list(desc.devices)


def compiles_for_gpu(devices: list) -> bool:
  """Whether `devices` are XLA:GPU's (real or compile-only), not CPU devices standing in for GPUs."""
  return bool(devices) and devices[0].platform == "gpu"


def devices_for(topology: hardware.Topology) -> list:
  """The devices to compile for: libtpu's for a TPU slice, XLA:GPU's compile-only ones for GPUs when jax's
  CUDA plugin is installed (else as many CPU devices, standing in), the local CPU devices for cpu:N."""
  if topology.chip is not None and topology.chip.platform == "gpu":
    devices = gpu_devices(topology)
    if devices is not None:
      return devices
    log.info("%s: jax's CUDA plugin is not installed (pip install \"jax[cuda13-local]\"; JAX_PLATFORMS=cpu on a "
             "host without a GPU), so CPU devices stand in for the GPUs", topology.spec)
  if topology.on_cpu:
    n = topology.shape[0]
    cpus = jax.devices("cpu")
    if len(cpus) < n:
      raise hardware.TopologyError(f"--topology {topology.spec}: {len(cpus)} CPU devices present; set "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")
    return cpus[:n]
  if importlib.util.find_spec("libtpu") is None:
    raise TpuUnavailable("libtpu is not installed (pip install -e '.[tpu]'), so TPU topologies cannot be "
                         "compiled for; --topology cpu:N compiles for local CPU devices")
  # Compile-only: no TPU is opened, so other processes holding libtpu's lockfile are no obstacle.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # local: needs libtpu

  kwargs = {"chip_config_name": topology.chip.chip_config}
  if topology.num_slices > 1:
    kwargs["num_slices"] = topology.num_slices
  if topology.num_chips // topology.num_slices < 4:  # smaller than one 2x2 host (v5e:1x1, v6e:2x1)
    kwargs["chips_per_host_bounds"] = tuple(topology.shape) + (1,) * (3 - len(topology.shape))
  try:
    desc = topologies.get_topology_desc(topology.libtpu_name, "tpu", **kwargs)
  except Exception as e:  # noqa: BLE001 - libtpu's message says what is wrong with the name
    raise hardware.TopologyError(f"--topology {topology.spec}: libtpu rejects it: {' '.join(str(e).split())[:300]}") from None
  return list(desc.devices)


def _image_grid(patches: int, merge: int) -> tuple[int, int, int]:
  """(t, h, w) with h, w multiples of the merge size and h * w <= patches, as square as possible."""
  h = max(merge, int(math.sqrt(patches)) // merge * merge)
  w = max(merge, patches // h // merge * merge)
  return 1, h, w


def media_limits(config: ml_collections.ConfigDict) -> dict:
  """Per-row media maxima: the largest config.data.buckets entry that has any, else DEFAULT_MEDIA."""
  buckets = [dict(b) for b in (config.get("data", {}).get("buckets") or ())]
  with_media = [b for b in buckets if any(b.get(k) for k in DEFAULT_MEDIA)]
  if with_media:
    b = max(with_media, key=lambda b: b.get("seq_len", 0))
    return {k: int(b.get(k, 0)) for k in DEFAULT_MEDIA}
  return dict(DEFAULT_MEDIA)


def representative_batch(config: ml_collections.ConfigDict, media: bool = False) -> tuple[dict, dict]:
  """(shapes, host metadata): ShapeDtypeStructs of one global batch of config.train.batch_size rows x
  config.train.seq_len tokens (omni_jax.batch's contract), and the numpy grids / lengths that the FLOPs
  formula reads (every media buffer full). media: add images and audio (the towers the config builds)."""
  b, l = int(config.train.batch_size), int(config.train.seq_len)
  shapes = {k: jax.ShapeDtypeStruct((b, l), jnp.int32) for k in batch_lib.TEXT_FIELDS}
  meta = {"input_ids": np.zeros((b, l), np.int32)}
  objectives = dict(config.train.get("objectives", {}))
  dpo = config.get("dpo", None) is not None
  if dpo:  # preference pairs (omni_jax.batch): their numbering on the Thinker's tokens
    shapes["dpo_pair"] = jax.ShapeDtypeStruct((b, l), jnp.int32)
  if config.model.get("talker") is not None and (objectives.get("talker_codes", 0) or objectives.get("talker_dpo", 0)):
    # The Talker trains: its rows (omni_jax.talker.layout.FIELDS), as long as a bucket allows, else seq_len.
    t = max([int(dict(b_).get("talker_seq_len", 0)) for b_ in (config.get("data", {}).get("buckets") or ())]
            or [0]) or l
    shapes.update({k: jax.ShapeDtypeStruct((b, t), jnp.int32) for k in talker_layout.FIELDS})
    if dpo:
      shapes["talker_dpo_pair"] = jax.ShapeDtypeStruct((b, t), jnp.int32)
  if not media:
    return shapes, meta
  thinker = config.model.thinker
  limits = media_limits(config)
  shapes["use_audio_in_video"] = jax.ShapeDtypeStruct((b,), jnp.bool_)
  vision, audio = thinker.get("vision"), thinker.get("audio")
  if vision is not None and limits["max_images"]:
    n, p = limits["max_images"], limits["max_image_patches"]
    dim = sizes.patch_dim(vision.in_channels, vision.temporal_patch_size, vision.patch_size)
    shapes["pixel_values"] = jax.ShapeDtypeStruct((b, p, dim), jnp.float32)
    shapes["image_grid_thw"] = jax.ShapeDtypeStruct((b, n, 3), jnp.int32)
    meta["image_grid_thw"] = np.tile(np.asarray(_image_grid(p // n, vision.spatial_merge_size), np.int32), (b, n, 1))
  if audio is not None and limits["max_audios"]:
    n, frames = limits["max_audios"], limits["max_audio_frames"]
    shapes["audio_features"] = jax.ShapeDtypeStruct((b, n, audio.num_mel_bins, frames), jnp.float32)
    shapes["audio_lengths"] = jax.ShapeDtypeStruct((b, n), jnp.int32)
    meta["audio_lengths"] = np.full((b, n), frames, np.int32)
  return shapes, meta


@dataclasses.dataclass
class Compiled:
  """A compiled train step and what it was compiled from."""
  compiled: Any  # jax.stages.Compiled (None when it did not fit)
  lowered: Any  # jax.stages.Lowered
  setup: state_lib.Setup
  mesh: jax.sharding.Mesh
  batch_shapes: dict
  batch_meta: dict
  seconds: float


def compile_train_step(config: ml_collections.ConfigDict, devices: list, media: bool = False) -> Compiled:
  """Lower + compile the train step of `config` for `devices` (real or from a topology description).

  Raises DoesNotFit when the compiler runs out of device memory (its message lists the biggest buffers)."""
  import time

  if config.get("require_init_from", False) and not config.get("init_from"):
    # Compile-only: no weights are read, so a fine-tuning recipe's starting checkpoint is not needed.
    config = copy.deepcopy(config)
    with config.unlocked():
      config.require_init_from = False
  towers.validate(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  setup = state_lib.Setup(config, mesh)
  shapes, meta = representative_batch(config, media)
  b_shard = step_lib.batch_shardings(shapes, mesh, config.sharding_rules)
  batch_in = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_shard[k]) for k, v in shapes.items()}
  jitted = step_lib.jit_for_layout(setup, batch_in)  # what jit_train_step compiles per batch layout
  start = time.perf_counter()
  # The mesh's device kind (an H200's, say) for the lowering rules that ask which chip they compile for:
  # Pallas' Triton lowering in jax >= 0.11 asks the context's abstract mesh, then the default device (a CPU here).
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    lowered = jitted.lower(setup.abstract_with_shardings(), batch_in)
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 - only an out-of-memory error is a result; others propagate
    from omni_jax.aot import hlo

    oom = hlo.oom_summary(str(e))
    if oom is None:
      raise
    raise DoesNotFit(oom, Compiled(None, lowered, setup, mesh, shapes, meta, time.perf_counter() - start)) from None
  return Compiled(compiled, lowered, setup, mesh, shapes, meta, time.perf_counter() - start)


def argument_buffers(c: Compiled) -> list[tuple[str, float]]:
  """(name, bytes per chip) of every input buffer: state leaves by path, batch fields by name."""
  out = []
  state = c.setup.abstract_with_shardings()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    shard = leaf.sharding.shard_shape(leaf.shape)
    name = ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    out.append((name, float(np.prod(shard, dtype=np.float64) * np.dtype(leaf.dtype).itemsize)))
  b_shard = step_lib.batch_shardings(c.batch_shapes, c.mesh, c.setup.config.sharding_rules)
  for k, v in c.batch_shapes.items():
    shard = b_shard[k].shard_shape(v.shape)
    out.append((f"batch.{k}", float(np.prod(shard, dtype=np.float64) * np.dtype(v.dtype).itemsize)))
  return out


def model_flops(c: Compiled) -> float:
  """The documented FLOPs formula (omni_jax.train.metrics.FlopCounter) for one step on the batch."""
  from flax import traverse_util
  from omni_jax.train import metrics

  paths = tuple(traverse_util.flatten_dict(c.setup.abstract_params))
  return metrics.FlopCounter(c.setup.config, c.setup.frozen, paths).step_flops(c.batch_meta)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Optional[dict]) -> ml_collections.ConfigDict:
  """A copy of config with dotted keys set ({"model.remat_policy": "dots", ...}); unknown keys name the key."""
  config = copy.deepcopy(config)
  for key, value in (overrides or {}).items():
    node = config
    parts = key.split(".")
    for p in parts[:-1]:
      if p not in node:
        raise KeyError(f"config.{key}: no such key")
      node = node[p]
    if parts[-1] not in node:
      raise KeyError(f"config.{key}: no such key")
    node[parts[-1]] = value
  return config

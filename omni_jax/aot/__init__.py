"""Ahead-of-time compilation of the train step for a TPU topology (or GPUs) from a host without accelerators.

  python -m omni_jax.aot --config configs/qwen2_5_omni_7b.py --topology v5p:4x4x4 [--config.key=value ...]
  python -m omni_jax.aot --config configs/qwen2_5_omni_7b.py --topology h100:8 --config.mesh.fsdp=-1

analyse(config, "v5p:4x4x4") returns a report.Report: per-chip HBM (arguments, outputs, temporaries vs the
chip's capacity), compiled FLOPs and bytes, the collectives with their sizes, a roofline step time and MFU.
"""

import copy
import logging

import ml_collections

from omni_jax.aot import compile as compile_lib
from omni_jax.aot import hardware, report
from omni_jax.aot.compile import DoesNotFit
from omni_jax.errors import ConfigError

log = logging.getLogger(__name__)


def without_towers(config: ml_collections.ConfigDict, names) -> ml_collections.ConfigDict:
  """A copy of config without the config.model.<name> sections (towers it then does not build) and without
  their objectives in config.train.objectives."""
  if not names:
    return config
  from omni_jax import towers

  def objective_names(c):
    return {o.name for t in towers.built(c) for o in t.objectives}

  before = objective_names(config)
  config = copy.deepcopy(config)
  with config.unlocked():
    for name in names:
      if name not in config.model or name == "thinker":
        raise ConfigError(f"--without={name}: config.model has no removable tower {name!r}")
      del config.model[name]
    gone = before - objective_names(config)
    objectives = config.train.get("objectives", None)
    for name in gone:
      if objectives is not None and name in objectives:
        del objectives[name]
  return config


def analyse(config: ml_collections.ConfigDict, topology: str, num_slices: int = 1,
            media: bool = False) -> report.Report:
  """Compile config's train step for `topology` ('v5p:4x4x4', 'v5e:2x2', 'h100:8', 'cpu:4') and report on it."""
  topo = hardware.parse(topology, num_slices)
  devices = compile_lib.devices_for(topo)
  if (topo.chip is not None and topo.chip.platform == "gpu" and not compile_lib.compiles_for_gpu(devices)
      and config.model.get("attention_impl") == "auto"):
    # On the CPU stand-in "auto" would pick dense attention for small calls; the GPU's kernel keeps O(L)
    # memory as the blocked path does.
    config = compile_lib.apply_overrides(config, {"model.attention_impl": "blocked"})
  try:
    compiled = compile_lib.compile_train_step(config, devices, media)
  except DoesNotFit as e:
    return report.does_not_fit(e.partial, topo, str(e))
  return report.build(compiled, topo)

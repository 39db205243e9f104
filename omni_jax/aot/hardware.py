"""Per-chip figures of the TPU generations the AOT report knows, and topology names ("v5p:4x4x4"). Peak FLOP/s
and HBM bandwidth are omni_jax.datasheets' (by jax's device_kind); capacity and ICI are here.

Sources (Cloud TPU system-architecture pages, cloud.google.com/tpu/docs/<v4|v5e|v5p|v6e>):
  v4   275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s; ICI: the pod's 1.1 PB/s all-reduce bandwidth / 4096 chips
  v5e  197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, 400 GB/s bidirectional ICI per chip (XLA's TPU compiler
       reports 15.75 GiB of it usable, so the capacity is taken as 16 GiB)
  v5p  459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s, 1200 GB/s bidirectional ICI per chip
  v6e  918 TFLOP/s bf16, 32 GB HBM at 1640 GB/s, 800 GB/s bidirectional ICI per chip (32 GiB, as for v5e)
The ICI figure is only used for a rough collective-time estimate (omni_jax.aot.report).

NVIDIA GPUs ("h100:8": eight GPUs of a node) are planned without one. With jax's CUDA plugin installed
(`pip install "jax[cuda13-local]"`: the plugin alone, no CUDA libraries), XLA:GPU compiles for them on any host
from a description of the GPU (`gpu_target_config`: SMs, clocks, memories and compute capability from NVIDIA's
datasheets and CUDA's per-architecture limits), Triton and Pallas kernels included: the report then has XLA:GPU's
own fusion, kernels and buffer assignment. Without the plugin the step is compiled for as many CPU devices,
whose buffer assignment stands in for the GPU's. Either way it is judged against the GPU's HBM (datasheet: 80 GB
for H100 / A100, 141 GB for H200; NVLink 900 / 600 GB/s).
"""

import dataclasses
import re
from typing import Optional

from omni_jax import datasheets

GIB, GB = 2 ** 30, 10 ** 9


class TopologyError(ValueError):
  """A --topology / --num_slices value that names no slice (the message names the flag)."""


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  device_kind: str  # jax's device_kind: its peak FLOP/s and HBM bandwidth come from omni_jax.datasheets
  hbm_bytes: float
  ici_bandwidth: float  # bytes/s, bidirectional, per chip
  chip_config: str = "default"  # libtpu's chip_config_name: "megacore" for the two-TensorCore chips
  dims: int = 2  # topology dimensions (2D torus or 3D)
  platform: str = "tpu"  # "gpu": compiled by XLA:GPU without one, or for CPU devices standing in (module doc)
  gpu: Optional["GpuSpec"] = None  # what XLA:GPU needs to know of an NVIDIA GPU to compile for it

  @property
  def peak_flops(self) -> float:  # dense bf16 FLOP/s
    return datasheets.PEAK_FLOPS[self.device_kind]

  @property
  def hbm_bandwidth(self) -> float:  # bytes/s
    return datasheets.HBM_BANDWIDTH[self.device_kind]


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  """An NVIDIA GPU as XLA:GPU's compiler sees it (its GpuTargetConfigProto): what shapes its fusion, tiling and
  Triton kernels. Of the rest of the proto, cuDNN is taken as 9.10 (it decides which cuDNN fusions XLA may
  emit); driver versions do not change the program."""
  sm_count: int
  clock_ghz: float  # boost clock
  compute_capability: tuple[int, int]
  l2_bytes: int
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int
  fp32_units_per_sm: int
  arch_specific: bool = False  # sm_90a: Hopper's wgmma / TMA instructions, which Triton's kernels use


def gpu_target_config(chip: Chip) -> str:
  """The text GpuTargetConfigProto of `chip` that XLA:GPU compiles against without a device."""
  g = chip.gpu
  major, minor = g.compute_capability
  info = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=48 * 1024,
              shared_memory_per_core=g.shared_memory_per_sm, threads_per_core_limit=2048, core_count=g.sm_count,
              fpus_per_core=g.fp32_units_per_sm, block_dim_limit_x=2 ** 31 - 1, block_dim_limit_y=65535,
              block_dim_limit_z=65535, memory_bandwidth=int(chip.hbm_bandwidth), l2_cache_size=g.l2_bytes,
              clock_rate_ghz=g.clock_ghz, device_memory_size=int(chip.hbm_bytes),
              shared_memory_per_block_optin=g.shared_memory_per_block_optin, registers_per_core_limit=65536,
              registers_per_block_limit=65536)
  fields = "\n".join(f"  {k}: {v}" for k, v in info.items())
  extension = " feature_extension: ACCELERATED_FEATURES" if g.arch_specific else ""
  capability = f"cuda_compute_capability {{ major: {major} minor: {minor}{extension} }}"
  return (f"gpu_device_info {{\n{fields}\n  {capability}\n}}\n"
          f'platform_name: "CUDA"\ndnn_version_info {{ major: 9 minor: 10 patch: 0 }}\n'
          f'device_description_str: "{chip.device_kind}"\n')


CHIPS = {
    "v4": Chip("v4", "TPU v4", 32 * GIB, 1.1e15 / 4096, chip_config="megacore", dims=3),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GIB, 400 * GB),
    "v5p": Chip("v5p", "TPU v5p", 95 * GIB, 1200 * GB, chip_config="megacore", dims=3),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GIB, 800 * GB),
}
# SXM parts: 132 / 108 SMs, 50 / 40 MB of L2, 228 / 164 KiB of shared memory per SM (227 / 163 KiB for one block).
_HOPPER = dict(sm_count=132, clock_ghz=1.98, compute_capability=(9, 0), l2_bytes=50 * 2 ** 20,
               shared_memory_per_sm=228 * 1024, shared_memory_per_block_optin=227 * 1024, fp32_units_per_sm=128,
               arch_specific=True)
GPUS = {
    "h100": Chip("h100", "NVIDIA H100 80GB HBM3", 80 * GB, 900 * GB, dims=1, platform="gpu",
                 gpu=GpuSpec(**_HOPPER)),
    "h200": Chip("h200", "NVIDIA H200", 141 * GB, 900 * GB, dims=1, platform="gpu",
                 gpu=GpuSpec(**_HOPPER)),
    "a100": Chip("a100", "NVIDIA A100-SXM4-80GB", 80 * GB, 600 * GB, dims=1, platform="gpu",
                 gpu=GpuSpec(sm_count=108, clock_ghz=1.41, compute_capability=(8, 0), l2_bytes=40 * 2 ** 20,
                             shared_memory_per_sm=164 * 1024, shared_memory_per_block_optin=163 * 1024,
                             fp32_units_per_sm=64)),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A parsed --topology: a TPU slice (chip + libtpu topology name) or the local CPU devices ("cpu:4")."""
  spec: str
  chip: Optional[Chip]  # None: the local CPU devices
  shape: tuple[int, ...]
  num_slices: int = 1

  @property
  def num_chips(self) -> int:
    n = 1
    for s in self.shape:
      n *= s
    return n * self.num_slices

  @property
  def on_cpu(self) -> bool:
    """May be compiled for local CPU devices: "cpu:N", or GPUs standing in as CPUs (without the CUDA plugin)."""
    return self.chip is None or self.chip.platform == "gpu"

  @property
  def libtpu_name(self) -> str:
    return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"


def parse(spec: str, num_slices: int = 1) -> Topology:
  """'v5p:4x4x4', 'v5e:2x2', 'v6e:16x16', 'h100:8' (GPUs of a node), or 'cpu:N' (N local CPU devices, for the
  CPU-compile comparison)."""
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", spec.strip().lower())
  if not m:
    raise TopologyError(f"--topology {spec!r}: expected GENERATION:AxB[xC] (e.g. v5p:4x4x4, v5e:2x2), "
                        "GPU:N (h100:8) or cpu:N")
  gen, shape = m.group(1), tuple(int(s) for s in m.group(2).split("x"))
  if num_slices < 1:
    raise TopologyError(f"--num_slices must be >= 1, got {num_slices}")
  if gen == "cpu" or gen in GPUS:
    if len(shape) != 1:
      raise TopologyError(f"--topology {spec!r}: the {gen} form is {gen}:N (N devices)")
    if gen in GPUS and num_slices != 1:
      raise TopologyError(f"--num_slices applies to TPU slices, not to {gen}")
    return Topology(spec, GPUS.get(gen), shape, 1)
  gen = ALIASES.get(gen, gen)
  if gen not in CHIPS:
    raise TopologyError(f"--topology {spec!r}: unknown TPU generation or GPU {gen!r}; known: "
                        f"{sorted(CHIPS) + sorted(GPUS)}")
  chip = CHIPS[gen]
  if len(shape) != chip.dims:
    raise TopologyError(f"--topology {spec!r}: {gen} slices have {chip.dims} dimensions "
                     f"(e.g. {gen}:{'x'.join(['2'] * chip.dims)})")
  return Topology(spec, chip, shape, num_slices)

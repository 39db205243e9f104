"""XLA_FLAGS of the test processes and of the processes the tests start: a number of host CPU devices, and the
tests' compile flags.

Compiling is most of the suite's time (the test files' own programs, hundreds of them), so the tests compile
faster code less carefully (measured in docs/performance.md, "Compiling the tests"):
- `--xla_cpu_use_fusion_emitters=false`: XLA:CPU emits its fused kernels with the older elemental emitters
  instead of the MLIR fusion emitters: about 0.6x the compile time, the same speed (the same bits where compared).
- `--xla_backend_optimization_level=1`: LLVM optimises the kernels at -O1 instead of XLA's default -O3: about
  0.8x the compile time, and programs run up to ~10% slower. A process that picks its own level is started with
  `own_opt_level=True`: the main job's hundreds of train steps keep XLA's default (they run far more than they
  compile); the accelerator suite's smoke run sets -O0 itself.

XLA aborts on a flag that its version does not know (jaxlib 0.11 dropped the first), so a probe process asks
this jaxlib once per test session (the answer travels to the workers and every process started after it in the
environment).
"""

import os
import subprocess
import sys

COMPILE_FLAGS = ("--xla_cpu_use_fusion_emitters=false", "--xla_backend_optimization_level=1")
OPT_LEVEL_FLAGS = ("--xla_backend_optimization_level",)  # left to an own_opt_level process
_ANSWER = "OMNI_JAX_TEST_COMPILE_FLAGS"  # the probe's answer: the COMPILE_FLAGS this jaxlib knows
DEVICE_COUNT = "--xla_force_host_platform_device_count"


def _known(flags) -> bool:
  probe = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.ones(2).sum().block_until_ready()"],
                         env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags)), capture_output=True,
                         timeout=300)
  return probe.returncode == 0


def compile_flags() -> str:
  """The COMPILE_FLAGS this jaxlib knows (one probe process; one per flag only where some are unknown)."""
  if _ANSWER not in os.environ:
    known = COMPILE_FLAGS if _known(COMPILE_FLAGS) else tuple(f for f in COMPILE_FLAGS if _known((f,)))
    os.environ[_ANSWER] = " ".join(known)
  return os.environ[_ANSWER]


def _name(flag: str) -> str:
  return flag.split("=", 1)[0]


def flags(devices: int | None = None, base: str | None = None, own_opt_level: bool = False) -> str:
  """`base` (default: this process's XLA_FLAGS) with `devices` host CPU devices in place of its device count (None:
  base's own, if any), and the compile flags that `base` does not set itself; with `own_opt_level`, no
  optimisation level but one that `base` sets and the compile flags do not (the caller's own)."""
  base = os.environ.get("XLA_FLAGS", "") if base is None else base
  out = base.split()
  if devices is not None:
    out = [f for f in out if not f.startswith(DEVICE_COUNT)] + [f"{DEVICE_COUNT}={devices}"]
  skip = {_name(f) for f in out} | (set(OPT_LEVEL_FLAGS) if own_opt_level else set())
  if own_opt_level:
    out = [f for f in out if _name(f) not in OPT_LEVEL_FLAGS or f not in COMPILE_FLAGS]
  return " ".join(out + [f for f in compile_flags().split() if _name(f) not in skip])


def env(devices: int | None = None, base: dict | None = None, own_opt_level: bool = False, **extra) -> dict:
  """A copy of `base` (default: os.environ) for a process of `devices` host CPU devices, plus `extra`."""
  base = dict(os.environ if base is None else base)
  return dict(base, XLA_FLAGS=flags(devices, base.get("XLA_FLAGS", ""), own_opt_level), **extra)

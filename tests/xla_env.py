"""XLA_FLAGS of the test processes and of the processes the tests start: a number of host CPU devices, and the
tests' compile flag.

The compile flag has XLA:CPU emit its fused kernels with the older elemental emitters instead of the MLIR fusion
emitters. Compiling is most of the suite's time (the test files' own programs, hundreds of them), and with the
flag they compile in about 0.6x the time and run at the same speed (the same bits where compared): measured in
docs/performance.md, "Compiling the tests".

XLA aborts on a flag that its version does not know (jaxlib 0.11 dropped this one), so a probe process asks
this jaxlib once per test session (the answer travels to the workers and every process started after it in the
environment).
"""

import os
import subprocess
import sys

COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false"
_ANSWER = "OMNI_JAX_TEST_COMPILE_FLAGS"  # the probe's answer: COMPILE_FLAGS, or "" where this jaxlib lacks them
DEVICE_COUNT = "--xla_force_host_platform_device_count"


def compile_flags() -> str:
  """COMPILE_FLAGS where this jaxlib knows them, else ""."""
  if _ANSWER not in os.environ:
    probe = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.ones(2).sum().block_until_ready()"],
                           env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=COMPILE_FLAGS), capture_output=True,
                           timeout=300)
    os.environ[_ANSWER] = COMPILE_FLAGS if probe.returncode == 0 else ""
  return os.environ[_ANSWER]


def flags(devices: int | None = None, base: str | None = None) -> str:
  """`base` (default: this process's XLA_FLAGS) with `devices` host CPU devices in place of its device count (None:
  base's own, if any), and the compile flags unless `base` sets them itself."""
  base = os.environ.get("XLA_FLAGS", "") if base is None else base
  out = base.split()
  if devices is not None:
    out = [f for f in out if not f.startswith(DEVICE_COUNT)] + [f"{DEVICE_COUNT}={devices}"]
  if "xla_cpu_use_fusion_emitters" not in base:
    out += compile_flags().split()
  return " ".join(out)


def env(devices: int | None = None, base: dict | None = None, **extra) -> dict:
  """A copy of `base` (default: os.environ) for a process of `devices` host CPU devices, plus `extra`."""
  base = dict(os.environ if base is None else base)
  return dict(base, XLA_FLAGS=flags(devices, base.get("XLA_FLAGS", "")), **extra)

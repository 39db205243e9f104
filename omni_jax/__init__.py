"""omni_jax: Qwen2.5-Omni Thinker-Talker models in JAX / Flax NNX.

Importing the package picks jax's platforms when the user has not (JAX_PLATFORMS unset) and this machine has
no TPU: with libtpu installed (the `tpu` extra, for `python -m omni_jax.aot`), jax would otherwise start its
TPU backend on every run and libtpu prints initialisation errors, so every entry point (train.py, eval.py,
generate.py, chat.py, `python -m omni_jax.*`) would start with them. See default_platforms().
"""

import glob
import os
import sys

__version__ = "0.1.0"

# Device nodes: TPU chips (/dev/accel*, /dev/vfio/<group>) and GPUs (jax's own checks for NVIDIA, AMD, WSL).
_TPU_NODES = ("/dev/accel*", "/dev/vfio/[0-9]*")
_GPU_NODES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def default_platforms() -> None:
  """JAX_PLATFORMS=cpu when it is unset and no TPU or GPU device node exists; otherwise jax chooses as usual.

  A machine with a TPU keeps jax's choice (the TPU); a GPU machine too (naming its platform here would make
  jax fail where its GPU plugin is not installed). The TPU compiler that `python -m omni_jax.aot` uses for
  topology descriptions does not need the TPU backend (it runs with JAX_PLATFORMS=cpu anyway). Set
  JAX_PLATFORMS (even to "") to choose yourself. Must run before jax reads its config: if jax was imported
  first, its jax_platforms setting is changed instead, unless set or its backends already started."""
  if "JAX_PLATFORMS" in os.environ:
    return
  if any(glob.glob(p) for p in _TPU_NODES) or any(os.path.exists(p) for p in _GPU_NODES):
    return
  jax = sys.modules.get("jax")
  if jax is None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    return
  try:
    from jax._src import xla_bridge  # noqa: PLC0415 - only when jax came first

    if jax.config.jax_platforms or xla_bridge.backends_are_initialized():
      return
    jax.config.update("jax_platforms", "cpu")
  except (ImportError, AttributeError):  # another jax layout: leave its choice alone
    pass


default_platforms()

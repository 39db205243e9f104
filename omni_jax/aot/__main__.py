"""python -m omni_jax.aot --config CONFIG --topology v5p:4x4x4 | h100:8 | cpu:4 [--media] [--without talker]
  [--json] [--config.key=value ...]

Exit status: 0 when the step fits the chip's HBM, 3 when it does not (the report names the biggest buffers),
2 on a bad flag, topology or config (one `error:` line, omni_jax.cli).
"""

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config()).", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "GENERATION:AxB[xC] (v4, v5e, v5p, v6e), GPU:N (h100, h200, "
                                "a100: compiled for N CPU devices, judged against the GPU's HBM), or cpu:N for N "
                                "local CPU devices.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of that topology (multislice over DCN).")
_MEDIA = flags.DEFINE_bool("media", False, "Compile for a multimodal batch (images + audio at the config's "
                           "bucket limits, else omni_jax.aot.compile.DEFAULT_MEDIA) instead of text only.")
_WITHOUT = flags.DEFINE_list("without", [], "Towers to leave out (config.model sections, e.g. talker): the "
                             "Thinker alone.")
_JSON = flags.DEFINE_bool("json", False, "Print the report as one JSON object.")
flags.mark_flags_as_required(["config", "topology"])

NOT_FITTING = 3


def main(argv):
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: never try to open an accelerator
  from omni_jax.aot import hardware  # imports jax, but starts no backend: XLA_FLAGS can still be set

  topology = hardware.parse(_TOPOLOGY.value, _NUM_SLICES.value)
  if topology.on_cpu:  # the CPU compile (also GPUs' stand-in) needs N host devices, before jax starts
    n = topology.shape[0]
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}")
  import logging

  logging.getLogger("omni_jax").setLevel(logging.INFO)
  from omni_jax import aot
  from omni_jax.aot import report

  r = aot.analyse(aot.without_towers(_CONFIG.value, _WITHOUT.value), _TOPOLOGY.value, _NUM_SLICES.value,
                  _MEDIA.value)
  print(json.dumps(r.to_json()) if _JSON.value else report.format_text(r), flush=True)
  if not r.fits:
    sys.exit(NOT_FITTING)


if __name__ == "__main__":
  from omni_jax import cli
  from omni_jax.aot.compile import TpuUnavailable
  from omni_jax.aot.hardware import TopologyError

  cli.run(main, also=(TopologyError, TpuUnavailable))

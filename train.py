"""Train an omni_jax model.

  python train.py --config configs/tiny.py --workdir workdirs/tiny [--config.train.steps=100 ...]

Restarting with the same --workdir resumes from its latest checkpoint. Multi-process runs (one process per
host, or several on one machine) pass --coordinator_address/--num_processes/--process_id or set
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from omni_jax import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  distributed.start_process()  # before anything touches a device
  from omni_jax.config import ConfigError
  from omni_jax.train import loop

  try:
    loop.run(_CONFIG.value, _WORKDIR.value)
  except Exception as e:  # noqa: BLE001 - user errors become one line; anything else keeps its traceback
    sources = sys.modules.get("omni_jax.input.sources")  # the data errors' module, if the run loaded it
    if not isinstance(e, (ConfigError, loop.NonFiniteLoss)) and not (sources and isinstance(e, sources.DataError)):
      raise
    sys.exit("error: " + " ".join(str(e).split()))  # one line, whatever the message holds


if __name__ == "__main__":
  app.run(main)

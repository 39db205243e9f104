"""Train an omni_jax model.

  python train.py --config configs/tiny.py --workdir workdirs/tiny [--config.train.steps=100 ...]

Restarting with the same --workdir resumes from its latest checkpoint. Multi-process runs (one process per
host, or several on one machine) pass --coordinator_address/--num_processes/--process_id or set
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
  logging.getLogger("omni_jax").setLevel(logging.INFO)
  from omni_jax import distributed  # local: flags are parsed, nothing has touched a device yet

  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from omni_jax.config import ConfigError
  from omni_jax.train import loop

  try:
    loop.run(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, loop.NonFiniteLoss) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)

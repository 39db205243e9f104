"""Joining the processes of a multi-process run (several hosts, or several processes on one host)."""

import logging
import os
from typing import Optional

import jax

log = logging.getLogger(__name__)


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """jax.distributed.initialize when this is one process of several; a no-op for a single process.

  Arguments win over the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). Must run
  before anything touches a device. Afterwards jax.devices() lists every process's devices, so
  omni_jax.sharding.make_mesh builds the global mesh.
  """
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  count = num_processes if num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
  pid = process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID")
  count = None if count in (None, "") else int(count)
  if count is None or count <= 1:
    if address:
      log.warning("JAX_COORDINATOR_ADDRESS is set but the process count is %s: running as one process", count)
    return
  if not address or pid in (None, ""):
    raise ValueError(f"a run of {count} processes needs a coordinator address (--coordinator_address or "
                     f"JAX_COORDINATOR_ADDRESS) and this process's id (--process_id or JAX_PROCESS_ID)")
  jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=int(pid))
  log.info("process %d of %d joined via %s: %d local / %d global devices", jax.process_index(), count,
           address, jax.local_device_count(), jax.device_count())


def define_flags() -> None:
  """--coordinator_address / --num_processes / --process_id, shared by train.py and eval.py."""
  from absl import flags  # local: only entry scripts define flags

  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")


def start_process() -> None:
  """What an entry script does once flags are parsed: quiet orbax's per-file INFO logs, show ours, and join
  the other processes (define_flags' flags, else the environment)."""
  from absl import flags
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("omni_jax").setLevel(logging.INFO)
  f = flags.FLAGS
  initialize(f.coordinator_address, f.num_processes, f.process_id)

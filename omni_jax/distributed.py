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

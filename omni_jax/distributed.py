"""Joining the processes of a multi-process run (several hosts, or several processes on one host)."""

import logging
import os
from typing import Optional

import jax

log = logging.getLogger(__name__)


def detect_cluster(method: Optional[str] = None) -> Optional[tuple[str, int]]:
  """(name, process count) of the cluster manager this process runs under (SLURM, Cloud TPU VMs / GKE,
  Kubernetes, Open MPI, ... : the environments jax.distributed auto-detects), or None.

  method: jax's name for one environment ("slurm", "gke_tpu", "k8s", ...) to consider it alone.
  """
  try:
    from jax._src import clusters  # jax.distributed's own registry of cluster environments
  except ImportError:  # a jax without it: explicit flags / JAX_* variables only
    return None
  for env in clusters.ClusterEnv._cluster_types:
    if method is not None and getattr(env, "name", None) != method:
      continue
    if method is None and getattr(env, "opt_in_only_method", False):
      continue
    try:
      if env.is_env_present():
        return getattr(env, "name", env.__name__), int(env.get_process_count())
    except Exception as e:  # noqa: BLE001 - a half-set environment is reported, not fatal
      log.warning("cluster environment %s looks present but cannot be read (%s); ignoring it", env.__name__, e)
  return None


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, cluster_detection: Optional[str] = "auto") -> None:
  """jax.distributed.initialize when this is one process of several; a no-op for a single process.

  Arguments win over the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), which wins
  over a cluster manager's variables: without an explicit process count, a SLURM job step (srun), a multi-host
  Cloud TPU VM / GKE slice or a Kubernetes indexed job is detected and jax.distributed fills in what the
  arguments leave unset (coordinator: the first host; count and id: the manager's). cluster_detection:
  "auto", "none" (never), or one of jax's environment names ("slurm", "gke_tpu", "k8s", ...).
  Must run before anything touches a device. Afterwards jax.devices() lists every process's devices, so
  omni_jax.sharding.make_mesh builds the global mesh.
  """
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  count = num_processes if num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
  pid = process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID")
  count = None if count in (None, "") else int(count)
  pid = None if pid in (None, "") else int(pid)
  if count is None and cluster_detection not in (None, "none"):
    cluster = detect_cluster(None if cluster_detection == "auto" else cluster_detection)
    if cluster_detection != "auto" and cluster is None:
      raise ValueError(f"--cluster_detection={cluster_detection}: that cluster environment is not present")
    if cluster is not None and cluster[1] > 1:
      name, n = cluster
      jax.distributed.initialize(coordinator_address=address, process_id=pid,
                                 cluster_detection_method=None if cluster_detection == "auto" else name)
      log.info("process %d of %d joined via %s (detected): %d local / %d global devices", jax.process_index(),
               jax.process_count(), name, jax.local_device_count(), jax.device_count())
      return
  if count is None or count <= 1:
    if address:
      log.warning("JAX_COORDINATOR_ADDRESS is set but the process count is %s: running as one process", count)
    return
  if not address or pid is None:
    raise ValueError(f"a run of {count} processes needs a coordinator address (--coordinator_address or "
                     f"JAX_COORDINATOR_ADDRESS) and this process's id (--process_id or JAX_PROCESS_ID)")
  jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=pid)
  log.info("process %d of %d joined via %s: %d local / %d global devices", jax.process_index(), count,
           address, jax.local_device_count(), jax.device_count())


def define_flags() -> None:
  """--coordinator_address / --num_processes / --process_id, shared by train.py and eval.py."""
  from absl import flags  # local: only entry scripts define flags

  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
  flags.DEFINE_string("cluster_detection", "auto", "Join a multi-process run from the cluster manager's "
                      "environment (SLURM, Cloud TPU VM / GKE, Kubernetes): auto, none, or one of jax's names "
                      "(slurm, gke_tpu, k8s, ...). Explicit flags and JAX_* variables win.")


def start_process() -> None:
  """What an entry script does once flags are parsed: quiet orbax's per-file INFO logs, show ours, and join
  the other processes (define_flags' flags, else the environment)."""
  from absl import flags
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("omni_jax").setLevel(logging.INFO)
  f = flags.FLAGS
  initialize(f.coordinator_address, f.num_processes, f.process_id, f.cluster_detection)

"""How orbax writes jax.Arrays here: a replicated array is written by several replicas at once only where each
replica's part is large.

Orbax splits every replicated array among its replicas by default (the data-parallel copies of a parameter
write a slice each). It takes each slice with a small jitted program per array shape, compiled the first time
a process saves: a model of many small, differently shaped parameters (the tiny configs' Token2Wav blocks)
compiled about 520 of them at its first save, to split arrays of a few kilobytes whose transfer takes
microseconds. Under REPLICA_PARALLEL_MIN_BYTES per replica one replica writes the whole array; over it (a large
model's stacked layer weights, its embedding) the replicas share the work as before. The files are the same.
"""

import logging

import jax
import orbax.checkpoint as ocp

REPLICA_PARALLEL_MIN_BYTES = 4 << 20  # of each replica's slice


def register() -> None:
  """Makes orbax's handler of jax.Arrays, for every checkpointer in the process, one with the threshold above
  (keeping the registered one's array-metadata store). A handler registered by other code is left alone."""
  current = ocp.type_handlers.get_type_handler(jax.Array)
  if type(current) is not ocp.type_handlers.ArrayHandler:  # pylint: disable=unidiomatic-typecheck
    return
  if getattr(current, "_min_slice_bytes_for_replica_parallel", None) == REPLICA_PARALLEL_MIN_BYTES:
    return
  handler = ocp.type_handlers.ArrayHandler(array_metadata_store=getattr(current, "_array_metadata_store", None),
                                           min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)
  # orbax warns of every override (through absl's logger); this one is meant, and would otherwise be the first
  # line of every run's log.
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    absl_logger.setLevel(level)

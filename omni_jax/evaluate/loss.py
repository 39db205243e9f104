"""The loss evaluator: each objective's loss (and, where the objective gives them, perplexity and next-token
accuracy per modality), from the same objectives the train step sums (omni_jax.towers).

train.py runs the same jitted step every config.train.eval_every steps; eval.py runs it on a checkpoint.
"""

from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omni_jax import towers
from omni_jax.train import metrics as metrics_lib
from omni_jax.train import step as step_lib

EVAL_SEED = 0  # objectives that draw noise draw the same noise at every evaluation (comparable numbers)


def jit_eval_step(graphdef: nnx.GraphDef, mesh: Mesh, rules, param_shardings: Any,
                  objectives: Optional[Sequence[str]] = None) -> Callable:
  """(params, batch) -> {objective: sums (loss_sum, count, correct, ...)} over the global batch.

  objectives: names (e.g. the keys of omni_jax.towers.objective_weights(config)); None: every objective of
  the towers the model holds.
  """

  def step(params, batch):
    model = nnx.merge(graphdef, params)
    names = objectives
    if names is None:
      names = [o.name for t in towers.registered() if getattr(model, t.name, None) is not None for o in t.objectives]
    return step_lib.objective_sums(model, batch, jax.random.key(EVAL_SEED), [towers.objective(n) for n in names],
                                   mesh, rules, evaluate=True)

  cache = {}

  def run(params, batch):
    key = tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))
    if key not in cache:  # one compiled program per batch layout (e.g. text-only vs. with media)
      shardings = step_lib.batch_shardings(batch, mesh, rules)
      cache[key] = jax.jit(step, in_shardings=(param_shardings, shardings),
                           out_shardings=NamedSharding(mesh, PartitionSpec()))
    return cache[key](params, batch)

  return run


def evaluate(eval_step: Callable, params: Any, batches: Iterable[Mapping[str, jax.Array]], prefix: str = "eval"):
  """Sums over all batches -> summary scalars ({prefix}/loss, /ppl, /accuracy, per-modality variants)."""
  total = None
  for batch in batches:
    sums = eval_step(params, batch)
    total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
  if total is None:
    raise ValueError("the eval split yielded no batches")
  return metrics_lib.summarize(jax.tree.map(np.asarray, total), prefix)

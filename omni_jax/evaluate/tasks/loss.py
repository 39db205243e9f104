"""loss: each objective's held-out loss, perplexity and next-token accuracy, overall and per modality (the eval
step of omni_jax/evaluate/loss.py), over config.eval.samples_per_dataset records of every dataset the
mixture names (the first ones of each dataset's eval split, in dataset name order, one pass), so that every
dataset and modality is scored on the same records at every evaluation.

Scalars: <split>/loss, /ppl, /accuracy, their _<modality> variants (as before), <split>/samples/<dataset>
and <split>/skipped (samples the pipeline dropped, by reason in the report). The report lists the datasets
and their sample counts, the batch lengths used and the skip counts.
"""

import collections

from omni_jax import towers
from omni_jax.evaluate import loss as eval_lib
from omni_jax.evaluate import registry
from omni_jax.train import data as data_lib


def score(eval_step, params, source, config, mesh, rules) -> registry.Scores:
  """One pass over the source (at most config.eval.steps batches) from wherever it stands."""
  prefix = config.eval.split
  before = data_lib.counters(source)
  datasets, lengths = collections.Counter(), collections.Counter()

  def batches():
    for _ in range(int(config.eval.steps)):
      try:
        host = next(source)
      except StopIteration:
        return
      for name in getattr(source, "last_info", {}).get("samples", ()):
        datasets[name.split("/", 1)[0]] += 1
      lengths[int(host["input_ids"].shape[1])] += 1
      yield data_lib.to_global(host, mesh, rules, config.eval.batch_size)

  scalars = eval_lib.evaluate(eval_step, params, batches(), prefix=prefix)
  after = data_lib.counters(source)
  skipped = {k[len("data/skipped/"):]: v - before.get(k, 0) for k, v in after.items()
             if k.startswith("data/skipped/") and v > before.get(k, 0)}
  scalars[f"{prefix}/skipped"] = float(sum(skipped.values()))
  scalars.update({f"{prefix}/samples/{d}": float(n) for d, n in sorted(datasets.items())})
  details = dict(datasets=dict(sorted(datasets.items())), samples=sum(datasets.values()),
                 batches=sum(lengths.values()), batch_size=int(config.eval.batch_size),
                 seq_lens={str(k): v for k, v in sorted(lengths.items())},
                 samples_per_dataset=config.eval.get("samples_per_dataset"),
                 skipped=dict(total=int(sum(skipped.values())), **{k: int(v) for k, v in skipped.items()}))
  return registry.Scores(scalars, details)


@registry.register("loss")
class Loss:
  """The eval.py job's loss evaluator: its own eval source, rewound before each evaluation."""

  def __init__(self, ctx):
    self.ctx = ctx
    config = ctx.config
    rows = data_lib.process_rows(ctx.mesh, ctx.rules, config.eval.batch_size, config.train.seq_len)
    self.source = data_lib.make_source(config, config.eval.split, config.eval.batch_size, rows)
    self.start = self.source.get_state() if hasattr(self.source, "get_state") else None
    self.step = eval_lib.jit_eval_step(ctx.graphdef, ctx.mesh, ctx.rules, ctx.param_shardings,
                                       list(towers.objective_weights(config)))
    self.used = False

  def __call__(self, params) -> registry.Scores:
    if self.used and self.start is not None:
      self.source.set_state(self.start)
    self.used = True
    return score(self.step, params, self.source, self.ctx.config, self.ctx.mesh, self.ctx.rules)

  def close(self):
    data_lib.close(self.source)

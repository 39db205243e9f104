"""A set of evaluators (config.eval.tasks) run together on one set of parameters: their scalars, the report
section each one writes, and what each one cost (items per second)."""

import time
from typing import Any, Sequence

from omni_jax.evaluate import registry


def _items(scores: registry.Scores) -> int:
  d = scores.details
  if "samples" in d:
    return int(d["samples"])
  return len(d.get("replies", ()))


class Evaluation:
  """Builds the named evaluators once (task files read, sources opened); call it with parameters."""

  def __init__(self, ctx, names: Sequence[str]):
    self.ctx = ctx
    self.evaluators = {}
    try:
      for name in names:
        self.evaluators[name] = registry.get(name)(ctx)
    except BaseException:
      self.close()
      raise

  def __call__(self, params: Any) -> tuple[dict, dict]:
    """(scalars of every evaluator, {name: details with `seconds` and `items_per_s`})."""
    scalars, sections = {}, {}
    for name, evaluator in self.evaluators.items():
      start = time.perf_counter()
      scores = evaluator(params)
      seconds = time.perf_counter() - start
      scalars.update(scores.scalars)
      n = _items(scores)
      sections[name] = dict(scores.details, seconds=round(seconds, 3), items=n,
                            items_per_s=round(n / seconds, 3) if seconds > 0 else None)
    if "chat" in vars(self.ctx):  # its generator's copy of the parameters (per-layer buffers) goes until next time
      self.ctx.chat.drop_params()
    return scalars, sections

  def close(self):
    for evaluator in self.evaluators.values():
      if callable(getattr(evaluator, "close", None)):
        evaluator.close()

"""open: free-form answers, scored against the item's references by exact match (normalize.answer of the
reply equal to that of any reference) and by sacrebleu's corpus BLEU and chrF (default tokenisation, the
replies and references as written).

Items may have different numbers of references; sacrebleu wants the same number of reference streams, so an
item's list is padded by repeating its first reference (a repeated reference changes neither clipped counts
nor the closest reference length). Scalars: <split>/open/{exact_match,bleu,chrf} and per task.
"""

import numpy as np
import sacrebleu

from omni_jax.evaluate import normalize
from omni_jax.evaluate import registry
from omni_jax.evaluate import taskfile
from omni_jax.evaluate.tasks import common


def scores(references: list[list[str]], hypotheses: list[str]) -> dict[str, float]:
  width = max(len(r) for r in references)
  streams = [[r[k] if k < len(r) else r[0] for r in references] for k in range(width)]
  exact = [normalize.answer(h) in {normalize.answer(x) for x in r} for r, h in zip(references, hypotheses)]
  return {"exact_match": float(np.mean(exact)), "bleu": float(sacrebleu.corpus_bleu(hypotheses, streams).score),
          "chrf": float(sacrebleu.corpus_chrf(hypotheses, streams).score)}


@registry.register("open")
class OpenAnswers:

  def __init__(self, ctx):
    self.ctx = ctx
    self.items = common.items(ctx, "open")
    bad = [i for i in self.items if not i.references]
    if bad:
      raise taskfile.TaskFileError(f"open task item {bad[0].id!r} ({bad[0].task}) has no `references`")
    self.max_new_tokens = common.max_new_tokens(ctx, "open", 48)

  def __call__(self, params) -> registry.Scores:
    replies = self.ctx.generate(params, self.items, self.max_new_tokens)
    refs = [i.references for i in self.items]
    prefix = f"{self.ctx.split}/open"
    scalars = {f"{prefix}/{k}": v for k, v in scores(refs, replies).items()}
    tasks = {}
    for task, idx in common.groups(self.items, "task").items():
      tasks[task] = dict(items=len(idx), **scores([refs[i] for i in idx], [replies[i] for i in idx]))
      scalars.update({f"{prefix}/{task}/{k}": v for k, v in tasks[task].items() if k != "items"})
    details = dict(tasks=tasks, max_new_tokens=self.max_new_tokens,
                   replies=[dict(common.describe(i), references=i.references, reply=r)
                            for i, r in zip(self.items, replies)])
    return registry.Scores(scalars, details)

"""asr: transcribe held-out speech by greedy generation; WER and CER (jiwer) after normalize.transcript(), and
the share of items transcribed exactly (for one-word items such as spoken digits: content accuracy, the end of
turn token aside).

Scalars: <split>/asr/{wer,cer,accuracy} over all items pooled (jiwer's corpus rates: errors / reference words
or characters), and <split>/asr/<task>/{wer,cer,accuracy}.
"""

import jiwer
import numpy as np

from omni_jax.evaluate import normalize
from omni_jax.evaluate import registry
from omni_jax.evaluate import taskfile
from omni_jax.evaluate.tasks import common


def rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
  """Corpus WER, CER (jiwer) and exact-match accuracy of normalised transcripts; the first reference counts."""
  refs = [normalize.transcript(r) for r in references]
  hyps = [normalize.transcript(h) for h in hypotheses]
  empty = [i for i, r in enumerate(refs) if not r]
  if empty:
    raise ValueError(f"asr: reference {empty[0]} ({references[empty[0]]!r}) is empty after normalisation")
  return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps)),
          "accuracy": float(np.mean([r == h for r, h in zip(refs, hyps)]))}


@registry.register("asr")
class Asr:

  def __init__(self, ctx):
    self.ctx = ctx
    self.items = common.items(ctx, "asr")
    bad = [i for i in self.items if not i.references]
    if bad:
      raise taskfile.TaskFileError(f"asr task item {bad[0].id!r} ({bad[0].task}) has no reference transcript")
    self.max_new_tokens = common.max_new_tokens(ctx, "asr", 48)

  def __call__(self, params) -> registry.Scores:
    replies = self.ctx.generate(params, self.items, self.max_new_tokens)
    refs = [i.references[0] for i in self.items]
    prefix = f"{self.ctx.split}/asr"
    scalars = {f"{prefix}/{k}": v for k, v in rates(refs, replies).items()}
    per_task = {}
    for task, idx in common.groups(self.items, "task").items():
      per_task[task] = dict(items=len(idx), **rates([refs[i] for i in idx], [replies[i] for i in idx]))
      scalars.update({f"{prefix}/{task}/{k}": v for k, v in per_task[task].items() if k != "items"})
    details = dict(tasks=per_task, max_new_tokens=self.max_new_tokens,
                   replies=[dict(common.describe(i), reference=r, hypothesis=h)
                            for i, r, h in zip(self.items, refs, replies)])
    return registry.Scores(scalars, details)

"""The table printed at the end of an evaluation: the headline scores of each evaluator, beside those of the
first evaluation of the same training run (WORKDIR/metrics.jsonl) when there is one, so a run shows what it
learned; then one generated reply per modality."""

import json
import os
import re
from typing import Optional

# Headline metrics, in print order; per-modality and per-task variants follow each one.
_HEADLINE = re.compile(r"^[^/]+/(loss|ppl|accuracy)(_\w+)?$|^[^/]+/(asr|mcq|open)/([^/]+/)?"
                       r"(wer|cer|accuracy(_\w+)?|exact_match|bleu|chrf)$|^[^/]+/skipped$"
                       r"|^[^/]+/speech/(wer|similarity|judge_\w+)$"
                       r"|^[^/]+/\w+_dpo/(loss|accuracy|margin|rewards_chosen|rewards_rejected)$")
_LOWER_IS_BETTER = ("loss", "ppl", "wer", "cer", "skipped", "rewards_rejected")


def first_evaluation(workdir: str, split: str) -> Optional[dict]:
  """The earliest in-loop evaluation's scalars (with its step) in WORKDIR/metrics.jsonl, if any."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  best = None
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if any(k.startswith(f"{split}/") and not k.endswith("/failed") for k in row):
        if best is None or row["step"] < best["step"]:
          best = row
  return best


def _fmt(v) -> str:
  return "-" if v is None else f"{v:.4g}"


def table(report: dict, first: Optional[dict] = None) -> str:
  metrics = report["metrics"]
  keys = [k for k in metrics if _HEADLINE.match(k)]
  head = ["metric", f"step {first['step']}" if first else None, f"step {report.get('step')}"
          if report.get("step") is not None else "this checkpoint"]
  rows = []
  for k in keys:
    before = first.get(k) if first else None
    now = metrics[k]
    change = ""
    if before is not None and before != now:
      better = (now < before) == any(k.split("/")[-1].startswith(m) for m in _LOWER_IS_BETTER)
      change = "better" if better else "worse"
    rows.append([k, _fmt(before) if first else None, _fmt(now), change])
  for name, section in report.get("evaluators", {}).items():  # an evaluator that had nothing to score
    if isinstance(section.get("skipped"), str):
      rows.append([f"{report.get('split', 'eval')}/{name}", "-" if first else None, section["skipped"], ""])
  if first:
    head.append("")
  else:
    head = [h for h in head if h is not None]
    rows = [[c for c in r[:-1] if c is not None] for r in rows]
  widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
  line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
  out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
  return "\n".join(out)


def sample_replies(report: dict) -> list[str]:
  """One held-out prompt per modality with the model's reply, from the generation evaluators' sections."""
  seen, out = set(), []
  for name in ("asr", "open", "mcq"):
    section = report.get("evaluators", {}).get(name, {})
    for r in section.get("replies", ()):
      modality = r.get("modality")
      if modality in seen:
        continue
      seen.add(modality)
      expected = r.get("reference", (r.get("references") or [r.get("answer")])[0])
      reply = r.get("hypothesis", r.get("reply"))
      out.append(f"[{modality}] {name}/{r['task']} {r['id']}: {r.get('prompt', '')!s}\n"
                 f"    reply:    {reply!r}\n    expected: {expected!r}")
  return out

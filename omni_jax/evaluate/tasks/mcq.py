"""mcq: multiple choice over images, audio, video or text (MMMU / MMAU / MVBench style).

The prompt is the item's conversation with the options appended to its last user message as lines
"A. <choice>" ..., then "Answer with the option's letter.". The reply (greedy) is read by parse_letter(); an
unparsed reply counts as wrong. Scalars: <split>/mcq/accuracy (all items), <split>/mcq/<task>/accuracy,
<split>/mcq/accuracy_<modality>, <split>/mcq/unparsed (share of replies without a letter); chance is
1 / (number of choices).
"""

import copy
import re
from typing import Optional, Sequence

import numpy as np

from omni_jax.evaluate import normalize
from omni_jax.evaluate import registry
from omni_jax.evaluate import taskfile
from omni_jax.evaluate.tasks import common

INSTRUCTION = "Answer with the option's letter."
_STATED = re.compile(r"\b(?:answer|option|choice)\s*(?:is|:)?\s*[:\-]?\s*\(?([a-z])\)?(?![a-z])", re.IGNORECASE)
_LEADING = re.compile(r"^\s*(?:\(([a-z])\)|([a-z])\s*[.):]|([a-z])\s*$)", re.IGNORECASE)


def parse_letter(reply: str, choices: Sequence[str]) -> Optional[str]:
  """The option letter a reply gives, by the first rule that applies; None if none does.

  1. A stated answer: "the answer is C", "Answer: (c)", "option B" (any case).
  2. A reply that opens with a letter in parentheses "(b) ...", or a letter followed by ".", ")" or ":"
     ("B.", "b) a cat"), or that is a lone letter ("B").
  3. A reply that is one option's text (normalize.answer of both sides equal).
  Letters beyond the number of choices do not count. "A cat." is not read as option A (rule 2 needs
  punctuation after the letter).
  """
  valid = taskfile.LETTERS[:len(choices)]
  for pattern in (_STATED, _LEADING):
    m = pattern.search(reply)
    if m:
      letter = next(g for g in m.groups() if g).upper()
      if letter in valid:
        return letter
  text = normalize.answer(reply)
  matches = [taskfile.LETTERS[i] for i, c in enumerate(choices) if text and normalize.answer(c) == text]
  return matches[0] if len(matches) == 1 else None


def prompt(item: taskfile.Item) -> list:
  """The item's conversation with its options and the instruction appended to the last user message."""
  messages = copy.deepcopy(item.messages)
  user = next(m for m in reversed(messages) if m["role"] == "user")
  options = "\n".join(f"{taskfile.LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
  user["content"].append({"type": "text", "text": f"\n{options}\n{INSTRUCTION}"})
  return messages


@registry.register("mcq")
class MultipleChoice:

  def __init__(self, ctx):
    self.ctx = ctx
    self.items = common.items(ctx, "mcq")
    bad = [i for i in self.items if len(i.choices) < 2 or i.answer is None]
    if bad:
      raise taskfile.TaskFileError(f"mcq task item {bad[0].id!r} ({bad[0].task}) needs `choices` (two or more) and `answer`")
    self.prompts = [prompt(i) for i in self.items]
    self.max_new_tokens = common.max_new_tokens(ctx, "mcq", 8)

  def __call__(self, params) -> registry.Scores:
    replies = self.ctx.generate(params, self.items, self.max_new_tokens, prompts=self.prompts)
    parsed = [parse_letter(r, i.choices) for r, i in zip(replies, self.items)]
    right = np.array([p == i.answer for p, i in zip(parsed, self.items)], np.float64)
    prefix = f"{self.ctx.split}/mcq"
    scalars = {f"{prefix}/accuracy": float(right.mean()),
               f"{prefix}/unparsed": float(np.mean([p is None for p in parsed]))}
    tasks = {}
    for task, idx in common.groups(self.items, "task").items():
      tasks[task] = dict(items=len(idx), accuracy=float(right[idx].mean()),
                         chance=float(np.mean([1 / len(self.items[i].choices) for i in idx])))
      scalars[f"{prefix}/{task}/accuracy"] = tasks[task]["accuracy"]
    modalities = {}
    for modality, idx in common.groups(self.items, "modality").items():
      modalities[modality] = dict(items=len(idx), accuracy=float(right[idx].mean()))
      scalars[f"{prefix}/accuracy_{modality}"] = modalities[modality]["accuracy"]
    details = dict(tasks=tasks, modalities=modalities, max_new_tokens=self.max_new_tokens,
                   replies=[dict(common.describe(i), answer=i.answer, reply=r, parsed=p)
                            for i, r, p in zip(self.items, replies, parsed)])
    return registry.Scores(scalars, details)

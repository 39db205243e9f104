"""Evaluation task files: JSONL that users write, one item a line (docs/evaluation.md).

    {"id": "q1", "task": "animals", "messages": [{"role": "user", "content": [
        {"type": "image", "image": "pics/cat.jpg"}, {"type": "text", "text": "What animal is this?"}]}],
     "references": ["A cat."]}                                          # asr / open: one or more references
    {"id": "q2", "task": "animals", "messages": [...], "choices": ["A dog.", "A cat."], "answer": "B"}   # mcq

`messages` is the prompt in either training format of omni_jax/input/sources.py (content lists with media
parts, or strings with <image>/<audio>/<video> tags and parallel `images` / `audios` / `videos` lists);
`use_audio_in_video` and a `system` string work as in training records. A conversation that ends with an
assistant message takes that message as its reference when `references` is absent (a training record is a
valid task item). `task` names the row of the scores (default: the file's name without .jsonl); `answer` is
a letter ("B") or a 0-based index; `speech` on the closing assistant message is its recording (the speech
evaluator's judge floor and voice reference). Relative media paths resolve against the file's folder.
"""

import dataclasses
import glob
import json
import os
from typing import Optional, Sequence

from omni_jax import batch as batch_lib
from omni_jax.errors import ConfigError
from omni_jax.input import preprocess
from omni_jax.input import sources

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class TaskFileError(ConfigError):
  """A task file or line that cannot be read (config.eval.files); the message names the file and line."""


@dataclasses.dataclass
class Item:
  id: str
  task: str
  modality: str  # video > image > audio > text, as the training metrics count samples
  messages: list  # the prompt, in omni_jax.generate's message format (media parts with absolute paths)
  references: list = dataclasses.field(default_factory=list)
  choices: list = dataclasses.field(default_factory=list)
  answer: Optional[str] = None  # the right letter (mcq)
  speech: Optional[str] = None  # the reference answer's recording (`speech` on it; the speech evaluator)


def _text(content) -> str:
  return "".join(p["text"] for p in content if p["type"] == "text")


def parse(line: str, root: str, where: str, default_task: str) -> Item:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise TaskFileError(f"{where}: not valid JSON ({e})") from None
  if not isinstance(record, dict):
    raise TaskFileError(f"{where}: an item must be a JSON object")
  raw = record.get("messages", record.get("conversations"))
  if isinstance(raw, list) and raw and isinstance(raw[-1], dict) and raw[-1].get("role") != "assistant":
    record = dict(record, messages=raw + [{"role": "assistant", "content": ""}])  # normalize() wants one
    reply = None
  else:
    reply = raw
  try:
    conv = sources.normalize(record, root, where)
  except sources.RecordError as e:
    raise TaskFileError(str(e)) from None
  messages = conv["messages"]
  last = messages.pop()  # the assistant turn: the reference, or the placeholder added above
  references = record.get("references", [_text(last["content"])] if reply is not None else [])
  if isinstance(references, str):
    references = [references]
  if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
    raise TaskFileError(f"{where}: `references` must be a string or a list of strings")
  if conv["use_audio_in_video"]:
    for m in messages:
      for p in m["content"]:
        if p["type"] == "video":
          p.setdefault("use_audio_in_video", True)
  choices = record.get("choices", [])
  if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or len(choices) > len(LETTERS):
    raise TaskFileError(f"{where}: `choices` must be a list of at most {len(LETTERS)} strings")
  answer = record.get("answer")
  if answer is not None:
    if isinstance(answer, int) and not isinstance(answer, bool):
      answer = LETTERS[answer] if 0 <= answer < len(choices) else None
    elif isinstance(answer, str) and len(answer.strip()) == 1:
      answer = answer.strip().upper()
    else:
      answer = None
    if answer is None or answer not in LETTERS[:len(choices)]:
      raise TaskFileError(f"{where}: `answer` {record.get('answer')!r} is not a letter or index of its "
                          f"{len(choices)} choices")
  kind = preprocess.sample_kind(messages)
  modality = next(k for k, v in batch_lib.KINDS.items() if v == kind)
  return Item(id=str(record.get("id", where)), task=str(record.get("task", default_task)), modality=modality,
              messages=messages, references=references, choices=choices, answer=answer, speech=last.get("speech"))


def expand(spec) -> list[str]:
  """Comma-separated paths / globs (or a sequence of them) -> the files, in order; a pattern that matches
  nothing is an error naming it."""
  if isinstance(spec, str):
    spec = [s.strip() for s in spec.split(",")]
  files = []
  for pattern in (s for s in spec if s):
    matched = sorted(glob.glob(os.path.expanduser(pattern)))
    if not matched:
      raise TaskFileError(f"task file {pattern!r}: no such file")
    files += matched
  return files


def load(paths: Sequence[str], max_items: int = 0) -> list[Item]:
  """The items of the task files (at most max_items per task when > 0), in file and line order."""
  items, per_task = [], {}
  for path in paths:
    root = os.path.dirname(os.path.abspath(path))
    task = os.path.basename(path).rsplit(".jsonl", 1)[0]
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        item = parse(line, root, f"{path}:{n}", task)
        if max_items and per_task.get(item.task, 0) >= max_items:
          continue
        per_task[item.task] = per_task.get(item.task, 0) + 1
        items.append(item)
  return items


def files_for(config, evaluator: str) -> list[str]:
  """The task files of one evaluator: config.eval.files.<evaluator> (comma-separated paths / globs), else
  the tasks bundled with a recipe source (config.data.source = "demo": the demo corpus's OUT/tasks/<evaluator>/)."""
  spec = (config.eval.get("files") or {}).get(evaluator) or ""
  if spec:
    return expand(spec)
  source = config.data.get("source")
  if source and source not in sources.READERS:
    files = sources.find_recipe(source).task_files(config.data, evaluator)
    if files:
      return files
  raise TaskFileError(f"config.eval.files.{evaluator} is empty: give the {evaluator} evaluator's task files "
                      f"(comma-separated JSONL paths or globs; format in docs/evaluation.md)")

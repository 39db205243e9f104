"""What the generation evaluators share: reading their task files once, and naming their scalars."""

from typing import Iterable

from omni_jax.evaluate import taskfile


def items(ctx, evaluator: str) -> list[taskfile.Item]:
  files = taskfile.files_for(ctx.config, evaluator)
  out = taskfile.load(files, int(ctx.config.eval.get("max_items", 0)))
  if not out:
    raise taskfile.TaskFileError(f"the {evaluator} task files hold no items: {', '.join(files)}")
  return out


def max_new_tokens(ctx, evaluator: str, default: int) -> int:
  return int((ctx.config.eval.get("max_new_tokens") or {}).get(evaluator, default))


def groups(items: Iterable[taskfile.Item], key: str) -> dict[str, list[int]]:
  """{task or modality: indices of its items}, in first-seen order."""
  out: dict[str, list[int]] = {}
  for i, item in enumerate(items):
    out.setdefault(getattr(item, key), []).append(i)
  return out


def describe(item: taskfile.Item) -> dict:
  """An item's identity in the report: id, task, modality, and its prompt's text."""
  text = " ".join(p["text"] for m in item.messages if m["role"] == "user" for p in m["content"] if p["type"] == "text")
  return dict(id=item.id, task=item.task, modality=item.modality, prompt=" ".join(text.split()))

"""The speech files of conversation records (the project's JSONL formats, omni_jax.input.sources).

Talker targets are the `speech` audio of assistant messages (in a preference pair, of its chosen and rejected
replies: omni_jax.input.pairs); user audio parts can be added (more speech to fit units on). Paths are resolved
as the training pipeline resolves them; each file is listed once.
"""

import dataclasses
import os
from typing import Sequence, Union

from omni_jax.input import pairs, sources


@dataclasses.dataclass
class SpeechFiles:
  paths: list[str]  # absolute, first occurrence order
  records: int = 0
  bad_records: int = 0


def speech_files(data: Union[str, Sequence[str]], include_user_audio: bool = False) -> SpeechFiles:
  """The speech files of every record in JSONL files or globs `data`; a path or glob that names nothing
  raises sources.DataError naming it. Malformed records are counted and skipped (as in training)."""
  out = SpeechFiles(paths=[])
  seen = set()
  for path in sources.expand_paths(data, "--data"):
    root = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8", errors="replace") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        out.records += 1
        name = f"{os.path.basename(path)}:{lineno}"
        try:
          record = sources.parse(line, name)
          if sources.is_pair(record):
            pair = pairs.normalize_pair(record, root, name)
            messages = pair["prompt"] + [pair["chosen"], pair["rejected"]]
          else:
            messages = sources.normalize(record, root, name)["messages"]
        except sources.RecordError:
          out.bad_records += 1
          continue
        for message in messages:
          found = [message["speech"]] if "speech" in message else []
          if include_user_audio and message["role"] == "user":
            found += [p["path"] for p in message["content"] if p["type"] == "audio"]
          for p in found:
            if p not in seen:
              seen.add(p)
              out.paths.append(p)
  return out

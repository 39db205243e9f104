"""Conversation datasets: the JSONL formats users bring, their normal form, and the TFDS ArrayRecord store.

Two JSONL formats are accepted (one conversation a line, mixed freely in one file):

1. `messages` with tags (ms-swift / LLaMA-Factory style): string contents holding <image>, <audio>, <video>
   tags, consumed in order from parallel `images`, `audios`, `videos` path lists. `conversations` with
   {"from": "human" | "gpt" | "system", "value": ...} (ShareGPT) and a top-level `system` string also work.
2. Qwen content lists: each content is a list of {"type": "text", "text"} / {"type": "image", "image": path}
   / {"type": "audio", "audio": path} / {"type": "video", "video": path} parts.

Optional keys: `use_audio_in_video` (record, or per video part), `speech_output` (record), and `speech` on an
assistant message: the path of that reply spoken aloud (Talker targets; it also selects the speech system
prompt), or `codes`: that reply's speech-unit ids themselves (a list of ints, made with the run's unit set),
and `speaker` (on that message or the record): the voice's name in config.model.talker.speakers. A media part
without a path ({"type": "image"}, as TRL writes them) takes the next path of the record's `images` / `audios`
/ `videos` list, as a tag does. Relative media paths resolve against the JSONL file's folder; `file://`
prefixes are stripped.

Preference pairs (chosen / rejected replies to one prompt) have their own normal form
(omni_jax.input.preference); `normalize` refuses them (reason bad_pair) so that a pair never trains as SFT.

The TFDS builder stores each line untouched (with its id and folder) in ArrayRecord; `normalize` runs in the
data workers, so a malformed line becomes a counted, skipped sample at training time instead of a failed
build. A line that is not UTF-8 or is blank is stored as a marker that `normalize` rejects with the reason
`not_utf8` / `blank_line` (never decoded with replacement characters, never dropped uncounted), so every line
of a file is either trained on or counted as skipped. A split whose files hold no line at all fails the build
with a DataError naming them. grain reads the store through `tfds.data_source`. tensorflow_datasets is imported
when a store is first built or opened, not with this module: generation and serving never need it.

Besides the JSONL and TFDS sources the library reads, config.data.source may name a recipe that builds its
own datasets, registered with register_source by its module when imported (the repository's demo corpus,
data/demo_corpus.py, registers "demo"; train.py and eval.py import it): the library never imports a recipe.
"""

import contextlib
import dataclasses
import functools
import glob
import hashlib
import io
import json
import logging
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from omni_jax.errors import UserError

MEDIA_KINDS = ("image", "audio", "video")
_TAG = re.compile(r"<(image|audio|video)>")
_ANY_TAG = re.compile(r"<([a-z][a-z_]*)>")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}
BUILDER_NAME = "omni_conversations"


class DataError(UserError, ValueError):
  """A dataset that cannot be opened (missing path, unknown spec): raised at startup."""


READERS = ("synthetic", "jsonl", "tfds")  # config.data.source values the library reads itself


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A config.data.source that builds its datasets itself; each callable takes config.data (a mapping)."""
  datasets: Callable[[Mapping], dict[str, str]]  # {dataset name: TFDS name}, built on first use
  data_dir: Callable[[Mapping], str]  # the TFDS data directory those datasets are in
  task_files: Callable[[Mapping, str], list[str]] = lambda data, evaluator: []  # bundled evaluation tasks


_RECIPES: dict[str, Recipe] = {}


def register_source(name: str, recipe: Recipe) -> None:
  """Make `name` a config.data.source value, read through `recipe`."""
  if name in READERS:
    raise ValueError(f"data source {name!r} is the library's own; register the recipe under another name")
  _RECIPES[name] = recipe


def find_recipe(name: str) -> Recipe:
  """The registered recipe config.data.source names; a DataError naming the registered ones if none is."""
  if name not in _RECIPES:
    raise DataError(f"config.data.source: unknown source {name!r}; the library reads {list(READERS)} and the "
                    f"registered recipes are {sorted(_RECIPES)} (a recipe registers itself when its module is "
                    "imported: the demo corpus by `import data.demo_corpus`, as train.py and eval.py do from the "
                    "repository root)")
  return _RECIPES[name]


class RecordError(ValueError):
  """A malformed conversation record; the pipeline skips it and counts it."""

  reason = "malformed"


class PairError(RecordError):
  """A preference record that cannot become a pair (omni_jax.input.preference), or one in an SFT dataset."""

  reason = "bad_pair"


class UnknownTagError(RecordError):
  """A media tag or content-part type this framework does not know."""

  reason = "unknown_tag"


class LineError(RecordError):
  """A JSONL line that is no record at all: not UTF-8 (reason not_utf8) or blank (blank_line)."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


LINE_REASONS = ("not_utf8", "blank_line")
# What the store holds for such a line: NUL cannot start a JSON text, so no real record is mistaken for it.
_BAD_LINE = "\x00omni_jax-bad-line\x00"


def bad_line(reason: str, message: str) -> str:
  """The stored stand-in of a line that is no record (normalize raises LineError(reason, message))."""
  assert reason in LINE_REASONS, reason
  return f"{_BAD_LINE}{reason}\x00{message}"


# ----------------------------------------------------------------------------------------------------------
# Normal form.


def _resolve(path: Any, root: str, where: str) -> str:
  if not isinstance(path, str) or not path:
    raise RecordError(f"{where}: media path must be a non-empty string, got {path!r}")
  if path.startswith("file://"):
    path = path[len("file://"):]
  if "://" in path:
    raise RecordError(f"{where}: {path!r} is a URL; download the file and give its path")
  path = os.path.expanduser(path)
  return path if os.path.isabs(path) or not root else os.path.normpath(os.path.join(root, path))


def _split_tags(text: str, lists: dict, used: dict, root: str, where: str, record: Mapping) -> list[dict]:
  """A tagged string -> content parts, taking paths from the record's parallel lists in order."""
  for m in _ANY_TAG.finditer(text):
    name = m.group(1)
    if name not in MEDIA_KINDS and isinstance(record.get(name + "s"), list):
      raise UnknownTagError(f"{where}: tag <{name}> (with a `{name}s` list) is not a known media kind "
                            f"{MEDIA_KINDS}")
  parts, pos = [], 0
  for m in _TAG.finditer(text):
    if m.start() > pos:
      parts.append({"type": "text", "text": text[pos:m.start()]})
    kind = m.group(1)
    paths = lists[kind]
    if used[kind] >= len(paths):
      raise RecordError(f"{where}: more <{kind}> tags than the {len(paths)} entries of `{kind}s`")
    parts.append({"type": kind, "path": _resolve(paths[used[kind]], root, where)})
    used[kind] += 1
    pos = m.end()
  if pos < len(text):
    parts.append({"type": "text", "text": text[pos:]})
  return parts


def _content_list(content: list, root: str, where: str, lists: dict, used: dict) -> list[dict]:
  parts = []
  for j, part in enumerate(content):
    if not isinstance(part, Mapping):
      raise RecordError(f"{where}: content part {j} is not an object")
    kind = part.get("type")
    if kind is None:  # Qwen also accepts {"image": path} without a type
      kind = next((k for k in ("text",) + MEDIA_KINDS if k in part), None)
    if kind == "text":
      if not isinstance(part.get("text"), str):
        raise RecordError(f"{where}: text part {j} has no string 'text'")
      parts.append({"type": "text", "text": part["text"]})
    elif kind in MEDIA_KINDS:
      path = part.get(kind, part.get(kind + "_url", part.get("path")))
      if path is None and used[kind] < len(lists[kind]):  # TRL's bare {"type": "image"}: the list's next path
        path = lists[kind][used[kind]]
        used[kind] += 1
      item = {"type": kind, "path": _resolve(path, root, where)}
      if kind == "video" and "use_audio_in_video" in part:
        item["use_audio_in_video"] = bool(part["use_audio_in_video"])
      parts.append(item)
    else:
      raise UnknownTagError(f"{where}: content part {j} has unknown type {kind!r}; known: text, "
                            f"{', '.join(MEDIA_KINDS)}")
  return parts


def parse(record: Union[str, bytes, Mapping], name: str = "?") -> Mapping:
  """A raw record (JSON text or an object) -> its JSON object; raises LineError / RecordError naming `name`."""
  if isinstance(record, str) and record.startswith(_BAD_LINE):
    reason, _, message = record[len(_BAD_LINE):].partition("\x00")
    if reason in LINE_REASONS:
      raise LineError(reason, message)
  if isinstance(record, (str, bytes)):
    try:
      record = json.loads(record)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise RecordError(f"{name}: not valid JSON ({e})") from None
  if not isinstance(record, Mapping):
    raise RecordError(f"{name}: a record must be a JSON object, got {type(record).__name__}")
  return record


PAIR_KEYS = ("chosen", "rejected", "rejected_response", "rejected_messages")  # TRL's and ms-swift's


def is_pair(record: Mapping) -> bool:
  """Whether a parsed record is a preference pair (TRL's chosen / rejected, ms-swift's rejected_*)."""
  return isinstance(record, Mapping) and any(k in record for k in PAIR_KEYS)


def _codes(value: Any, where: str) -> list[int]:
  ok = (isinstance(value, list) and value
        and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value))
  if not ok:
    raise RecordError(f"{where}: `codes` must be a non-empty list of speech-unit ids (ints >= 0)")
  return list(value)


def normalize(record: Union[str, bytes, Mapping], root: str = "", name: str = "?") -> dict:
  """One raw record -> {"id", "messages": [{"role", "content": [parts], ("speech" | "codes", "speaker")}],
  "use_audio_in_video", "speech_output"}; media parts carry absolute paths. Raises RecordError /
  UnknownTagError naming `name` (PairError for a preference pair: omni_jax.input.preference reads those)."""
  record = parse(record, name)
  if is_pair(record):
    keys = [k for k in PAIR_KEYS if k in record]
    raise PairError(f"{name}: a preference pair (field `{keys[0]}`) in a dataset of conversations; name its "
                    "dataset in config.data.preference to train on it (DPO)")
  raw = record.get("messages", record.get("conversations"))
  if not isinstance(raw, list) or not raw:
    raise RecordError(f"{name}: needs a non-empty `messages` (or `conversations`) list")
  lists = {}
  for kind in MEDIA_KINDS:
    value = record.get(kind + "s", [])
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list):
      raise RecordError(f"{name}: `{kind}s` must be a list of paths")
    lists[kind] = value
  used = dict.fromkeys(MEDIA_KINDS, 0)
  messages = []
  if isinstance(record.get("system"), str) and not (isinstance(raw[0], Mapping) and raw[0].get("role") == "system"):
    messages.append({"role": "system", "content": [{"type": "text", "text": record["system"]}]})
  for i, m in enumerate(raw):
    where = f"{name} message {i}"
    if not isinstance(m, Mapping):
      raise RecordError(f"{where}: not an object")
    role = m.get("role", SHAREGPT_ROLES.get(m.get("from")))
    if role not in ("system", "user", "assistant"):
      raise RecordError(f"{where}: unknown role {m.get('role', m.get('from'))!r}")
    content = m.get("content", m.get("value"))
    if isinstance(content, str):
      parts = _split_tags(content, lists, used, root, where, record)
    elif isinstance(content, list):
      parts = _content_list(content, root, where, lists, used)
    else:
      raise RecordError(f"{where}: content must be a string or a list of parts")
    msg = {"role": role, "content": parts}
    for key in ("speech", "codes"):
      if m.get(key) is not None and role != "assistant":
        raise RecordError(f"{where}: only assistant messages can carry `{key}`")
    if m.get("speech") is not None and m.get("codes") is not None:
      raise RecordError(f"{where}: give a reply's `speech` or its `codes`, not both")
    if m.get("speech") is not None or m.get("codes") is not None:
      if m.get("speech") is not None:
        msg["speech"] = _resolve(m["speech"], root, where)
      else:
        msg["codes"] = _codes(m["codes"], where)
      speaker = m.get("speaker", record.get("speaker"))
      if speaker is not None:
        if not isinstance(speaker, str):
          raise RecordError(f"{where}: `speaker` must be a voice name (a string), got {speaker!r}")
        msg["speaker"] = speaker
    messages.append(msg)
  for kind in MEDIA_KINDS:
    if used[kind] and used[kind] != len(lists[kind]):
      raise RecordError(f"{name}: {used[kind]} <{kind}> tags but {len(lists[kind])} entries in `{kind}s`")
    if not used[kind] and lists[kind] and not any(p["type"] == kind for m in messages for p in m["content"]):
      raise RecordError(f"{name}: `{kind}s` has {len(lists[kind])} entries but no <{kind}> tag uses them")
  if not any(m["role"] == "assistant" for m in messages):
    raise RecordError(f"{name}: no assistant message (nothing to learn)")
  speech = bool(record.get("speech_output", any("speech" in m or "codes" in m for m in messages)))
  return {"id": str(record.get("id", name)), "messages": messages,
          "use_audio_in_video": bool(record.get("use_audio_in_video", False)), "speech_output": speech}


# ----------------------------------------------------------------------------------------------------------
# ArrayRecord store (TFDS).


def _jsonl_lines(paths: Sequence[str]):
  """(id "file.jsonl:N", line or its bad_line stand-in, folder) for every line of the files, blank ones too."""
  for path in paths:
    root = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    with open(path, "rb") as f:
      for lineno, raw in enumerate(f, 1):
        key = f"{base}:{lineno}"
        raw = raw.rstrip(b"\r\n")
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write
          raw = raw[3:]
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          yield key, bad_line("not_utf8", f"{path}:{lineno}: not UTF-8 (byte {e.start + 1} of the line is "
                                          f"{raw[e.start:e.start + 1]!r}); re-encode the file as UTF-8"), root
          continue
        if not line.strip():
          yield key, bad_line("blank_line", f"{path}:{lineno}: blank line"), root
          continue
        yield key, line, root


def _check_not_empty(name: str, files: Mapping[str, Sequence[str]]) -> None:
  """A split whose files hold nothing but whitespace fails here (TFDS would stop with a bare assertion)."""
  for split, paths in files.items():
    empty = [p for p in paths if not _has_content(p)]
    if len(empty) == len(paths):
      raise DataError(f"dataset {name!r} split {split!r}: {', '.join(paths)} "
                      f"{'is' if len(paths) == 1 else 'are'} empty (no JSONL line to read)")
    for p in empty:
      logging.getLogger(__name__).warning("dataset %r split %r: %s is empty", name, split, p)


def _has_content(path: str, chunk: int = 1 << 16) -> bool:
  with open(path, "rb") as f:
    while True:
      block = f.read(chunk)
      if not block:
        return False
      if block.strip():
        return True


@functools.lru_cache(maxsize=None)
def _tfds():
  """tensorflow_datasets and our builder class, defined on first use (the import takes seconds)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class OmniConversations(tfds.core.GeneratorBasedBuilder):
    """Conversation JSONL files -> one ArrayRecord dataset per config (= dataset name), one split per file set."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Raw JSONL lines with their id and folder."}
    # Nothing is downloaded; without this TFDS looks for a checksums file next to this module (and needs the
    # importlib_resources backport to do so).
    code_path = None

    def __init__(self, *, splits: Optional[Mapping[str, Sequence[str]]] = None, **kwargs):
      self._splits = splits
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, description="Conversations for omni_jax (sources.normalize).",
                                   features=tfds.features.FeaturesDict({"id": tfds.features.Text(),
                                                                        "record": tfds.features.Text(),
                                                                        "root": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(paths) for split, paths in self._splits.items()}

    def _generate_examples(self, paths):
      for key, line, root in _jsonl_lines(paths):
        yield key, {"id": key, "record": line, "root": root}

  return tfds, OmniConversations


def expand_paths(spec: Union[str, Sequence[str]], what: str) -> list[str]:
  """Files named by a path, a glob or a list of them; a name that matches nothing fails here."""
  specs = [spec] if isinstance(spec, str) else list(spec)
  out = []
  for s in specs:
    s = os.path.expanduser(s)
    found = sorted(glob.glob(s)) if any(c in s for c in "*?[") else ([s] if os.path.isfile(s) else [])
    if not found:
      raise DataError(f"{what}: {s!r} does not exist (or matches no file)")
    out += found
  return out


_STORE_FORMAT = b"lines-2"  # bumped when what a stored line holds changes: such stores are rebuilt once


def _fingerprint(splits: Mapping[str, Sequence[str]]) -> str:
  h = hashlib.sha1(_STORE_FORMAT)
  for split in sorted(splits):
    for path in splits[split]:
      st = os.stat(path)
      h.update(f"{split}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:10]


@contextlib.contextmanager
def _quiet_tfds():
  """TFDS logs a warning for every custom builder config and prints progress; neither helps here."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def build(name: str, splits: Mapping[str, Union[str, Sequence[str]]], data_dir: str) -> str:
  """Convert JSONL files ({split: paths or globs}) to ArrayRecord under data_dir once; returns the TFDS name.

  The config name carries a fingerprint of the files (path, size, mtime), so edited files are rebuilt and an
  unchanged set is reused.
  """
  if not re.fullmatch(r"[A-Za-z0-9_]+", name):
    raise DataError(f"dataset name {name!r}: use letters, digits and underscores")
  files = {split: expand_paths(paths, f"dataset {name!r} split {split!r}") for split, paths in splits.items()}
  config = f"{name.lower()}_{_fingerprint(files)}"
  tfds_name = f"{BUILDER_NAME}/{config}"
  tfds, builder_class = _tfds()
  with _quiet_tfds():
    builder = builder_class(splits=files, data_dir=os.path.expanduser(data_dir), file_format="array_record",
                            config=tfds.core.BuilderConfig(name=config, description=f"{name}: {files}"))
    if not builder.is_prepared():
      _check_not_empty(name, files)
      tfds.disable_progress_bar()
      with contextlib.redirect_stdout(io.StringIO()):  # "Downloading and preparing dataset ..." banners
        builder.download_and_prepare()
  return tfds_name


def open_split(tfds_name: str, split: str, data_dir: str):
  """A random-access source (len, [i] -> {"id", "record", "root"} as bytes) over one split."""
  data_dir = os.path.expanduser(data_dir)
  tfds, _ = _tfds()  # registers the builder, which data_source looks up by name
  try:
    with _quiet_tfds():
      return tfds.data_source(tfds_name, split=split, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001 - TFDS raises several types for a missing dataset / split
    raise DataError(f"cannot open TFDS dataset {tfds_name!r} split {split!r} under {data_dir}: "
                    f"{type(e).__name__}: {e}") from None


def decode_example(example: Mapping) -> tuple[str, str, str]:
  """(id, raw record, root) of one stored example (TFDS returns Text features as bytes)."""
  def text(v):
    return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)

  return text(example["id"]), text(example["record"]), text(example["root"])

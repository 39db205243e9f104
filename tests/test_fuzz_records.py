"""Property-based fuzzing (hypothesis) of the JSONL reader, the record parser and the chat renderer (issue 14).

For generated records and lines (valid conversations, truncated JSON, wrong types, odd Unicode, huge texts,
non-UTF-8 bytes, blank lines):
- sources.normalize returns a well-formed conversation or raises RecordError, nothing else;
- the Preprocessor (normalize + media + ChatML rendering) returns a Sample whose labels align with its ids,
  or raises SampleError with a known reason, nothing else;
- a JSONL file read through the store's line reader, preprocessed and packed, accounts for every line:
  samples packed + samples skipped = lines read, each skip under a known reason, and no line takes long.
Example counts are small (CI runs this file in seconds); a failing example is printed by hypothesis.
"""

import datetime
import functools
import json
import string

import grain
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omni_jax import batch as batch_lib
from omni_jax.input import packing
from omni_jax.input import pipeline
from omni_jax.input import preprocess
from omni_jax.input import sources
from omni_jax.input.tokenizer import Tokenizer

FUZZ = settings(max_examples=60, deadline=datetime.timedelta(seconds=10),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.lru_cache(maxsize=1)
def _prep() -> preprocess.Preprocessor:
  tok = Tokenizer()
  return preprocess.Preprocessor(tok, pipeline.chat_format(tok))


# ---------------------------------------------------------------------------------------------------------
# Strategies.

# Any Unicode, lone surrogates (which JSON can carry as escapes), control characters and the tags included.
odd_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
    st.sampled_from(["<image>", "<audio>", "<video>", "<speech>", "<|im_end|>", "<|im_start|>", "\x00", "\ufeff",
                     "\u202e", "e\u0301", "\U0001F600", "\r\n", " \t"]),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "\u4e2d", " ", "\n"]), st.integers(1000, 20000)),
)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), odd_text)
any_json = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=12)
role = st.one_of(st.sampled_from(["user", "assistant", "system"]), st.sampled_from(["bot", "", "USER"]), any_json)
part = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, odd_text),
    st.builds(lambda k, p: {"type": k, k: p}, st.sampled_from(["image", "audio", "video"]),
              st.one_of(st.text(string.ascii_letters + "/._:", max_size=20), any_json)),
    st.builds(lambda k: {"type": k}, st.sampled_from(["speech", "text", "file", ""])),
    any_json,
)
content = st.one_of(odd_text, st.lists(part, max_size=4), any_json)


@st.composite
def message(draw):
  if draw(st.booleans()):
    m = {"role": draw(role), "content": draw(content)}
  else:  # ShareGPT
    m = {"from": draw(st.sampled_from(["human", "gpt", "system", "user", "robot"])), "value": draw(content)}
  if draw(st.integers(0, 9)) == 0:
    m["speech"] = draw(any_json)
  return m


@st.composite
def record(draw):
  """A conversation-shaped object: mostly plausible, sometimes wrong in one or several places."""
  messages = draw(st.lists(message(), max_size=5))
  if draw(st.booleans()):  # a well-formed exchange first, so some records are valid
    messages = [{"role": "user", "content": draw(odd_text)},
                {"role": "assistant", "content": draw(odd_text)}] + messages[:2]
  rec = {"messages" if draw(st.booleans()) else "conversations": messages}
  for key in ("images", "audios", "videos", "system", "id", "use_audio_in_video", "speech_output"):
    if draw(st.integers(0, 5)) == 0:
      rec[key] = draw(any_json)
  return draw(st.one_of(st.just(rec), any_json)) if draw(st.integers(0, 7)) == 0 else rec


@st.composite
def jsonl_line(draw) -> bytes:
  """One line of a JSONL file (no newline inside)."""
  kind = draw(st.sampled_from(["valid", "valid", "truncated", "json", "latin1", "blank", "bytes"]))
  if kind == "valid":
    return json.dumps(draw(record())).encode()
  if kind == "truncated":
    text = json.dumps(draw(record())).encode()
    return text[:draw(st.integers(0, max(0, len(text) - 1)))]
  if kind == "json":
    return json.dumps(draw(any_json)).encode()
  if kind == "latin1":  # a file saved as latin-1: not UTF-8
    return json.dumps({"messages": [{"role": "user", "content": "caf\u00e9"},
                                    {"role": "assistant", "content": draw(st.text("abc", max_size=5))}]},
                      ensure_ascii=False).encode("latin-1")
  if kind == "blank":
    return draw(st.sampled_from([b"", b" ", b"\t", b"\r", b"  \r"]))
  return draw(st.binary(max_size=60)).replace(b"\n", b"")


# ---------------------------------------------------------------------------------------------------------
# Properties.


def _check_conversation(conv):
  assert isinstance(conv["id"], str)
  assert any(m["role"] == "assistant" for m in conv["messages"])
  for m in conv["messages"]:
    assert m["role"] in ("system", "user", "assistant")
    for p in m["content"]:
      assert p["type"] in ("text",) + sources.MEDIA_KINDS
      assert isinstance(p["text" if p["type"] == "text" else "path"], str)


@FUZZ
@given(rec=record(), as_text=st.booleans())
def test_normalize_accepts_or_raises_a_record_error(rec, as_text):
  try:
    conv = sources.normalize(json.dumps(rec) if as_text else rec, "/data", "fuzz.jsonl:1")
  except sources.RecordError as e:
    assert e.reason in preprocess.REASONS and str(e)
    return
  _check_conversation(conv)


@FUZZ
@given(line=jsonl_line())
def test_the_preprocessor_gives_a_sample_or_a_sample_error(line):
  example = {"id": b"fuzz.jsonl:1", "record": line, "root": b"/nonexistent"}
  try:
    s = _prep()("fuzz", example)
  except preprocess.SampleError as e:
    assert e.reason in preprocess.REASONS, e.reason
    return
  assert s.input_ids.dtype == np.int32 and s.input_ids.shape == s.labels.shape and s.num_tokens > 0
  learned = s.labels != batch_lib.IGNORE
  assert learned.any()  # an accepted record has something to learn
  assert (s.labels[learned] >= 0).all()


def _read_and_pack(path, tmp_path):
  """Every line of the file through the store's reader, the Preprocessor and the packer (one finite pass)."""
  examples = [{"id": key, "record": line, "root": root} for key, line, root in sources._jsonl_lines([str(path)])]  # pylint: disable=protected-access
  ds = grain.MapDataset.source(examples).map(lambda e: ("fuzz", e)).to_iter_dataset()
  packed = packing.PackedDataset(ds, _prep(), [packing.Bucket(seq_len=4096, batch_size=2)], max_lag=8,
                                 limits=packing.SkipLimits(max_skip_ratio=1.0, max_records_without_batch=10 ** 6))
  samples, skipped = [], []
  for batch, info in packed:
    samples += info["samples"]
    skipped += info["skipped"]
    if batch is not None:
      assert batch["input_ids"].shape == (2, 4096)
  return len(examples), samples, skipped


@settings(FUZZ, max_examples=25)
@given(lines=st.lists(jsonl_line(), min_size=1, max_size=8), trailing_newline=st.booleans())
def test_every_line_is_packed_or_counted_as_skipped(tmp_path_factory, lines, trailing_newline):
  path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
  path.write_bytes(b"\n".join(lines) + (b"\n" if trailing_newline else b""))
  read, samples, skipped = _read_and_pack(path, path.parent)
  expected_lines = len(lines) if trailing_newline or lines[-1] else len(lines) - 1  # a last empty line is no line
  assert read == max(expected_lines, 0)
  assert len(samples) + len(skipped) == read, (samples, skipped)
  assert len(set(samples) | {s[0] for s in skipped}) == read  # each line once, under its own id
  for _, reason, message in skipped:
    assert reason in preprocess.REASONS and message
  assert not any(r == "error" for _, r, _ in skipped), skipped  # no unforeseen failure

"""Issue 14, point 5 (and the skip reporting of point 8): bad input is one clear line with exit status 2, and bad
JSONL lines are counted under their reason (logged once per line, counted every epoch).

- Misspelled `--config` keys name the closest key; bad flag values, mesh errors and a missing init_from are one
  `error:` line and exit status 2 (train.py, eval.py, `python -m omni_jax.convert`).
- A truncated safetensors shard is named.
- Non-UTF-8 and blank JSONL lines are skipped as not_utf8 / blank_line (never trained on with replacement
  characters); an empty JSONL fails with a DataError naming the file.
"""

import json
import logging
import os
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

import train_testlib as lib
from configs import tiny
from omni_jax import cli
from omni_jax.input import pipeline
from omni_jax.input import sources

ROOT = lib.ROOT


def _run(script, *args, timeout=300):
  return subprocess.run([sys.executable, *([script] if script.endswith(".py") else ["-m", script]), *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _one_error_line(out):
  """The run's single `error:` line (asserting exit status 2 and no traceback)."""
  text = out.stdout + out.stderr
  assert out.returncode == cli.USER_ERROR, text[-3000:]
  assert "Traceback" not in text, text[-3000:]
  errors = [l for l in text.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, text[-3000:]
  return errors[0]


# ---------------------------------------------------------------------------------------------------------
# Config keys and flags.


def test_unknown_key_suggests_the_closest():
  c = tiny.get_config()
  assert cli.unknown_key(c, "train.steps") is None
  assert cli.unknown_key(c, "train.stpes") == "config.train.stpes is not a config key; did you mean config.train.steps?"
  assert cli.unknown_key(c, "trian.steps") == "config.trian is not a config key; did you mean config.train?"
  far = cli.unknown_key(c, "train.zzzzzz")
  assert far.startswith("config.train.zzzzzz is not a config key; config.train has: ") and "steps" in far
  assert "has no field 'x'" in cli.unknown_key(c, "train.steps.x")


@pytest.mark.parametrize("override,expected", [
    ("--config.train.stpes=5", "error: config.train.stpes is not a config key; did you mean config.train.steps?"),
    ("--config.dtaa.seed=1", "error: config.dtaa is not a config key; did you mean config.data?"),
    ("--config.train.steps=abc", "error: flag --config.train.steps=abc: invalid literal for int() with base 10: 'abc'"),
])
def test_bad_config_flags_are_one_line_with_exit_status_2(tmp_path, override, expected):
  out = _run("train.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"), override, timeout=120)
  assert _one_error_line(out) == expected
  assert not os.path.exists(tmp_path / "w")  # it stopped before touching the workdir


def test_eval_py_names_a_misspelled_key_too(tmp_path):
  out = _run("eval.py", "--config", "configs/tiny.py", "--checkpoint", str(tmp_path), "--config.eval.stesp=1",
             timeout=120)
  assert _one_error_line(out) == "error: config.eval.stesp is not a config key; did you mean config.eval.steps?"


def test_mesh_and_init_from_errors_are_one_line(tmp_path):
  out = _run("train.py", "--workdir", str(tmp_path / "a"), *lib.flags(), "--config.mesh.data=3")
  line = _one_error_line(out)
  assert re.fullmatch(r"error: config.mesh {.data.: 3, .*} needs 3 devices, \d+ are present", line), line
  out = _run("train.py", "--workdir", str(tmp_path / "b"), *lib.flags(), f"--config.init_from={tmp_path}/nowhere")
  line = _one_error_line(out)
  assert line.startswith(f"error: {tmp_path}/nowhere: no parameters checkpoint")


# ---------------------------------------------------------------------------------------------------------
# A truncated safetensors shard.


def test_truncated_safetensors_shard_is_named(tmp_path):
  from omni_jax.convert import hf
  from omni_jax.models import omni

  config = lib.config()
  config.model.thinker.text.update(dict(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                                        num_attention_heads=2, num_key_value_heads=1))
  for tower in ("vision", "audio"):
    config.model.thinker[tower] = None
  _, abstract = omni.abstract_model(config)
  state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  src = tmp_path / "hf"
  hf.save(str(src), config, state)
  shards = sorted(p for p in os.listdir(src) if p.endswith(".safetensors"))
  shard = src / shards[0]
  data = shard.read_bytes()
  shard.write_bytes(data[:len(data) // 2])
  out = _run("omni_jax.convert", "--hf_dir", str(src), "--out_dir", str(tmp_path / "out"))
  line = _one_error_line(out)
  assert line.startswith(f"error: {shard}: not a readable safetensors file (") and "truncated" in line
  assert not os.path.exists(tmp_path / "out" / "params")


# ---------------------------------------------------------------------------------------------------------
# Bad JSONL lines.


def _chat(i):
  return json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                  {"role": "assistant", "content": f"Answer {i}."}]})


def _jsonl_config(tmp_path, path):
  c = tiny.get_config()
  c.data.source = "jsonl"
  c.data.datasets = ml_collections.ConfigDict({"mine": {"train": str(path)}})
  c.data.mixture = ml_collections.ConfigDict({"mine": 1.0})
  c.data.tfds_data_dir = str(tmp_path / "tfds")
  c.data.shuffle = False
  c.data.buckets = (dict(seq_len=64, max_images=0, max_image_patches=0, max_videos=0, max_video_patches=0,
                         max_audios=0, max_audio_frames=0),)
  c.train.update(dict(batch_size=2, seq_len=64))
  return c


def test_bad_lines_are_counted_under_their_reason_and_logged_once(tmp_path, caplog):
  good = [_chat(i).encode() for i in range(6)]
  not_utf8 = _chat(99).replace("Answer", "R\u00e9ponse").encode("latin-1")  # a latin-1 file's e-acute
  lines = [b"\xef\xbb\xbf" + good[0], good[1], b"", good[2], not_utf8, b"   ", good[3], good[4], good[5]]
  path = tmp_path / "data.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  it = pipeline.make_iterator(_jsonl_config(tmp_path, path), worker_count=0)
  try:
    with caplog.at_level(logging.WARNING, logger="omni_jax.input.pipeline"):
      samples = []
      while it.metrics().get("samples", 0) < 18:  # three epochs of the six good lines
        batch = next(it)
        samples.append(batch)
    m = it.metrics()
  finally:
    it.close()
  epochs = m["samples"] // 6
  assert m["samples"] >= 18 and m["skipped/blank_line"] >= 2 * (epochs - 1) and m["skipped/not_utf8"] >= epochs - 1
  assert m["skipped"] == m["skipped/blank_line"] + m["skipped/not_utf8"]  # the BOM line is a good record
  logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped sample")]
  assert sorted(logged) == sorted([
      f"skipped sample mine/data.jsonl:3 (blank_line): {path}:3: blank line",
      f"skipped sample mine/data.jsonl:6 (blank_line): {path}:6: blank line",
      f"skipped sample mine/data.jsonl:5 (not_utf8): {path}:5: not UTF-8 (byte {not_utf8.index(0xe9) + 1} of the "
      "line is b'\\xe9'); "
      "re-encode the file as UTF-8"]), logged  # once each, though every epoch skipped them again
  # Nothing decoded with replacement characters reached a batch: the only text that differs is the bad line's.
  tokens = np.concatenate([b["input_ids"].ravel() for b in samples])
  assert tokens.size and not np.isin(tokens, [sources_replacement_id()]).any()


def sources_replacement_id():
  """The token of U+FFFD (what errors="replace" decoding used to put into a non-UTF-8 line)."""
  from omni_jax.input.tokenizer import Tokenizer

  ids = Tokenizer().encode("\ufffd")
  assert len(ids) == 1
  return ids[0]


def test_every_line_of_a_file_is_a_record_or_a_counted_bad_line(tmp_path):
  path = tmp_path / "lines.jsonl"
  path.write_bytes(b"\n".join([_chat(0).encode(), b"", b"\xff\xfe", b"{", _chat(1).encode()]) + b"\n\n")
  name = sources.build("lines", {"train": str(path)}, str(tmp_path / "tfds"))
  src = sources.open_split(name, "train", str(tmp_path / "tfds"))
  reasons = []
  for i in range(len(src)):
    rid, record, root = sources.decode_example(src[i])
    try:
      sources.normalize(record, root, rid)
      reasons.append("ok")
    except sources.RecordError as e:
      reasons.append(e.reason)
  assert len(src) == 6  # every line, the blank ones included
  assert sorted(reasons) == sorted(["ok", "blank_line", "not_utf8", "malformed", "ok", "blank_line"])


def test_empty_jsonl_is_a_data_error_naming_the_file(tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n  \n")
  with pytest.raises(sources.DataError, match=f"dataset 'e' split 'train': {empty} is empty"):
    sources.build("e", {"train": str(empty)}, str(tmp_path / "tfds"))
  cfg = tmp_path / "cfg.py"
  cfg.write_text(f'''
import ml_collections
from configs import tiny


def get_config():
  c = tiny.get_config()
  c.data.source = "jsonl"
  c.data.datasets = ml_collections.ConfigDict({{"e": {{"train": {str(empty)!r}}}}})
  c.data.mixture = ml_collections.ConfigDict({{"e": 1.0}})
  c.data.tfds_data_dir = {str(tmp_path / "tfds")!r}
  c.train.eval_every = 0
  return c
''')
  out = _run("train.py", "--config", str(cfg), "--workdir", str(tmp_path / "w"))
  assert _one_error_line(out) == f"error: dataset 'e' split 'train': {empty} is empty (no JSONL line to read)"


# ---------------------------------------------------------------------------------------------------------
# Point 8: worker processes leave no shared memory behind; skip counts in the progress bar.

_WORKER_SCRIPT = '''
import sys
sys.path.insert(0, {root!r})
import ml_collections
from configs import tiny
from omni_jax.input import pipeline

KEPT = []  # batches alive until the interpreter exits: grain's own clean-up of their memory never runs


def main():
  c = tiny.get_config()
  c.data.source = "jsonl"
  c.data.datasets = ml_collections.ConfigDict({{"mine": {{"train": {path!r}}}}})
  c.data.mixture = ml_collections.ConfigDict({{"mine": 1.0}})
  c.data.tfds_data_dir = {tfds!r}
  c.data.buckets = (dict(seq_len=64, max_images=0, max_image_patches=0, max_videos=0, max_video_patches=0,
                         max_audios=0, max_audio_frames=0),)
  c.train.update(dict(batch_size=2, seq_len=64))
  it = pipeline.make_iterator(c, worker_count=1)
  KEPT.extend(next(it) for _ in range(4))
  it.close()
  print("batches", len(KEPT), flush=True)


if __name__ == "__main__":
  main()
'''


def test_grain_workers_leak_no_shared_memory(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(_chat(i) for i in range(12)) + "\n")
  script = tmp_path / "workers.py"
  script.write_text(_WORKER_SCRIPT.format(root=ROOT, path=str(path), tfds=str(tmp_path / "tfds")))
  out = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "batches 4" in out.stdout, out.stderr[-3000:]
  assert "leaked shared_memory" not in out.stderr, out.stderr[-3000:]  # was: "20 leaked shared_memory objects"


def test_the_progress_bar_shows_the_skip_counts(capsys):
  from omni_jax.train import metrics

  bar = metrics.Progress(10, 0)
  bar.update(3, 1.5, 100.0, 0.25, {"malformed": 2.0, "not_utf8": 1.0, "too_long": 0.0})
  bar.close()
  err = capsys.readouterr().err
  assert "skipped=3 (malformed:2,not_utf8:1)" in err and "loss=1.5000" in err

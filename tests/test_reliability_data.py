"""Issue 14, points 1 and 2: bad data and failing evaluations never hang a run or cost training work.

- A stream of only bad samples stops with one `error:` line naming the dataset and the skip reasons (no hang).
- SIGTERM while the loop waits for data: a clean exit with a checkpoint.
- A missing validation split fails at startup, before any training.
- An evaluation that raises is reported; the step's checkpoint exists and the run goes on.
"""

import json
import os
import signal
import subprocess
import sys
import time

import grain
import ml_collections
import numpy as np
import pytest

import xla_env
from omni_jax import config as config_lib
from omni_jax import defaults
from omni_jax.errors import ConfigError
from omni_jax.input import packing
from omni_jax.input.preprocess import Sample, SampleError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------
# The packer's limits, in process.


def _sample(name, n=8):
  ids = np.arange(n, dtype=np.int32) + 10
  return Sample(name=name, input_ids=ids, labels=ids, kind=0, images=[], videos=[], audios=[],
                use_audio_in_video=False)


def _prep(dataset, example):
  if example["bad"]:
    raise SampleError("malformed", f"{dataset}/{example['id']}: not a conversation")
  return _sample(f"{dataset}/{example['id']}")


def _packed(records, limits, repeat=True):
  ds = grain.MapDataset.source(records)
  ds = (ds.repeat() if repeat else ds).to_iter_dataset()
  return iter(packing.PackedDataset(ds, _prep, [packing.Bucket(seq_len=32, batch_size=2)], max_lag=16,
                                    limits=limits))


def test_all_bad_stream_stops_with_an_error_naming_dataset_and_reasons():
  records = [("broken", {"id": f"x.jsonl:{i}", "bad": True}) for i in range(7)]
  it = _packed(records, packing.SkipLimits(max_records_without_batch=500))
  t0 = time.time()
  with pytest.raises(packing.TooManySkips) as e:
    next(it)
  assert time.time() - t0 < 30
  msg = str(e.value)
  assert "no batch after 500 records" in msg and "max_records_without_batch=500" in msg
  assert "'broken'" in msg and "malformed: 500" in msg and "broken/x.jsonl:0" in msg
  assert len(it._skipped) <= 500  # the skips waiting for a batch are bounded by the limit
  assert isinstance(e.value, ValueError)  # a sources.DataError: train.py turns it into one line


def test_skip_ratio_limit():
  # Two of three records bad: batches keep coming, but the ratio trips once enough records were read.
  records = [("half", {"id": f"r{i}", "bad": i % 3 != 0}) for i in range(30)]
  it = _packed(records, packing.SkipLimits(max_skip_ratio=0.5, skip_ratio_min_records=60))
  with pytest.raises(packing.TooManySkips, match=r"max_skip_ratio=0.5; dataset 'half': \d+ of \d+ records skipped"):
    for _ in range(1000):
      next(it)
  # The same stream is fine under a looser ratio.
  it = _packed(records, packing.SkipLimits(max_skip_ratio=0.7, skip_ratio_min_records=60))
  assert all(next(it)[0] is not None for _ in range(50))


def test_a_finite_all_bad_split_ends_without_error():
  records = [("broken", {"id": str(i), "bad": True}) for i in range(5)]
  out = list(_packed(records, packing.SkipLimits(), repeat=False))
  assert len(out) == 1 and out[0][0] is None and len(out[0][1]["skipped"]) == 5


def test_interrupt_stops_a_waiting_packer():
  records = [("broken", {"id": str(i), "bad": True}) for i in range(5)]
  it = _packed(records, packing.SkipLimits(max_records_without_batch=10 ** 9, max_skip_ratio=1.0))
  packing.interrupt()
  try:
    with pytest.raises(packing.Interrupted):
      next(it)
  finally:
    packing.clear_interrupt()


@pytest.mark.parametrize("key,value,match", [
    ("max_records_without_batch", 0, "positive integer"),
    ("max_records_without_batch", 100, "must exceed config.data.max_lag=512"),
    ("skip_ratio_min_records", -1, "positive integer"),
    ("max_skip_ratio", 0.0, r"must be in \(0, 1\]"),
    ("max_skip_ratio", 1.5, r"must be in \(0, 1\]"),
])
def test_limits_are_validated(key, value, match):
  c = defaults.base_config()
  c.data.max_lag = 512
  c.data[key] = value
  with pytest.raises(ConfigError, match=f"config.data.{key}: .*{match}"):
    config_lib.validate_train(c)


def test_defaults_are_valid():
  c = defaults.base_config()
  config_lib.validate_train(c)
  assert packing.SkipLimits.from_config(c.data) == packing.SkipLimits()


# ---------------------------------------------------------------------------------------------------------
# train.py in a subprocess on small JSONL datasets (configs/tiny.py with one short text-only bucket).


def _chat(i):
  return json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                  {"role": "assistant", "content": f"Answer {i}."}]})


def _write(path, lines):
  path.write_text("\n".join(lines) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("reliability")
  return dict(good=_write(d / "good.jsonl", [_chat(i) for i in range(24)]),
              bad=_write(d / "bad.jsonl", ["{this is not json"] * 12), tfds=str(d / "tfds"))


def _config_file(tmp_path, files, datasets):
  path = tmp_path / "cfg.py"
  path.write_text(f'''
import ml_collections
from configs import tiny


def get_config():
  c = tiny.get_config()
  c.data.source = "jsonl"
  c.data.datasets = ml_collections.ConfigDict({datasets!r})
  c.data.mixture = ml_collections.ConfigDict({ {n: 1.0 for n in datasets}!r})
  c.data.tfds_data_dir = {files["tfds"]!r}
  c.data.buckets = (dict(seq_len=64, max_images=0, max_image_patches=0, max_videos=0, max_video_patches=0,
                         max_audios=0, max_audio_frames=0),)
  c.train.update(dict(steps=3, batch_size=2, seq_len=64, log_every=1, warmup_steps=1, checkpoint_every=0,
                      eval_every=0))
  c.eval.update(dict(steps=1, batch_size=2))
  return c
''')
  return str(path)


def _launch(tmp_path, cfg, *extra):
  workdir = tmp_path / "run"
  log = open(tmp_path / "run.log", "w")
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", cfg, "--workdir", str(workdir), *extra]
  # One host device: these runs check how data faults are handled, not a mesh.
  return subprocess.Popen(cmd, cwd=ROOT, env=xla_env.env(1), stdout=log, stderr=subprocess.STDOUT), workdir


def _log(tmp_path):
  return (tmp_path / "run.log").read_text()


def _error_lines(text):
  return [l for l in text.splitlines() if l.startswith("error:")]


def _steps(workdir):
  d = workdir / "checkpoints"
  return sorted(int(p) for p in os.listdir(d) if p.isdigit()) if d.exists() else []


def _metrics(workdir):
  path = workdir / "metrics.jsonl"
  return [json.loads(l) for l in open(path)] if path.exists() else []


def test_all_bad_dataset_exits_with_one_error_line(tmp_path, files):
  cfg = _config_file(tmp_path, files, {"broken": {"train": files["bad"]}})
  proc, workdir = _launch(tmp_path, cfg, "--config.data.max_records_without_batch=300")
  rc = proc.wait(timeout=300)  # no hang
  text = _log(tmp_path)
  assert rc != 0, text
  errors = _error_lines(text)
  assert len(errors) == 1, text
  assert "no batch after 300 records" in errors[0] and "'broken'" in errors[0] and "malformed: 300" in errors[0]
  assert "Traceback" not in text
  assert _steps(workdir) == [] and not any("train/loss" in m for m in _metrics(workdir))


def test_sigterm_while_waiting_for_data_saves_and_exits(tmp_path, files):
  cfg = _config_file(tmp_path, files, {"broken": {"train": files["bad"]}})
  proc, workdir = _launch(tmp_path, cfg, "--config.data.max_records_without_batch=1000000000",
                          "--config.data.max_skip_ratio=1.0")
  try:
    end = time.time() + 240
    while time.time() < end and proc.poll() is None and "still no batch after" not in _log(tmp_path):
      time.sleep(0.1)
    assert proc.poll() is None, _log(tmp_path)
    assert "still no batch after" in _log(tmp_path)  # the wait is reported while it lasts
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  text = _log(tmp_path)
  assert rc == 0, text
  assert "preempted while waiting for data: saving step 0" in text
  assert _steps(workdir) == [0]
  assert os.path.exists(workdir / "checkpoints" / "0" / "data")


def test_missing_validation_split_fails_at_startup(tmp_path, files):
  cfg = _config_file(tmp_path, files, {"mine": {"train": files["good"]}})
  proc, workdir = _launch(tmp_path, cfg, "--config.train.eval_every=2")
  rc = proc.wait(timeout=300)
  text = _log(tmp_path)
  assert rc != 0, text
  errors = _error_lines(text)
  assert len(errors) == 1, text
  assert "config.train.eval_every=2 needs the evaluation data" in errors[0]
  assert "mine" in errors[0] and "split 'validation'" in errors[0]
  assert "Traceback" not in text
  assert _steps(workdir) == [] and not any("train/loss" in m for m in _metrics(workdir))  # before any training


def test_failing_evaluation_is_reported_and_training_goes_on(tmp_path, files):
  cfg = _config_file(tmp_path, files, {"mine": {"train": files["good"], "validation": files["bad"]}})
  proc, workdir = _launch(tmp_path, cfg, "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
                          "--config.data.max_records_without_batch=300")
  rc = proc.wait(timeout=480)
  text = _log(tmp_path)
  assert rc == 0, text
  assert "step 2: evaluation failed, training goes on: TooManySkips" in text
  assert _steps(workdir) == [2, 3]  # the step of the failed evaluation was saved, and the run went on
  metrics = _metrics(workdir)
  assert [m["step"] for m in metrics if "eval/failed" in m] == [2]
  assert sorted(m["step"] for m in metrics if "train/loss" in m) == [1, 2, 3]
  errors = [json.loads(l) for l in open(workdir / "eval_errors.jsonl")]
  assert [e["step"] for e in errors] == [2] and "no batch after 300 records" in errors[0]["error"]

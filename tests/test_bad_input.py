"""Bad input never stops a run: each bad sample is skipped with a warning naming it and counted by reason;
a dataset path that does not exist fails at startup with a message naming it."""

import json
import logging

import numpy as np
import pytest
import soundfile
from PIL import Image

from omni_jax.input import pipeline, sources


def _chat(user, answer="ok", **extra):
  return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **extra}


@pytest.fixture(scope="module")
def bad_set(tmp_path_factory):
  """A JSONL file mixing good samples with every kind of bad one; returns (path, good ids, {line: reason})."""
  d = tmp_path_factory.mktemp("bad")
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)).save(d / "ok.png")
  soundfile.write(d / "ok.wav", 0.1 * np.sin(np.arange(16000) / 5.0).astype(np.float32), 16000)
  (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  (d / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage")
  (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage")
  good = [_chat(f"Question {i}?", f"Answer {i}.") for i in range(6)]
  good += [_chat("<image>What is it?", "Noise.", images=["ok.png"]),
           _chat([{"type": "audio", "audio": "ok.wav"}, {"type": "text", "text": "Transcribe."}], "A tone.")]
  bad = [
      ("missing_media", _chat("<image>Look.", images=["does_not_exist.png"])),
      ("bad_media", _chat("<image>Look.", images=["broken.png"])),
      ("bad_media", _chat("<audio>Listen.", audios=["broken.wav"])),
      ("bad_media", _chat([{"type": "video", "video": "broken.mp4"}])),
      ("too_long", _chat("word " * 400)),
      ("unknown_tag", _chat([{"type": "pdf", "pdf": "a.pdf"}, {"type": "text", "text": "Summarise."}])),
      ("unknown_tag", _chat("<pdf>Summarise.", pdfs=["a.pdf"])),
      ("malformed", "{this is not json"),
      ("malformed", {"messages": [{"role": "user", "content": "no answer"}]}),
      ("malformed", _chat("<image><image>Two?", images=["ok.png"])),
  ]
  lines, good_lines, bad_lines = [], [], {}
  for rec in good:
    lines.append(json.dumps(rec))
    good_lines.append(len(lines))
  for reason, rec in bad:
    lines.append(rec if isinstance(rec, str) else json.dumps(rec))
    bad_lines[len(lines)] = reason
  # Interleave so that bad samples sit between good ones (TFDS shuffles record order anyway).
  path = d / "mixed.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return path, {f"mine/mixed.jsonl:{n}" for n in good_lines}, {f"mine/mixed.jsonl:{n}": r for n, r in bad_lines.items()}


def config(path, tmp, **data):
  return dict(seed=0, train=dict(batch_size=2, seq_len=128), data=dict(
      source="jsonl", datasets={"mine": {"train": str(path), "validation": str(path)}}, tfds_data_dir=str(tmp),
      eval_repeat=False, prefetch=0, media=dict(image_max_pixels=8 * 28 * 28),
      buckets=(dict(seq_len=128, max_images=1, max_image_patches=64, max_videos=1, max_video_patches=64,
                    max_audios=1, max_audio_frames=200),), **data))


def test_every_bad_sample_is_skipped_named_and_counted(bad_set, tmp_path, caplog):
  path, good, bad = bad_set
  it = pipeline.make_iterator(config(path, tmp_path), split="validation")  # one pass, then StopIteration
  packed = []
  with caplog.at_level(logging.WARNING, logger="omni_jax.input.pipeline"):
    for _ in it:
      packed += it.last_info["samples"]
  assert sorted(packed) == sorted(good)  # every good sample, once; the run went to the end
  m = it.metrics()
  assert m["skipped"] == len(bad)
  for reason in set(bad.values()):
    assert m[f"skipped/{reason}"] == list(bad.values()).count(reason), reason
  warnings = [r.getMessage() for r in caplog.records]
  for name, reason in bad.items():
    assert any(name in w and f"({reason})" in w for w in warnings), (name, reason)
  msg = next(w for w in warnings if "does_not_exist.png" in w)
  assert "mine/mixed.jsonl:" in msg and "does not exist" in msg


def test_skips_are_counted_through_worker_processes(bad_set, tmp_path, caplog):
  path, good, bad = bad_set
  it = pipeline.make_iterator(config(path, tmp_path, worker_count=1), split="validation")
  with caplog.at_level(logging.WARNING, logger="omni_jax.input.pipeline"):
    packed = [n for _ in it for n in it.last_info["samples"]]
  it.close()
  assert sorted(packed) == sorted(good)
  assert it.metrics()["skipped"] == len(bad)
  assert sum("skipped sample mine/mixed.jsonl:" in r.getMessage() for r in caplog.records) == len(bad)


def test_training_keeps_going_past_bad_samples(bad_set, tmp_path):
  path, good, _ = bad_set
  it = pipeline.make_iterator(config(path, tmp_path))  # endless, shuffled
  names = [n for _ in range(12) for n in (next(it), it.last_info)[1]["samples"]]
  assert set(names) == good and it.metrics()["skipped"] > 0


def test_missing_dataset_path_fails_at_startup(tmp_path):
  cfg = config(tmp_path / "nowhere" / "data.jsonl", tmp_path)
  with pytest.raises(sources.DataError, match=r"dataset 'mine' split 'train': '.*nowhere/data.jsonl' does not exist"):
    pipeline.make_iterator(cfg)

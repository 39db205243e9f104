"""The grain pipeline on the demo corpus: contract, mixture weights, determinism, checkpoint / restore (in
process and with worker processes), host sharding, the held-out split, and no jax in the data path."""

import collections
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from omni_jax import batch as batch_lib
from omni_jax.input import mixing, pipeline, sources

WEIGHTS = dict(asr=3.0, image=2.0, video=0.5, text=2.0, speech=1.0, digits=2.0)


def config(demo_dir, **data):
  c = dict(seed=0, train=dict(batch_size=4, seq_len=256))
  c["data"] = dict(source="demo", demo_dir=demo_dir, mixture=WEIGHTS, max_lag=64, prefetch=0,
                media=dict(image_max_pixels=16 * 28 * 28, video_fps=0.5, video_min_pixels=8 * 28 * 28,
                           video_max_pixels=8 * 28 * 28),
                buckets=(dict(seq_len=256, max_images=2, max_image_patches=256, max_videos=1, max_video_patches=128,
                              max_audios=3, max_audio_frames=600),
                         dict(seq_len=512, max_images=2, max_image_patches=256, max_videos=1, max_video_patches=128,
                              max_audios=3, max_audio_frames=600)))
  c["data"].update(data)
  return c


def take(it, n):
  out = [(next(it), it.last_info) for _ in range(n)]
  return out


def assert_same(a, b):
  assert len(a) == len(b)
  for (x, xi), (y, yi) in zip(a, b):
    assert xi["samples"] == yi["samples"]
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def stream(demo_dir):
  """The first 7 batches (and the counters after them) of an uninterrupted run; max_lag is small so that the
  rare bucket is emitted early and a restore has waiting samples to replay."""
  it = pipeline.make_iterator(config(demo_dir, max_lag=16))
  return take(it, 7), it.metrics()


def test_batches_follow_the_contract(stream):
  batches, m = stream
  seen = collections.Counter()
  for batch, info in batches:
    batch_lib.check(batch)
    assert batch["input_ids"].shape in ((4, 256), (4, 512))
    assert batch["audio_features"].shape[1:] == (3, 128, 600) and batch["pixel_values"].shape[1:] == (256, 1176)
    for r in range(4):
      segs = batch["segment_ids"][r]
      assert (batch["labels"][r][segs == 0] == batch_lib.IGNORE).all()
    seen.update(info["kinds"])
  assert m["batches"] == 7 and m["samples"] == sum(seen.values()) and m["tokens"] <= m["slots"]
  assert m["tokens"] / m["slots"] > 0.5 and m["loss_tokens"] > 0
  assert set(seen) >= {"text", "image", "audio"}


def test_mixture_weights_hold(demo_dir):
  """Over 2000 records each dataset's share is within 0.5% of its weight; packed samples follow (6%)."""
  from data import demo_corpus

  names = demo_corpus.tfds_names(demo_dir)
  opened = {n: sources.open_split(t, "train", demo_corpus.tfds_dir(demo_dir)) for n, t in names.items()}
  streams = {n: mixing.train_stream(src, n, seed=3) for n, src in opened.items()}
  it = iter(mixing.mix(streams, WEIGHTS))
  counts = collections.Counter(next(it)[0] for _ in range(2000))
  total = sum(WEIGHTS.values())
  for n, w in WEIGHTS.items():
    assert abs(counts[n] / 2000 - w / total) < 0.005, (n, counts[n])
  # The packed stream (decoded, rendered, packed) keeps the proportions up to the samples still waiting.
  it = pipeline.make_iterator(config(demo_dir))
  packed = collections.Counter()
  while sum(packed.values()) < 120:
    next(it)
    packed.update(name.split("/")[0] for name in it.last_info["samples"])
  n = sum(packed.values())
  for name, w in WEIGHTS.items():
    assert abs(packed[name] / n - w / total) < 0.06, (name, packed)


def test_same_seed_same_batches_and_restore_mid_epoch(demo_dir, stream):
  """A second run with the same seed gives the same batches; stopped after 3 and restored from the JSON state
  in a new iterator, it continues with exactly the batches of the uninterrupted run."""
  expected, _ = stream
  first = pipeline.make_iterator(config(demo_dir, max_lag=16))
  assert_same(take(first, 3), expected[:3])
  state = json.loads(json.dumps(first.get_state()))  # what the checkpoint stores
  resumed = pipeline.make_iterator(config(demo_dir, max_lag=16))
  resumed.set_state(state)
  assert_same(take(resumed, 4), expected[3:])
  assert resumed.metrics()["batches"] == 7  # counters are restored too
  other = take(pipeline.make_iterator(config(demo_dir, max_lag=16, seed=1)), 1)
  assert other[0][1]["samples"] != expected[0][1]["samples"]


def test_hosts_read_disjoint_records(demo_dir):
  from data import demo_corpus

  src = sources.open_split(demo_corpus.tfds_names(demo_dir)["asr"], "train", demo_corpus.tfds_dir(demo_dir))
  ids = []
  for p in range(2):
    it = iter(mixing.train_stream(src, "asr", seed=0, process_index=p, process_count=2))
    ids.append({sources.decode_example(next(it)[1])[0] for _ in range(len(src) // 2)})
  assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == len(src) // 2 * 2
  with pytest.raises(ValueError, match="outside"):
    mixing.train_stream(src, "asr", seed=0, process_index=2, process_count=2)


def test_make_source_gives_this_hosts_rows(demo_dir):
  it = pipeline.make_source(config(demo_dir), "train", 4, (2, 4))  # process 1 of 2
  batch = next(it)
  assert batch["input_ids"].shape[0] == 2
  with pytest.raises(ValueError, match="even share"):
    pipeline.make_source(config(demo_dir), "train", 4, (1, 4))


def test_eval_split_is_held_out_and_repeatable(demo_dir):
  a = take(pipeline.make_iterator(config(demo_dir), split="eval"), 2)
  assert_same(a, take(pipeline.make_iterator(config(demo_dir), split="eval"), 2))
  names = [n for _, info in a for n in info["samples"]]
  assert names and all(".validation.jsonl:" in n for n in names)


def test_startup_errors_are_clear(demo_dir, tmp_path):
  with pytest.raises(sources.DataError, match="does not exist"):
    pipeline.make_iterator(config(demo_dir, source="jsonl", datasets={"mine": str(tmp_path / "missing.jsonl")},
                                  mixture={"mine": 1.0}, tfds_data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match="unknown datasets"):
    pipeline.make_iterator(config(demo_dir, mixture={"asr": 1.0, "asrr": 2.0}))
  with pytest.raises(sources.DataError, match="demo corpus not found"):
    pipeline.make_iterator(config(str(tmp_path / "none"), build_demo=False))
  with pytest.raises(sources.DataError, match=r"config.data.source: unknown source 'demo2'.*recipes are \[.*'demo'"):
    pipeline.make_iterator(config(demo_dir, source="demo2"))
  with pytest.raises(ValueError, match="unknown keys"):
    pipeline.make_iterator(config(demo_dir, buckets=(dict(seq_len=64, max_pictures=1),)))


def test_the_data_path_never_imports_jax(tmp_path):
  """The data path runs with jax made unimportable (grain itself only uses jax, optionally, for profiling)."""
  (tmp_path / "t.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                             {"role": "assistant", "content": "Hello"}]}) + "\n")
  code = textwrap.dedent(f"""
      import sys
      sys.modules["jax"] = None  # any `import jax` now raises ImportError
      from omni_jax.input import pipeline
      it = pipeline.make_iterator(dict(seed=0, train=dict(batch_size=2, seq_len=64), data=dict(
          source="jsonl", datasets=dict(t="{tmp_path / 't.jsonl'}"), tfds_data_dir="{tmp_path / 'tfds'}",
          buckets=(dict(seq_len=64, max_audio_frames=200),))))
      batch = next(it)
      assert batch["input_ids"].shape == (2, 64), batch["input_ids"].shape
      bad = sorted(m for m in sys.modules if m.startswith(("flax", "omni_jax.models", "omni_jax.train")))
      assert not bad, bad
      print("ok")
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path))
  assert out.stdout.strip().endswith("ok"), out.stderr[-3000:]

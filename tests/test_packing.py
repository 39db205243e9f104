"""Packing invariants: segments never mix, positions restart per sample, labels and media line up, nothing is
dropped silently, buckets and the staleness limit behave."""

import functools

import jax
import numpy as np
import pytest

from omni_jax import batch as batch_lib
from omni_jax.config import TokenIds
from omni_jax.input import chat, packing, preprocess, sources
from omni_jax.input.packing import Bucket, Packer
from omni_jax.input.preprocess import Sample, SampleError
from omni_jax.input.tokenizer import Tokenizer
from omni_jax.positions import rope_index

D = packing.PATCH_DIM
rope = jax.jit(functools.partial(rope_index, ids=TokenIds()))


def fake(name, tokens, images=(), videos=(), audios=(), kind=0, seed=0):
  """A sample with random ids and media of the given sizes (patch counts, mel frame counts)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 1000, tokens).astype(np.int32)
  labels = np.where(rng.random(tokens) < 0.3, ids, batch_lib.IGNORE).astype(np.int32)
  return Sample(name, kind, ids, labels,
                [(rng.random((p, D), np.float32), np.array([1, 2, p // 2])) for p in images],
                [(rng.random((p, D), np.float32), np.array([2, 2, p // 4]), 1.0) for p in videos],
                [rng.random((128, f), np.float32) for f in audios])


BUCKETS = [Bucket(64, 2, max_images=2, max_image_patches=32, max_videos=1, max_video_patches=16, max_audios=2,
                  max_audio_frames=200),
           Bucket(256, 1, max_images=4, max_image_patches=64, max_videos=1, max_video_patches=32, max_audios=3,
                  max_audio_frames=400)]


def drain(packer, samples):
  out = []
  for i, s in enumerate(samples):
    try:
      done = packer.add(s, i)
    except SampleError:
      continue
    if done:
      out.append(done)
  while (i := packer.first_nonempty()) is not None:
    out.append(packer.emit(i) + (i,))
  return out


def check_batch(batch, samples, bucket):
  """Every contract invariant of one packed batch against the samples it holds (in row order)."""
  batch_lib.check(batch)
  assert batch["input_ids"].shape == (bucket.batch_size, bucket.seq_len)
  it = iter(samples)
  for r in range(bucket.batch_size):
    seg = batch["segment_ids"][r]
    n_real = int((seg > 0).sum())
    assert (seg[:n_real] > 0).all() and (seg[n_real:] == 0).all()  # padding only at the end
    assert (np.diff(seg[:n_real]) >= 0).all() and (np.diff(seg[:n_real]) <= 1).all()  # contiguous 1, 2, ...
    assert (batch["labels"][r][seg == 0] == batch_lib.IGNORE).all()
    row_images, row_videos, row_audios = [], [], []
    for k in range(1, int(seg.max(initial=0)) + 1):
      s = next(it)
      span = seg == k
      np.testing.assert_array_equal(batch["input_ids"][r][span], s.input_ids)
      np.testing.assert_array_equal(batch["labels"][r][span], s.labels)
      assert (batch["kind"][r][span] == s.kind).all()
      row_images += s.images
      row_videos += s.videos
      row_audios += s.audios
    start = 0
    for j, (rows, grid) in enumerate(row_images):
      np.testing.assert_array_equal(batch["pixel_values"][r, start:start + len(rows)], rows)
      np.testing.assert_array_equal(batch["image_grid_thw"][r, j], grid)
      start += len(rows)
    if "pixel_values" in batch:
      assert not batch["pixel_values"][r, start:].any() and not batch["image_grid_thw"][r, len(row_images):].any()
    for j, (rows, grid, spg) in enumerate(row_videos):
      np.testing.assert_array_equal(batch["video_grid_thw"][r, j], grid)
      assert batch["second_per_grids"][r, j] == spg
    for j, a in enumerate(row_audios):
      assert batch["audio_lengths"][r, j] == a.shape[1]
      np.testing.assert_array_equal(batch["audio_features"][r, j, :, :a.shape[1]], a)
      assert not batch["audio_features"][r, j, :, a.shape[1]:].any()
    if "audio_lengths" in batch:
      assert not batch["audio_lengths"][r, len(row_audios):].any()
  assert next(it, None) is None  # every sample of the batch was found in a row


def test_random_stream_packs_everything_exactly_once():
  rng = np.random.default_rng(0)
  samples = []
  for i in range(300):
    kind = int(rng.integers(0, 4))
    samples.append(fake(f"s{i}", int(rng.integers(2, 90)), images=[8] * (kind == 1) * int(rng.integers(1, 3)),
                        videos=[16] * (kind == 3), audios=[int(rng.integers(50, 300))] * (kind == 2), kind=kind,
                        seed=i))
  samples.append(fake("huge", 300))  # longer than every bucket
  samples.append(fake("many_images", 10, images=[8] * 5))  # more images than any row takes
  packer = Packer(BUCKETS, max_lag=10_000)
  done = drain(packer, samples)
  packed = [s.name for _, ss, _ in done for s in ss]
  assert sorted(packed) == sorted(s.name for s in samples[:300])  # the two misfits alone are missing
  for batch, ss, i in done:
    check_batch(batch, ss, packer.buckets[i])
  slots = sum(b.batch_size * b.seq_len for b in (packer.buckets[i] for _, _, i in done))
  assert sum(s.num_tokens for s in samples[:300]) / slots > 0.6  # first fit keeps padding modest


def test_too_long_names_the_sample_and_the_limits():
  with pytest.raises(SampleError, match="huge: 300 tokens.*largest: 256 tokens") as e:
    Packer(BUCKETS).add(fake("huge", 300), 0)
  assert e.value.reason == "too_long"
  with pytest.raises(SampleError, match="longest 500 mel frames"):
    Packer(BUCKETS).add(fake("long_audio", 10, audios=[500]), 0)


def test_smallest_bucket_that_fits():
  assert packing.bucket_for(fake("a", 60), BUCKETS) == 0
  assert packing.bucket_for(fake("b", 65), BUCKETS) == 1
  assert packing.bucket_for(fake("c", 10, images=[8, 8, 8]), BUCKETS) == 1  # 3 images: only the big bucket
  assert packing.bucket_for(fake("d", 10, audios=[300]), BUCKETS) == 1


def test_full_batch_is_emitted_and_the_sample_starts_the_next():
  p = Packer([Bucket(10, 2)])
  assert p.add(fake("a", 6), 0) is None and p.add(fake("b", 6), 1) is None  # two rows
  assert p.add(fake("c", 4), 2) is None  # first fit: row 0 (6 + 4 = 10)
  batch, samples, i = p.add(fake("d", 5), 3)  # fits neither row: the batch goes, d opens the next
  assert [s.name for s in samples] == ["a", "c", "b"] and i == 0
  assert batch["segment_ids"].tolist() == [[1] * 6 + [2] * 4, [1] * 6 + [0] * 4]
  assert [s.name for row in p.open[0].rows for s in row] == ["d"]


def test_stale_bucket_is_emitted_partly_filled():
  p = Packer([Bucket(10, 4), Bucket(100, 4)], max_lag=5)
  p.add(fake("long", 50), 0)
  for r in range(1, 5):
    p.add(fake(f"s{r}", 2), r)
    assert p.stale(r) is None
  assert p.stale(5) == 1  # "long" waited 5 reads
  batch, samples = p.emit(1)
  assert [s.name for s in samples] == ["long"] and batch["segment_ids"][1:].max() == 0


@pytest.fixture(scope="module")
def real_samples(demo_dir):
  """Preprocessed demo samples of every kind: audio, 1 and 2 images, plain and audio-in-video clips, text."""
  from data import demo_corpus

  tok = Tokenizer()
  prep = preprocess.Preprocessor(tok, chat.ChatFormat(special=tok.special), preprocess.MediaOptions(
      image_max_pixels=16 * 28 * 28, video_fps=1.0, video_min_pixels=8 * 28 * 28, video_max_pixels=8 * 28 * 28))
  names = demo_corpus.tfds_names(demo_dir)
  out = {}
  for dataset, want in (("asr", 3), ("image", 4), ("text", 3), ("speech", 2), ("video", 3)):
    ds = sources.open_split(names[dataset], "train", demo_corpus.tfds_dir(demo_dir))
    for i in range(len(ds)):
      rid, record, _ = sources.decode_example(ds[i])
      if dataset == "image" and "motorcycle_pair" not in record and i > 2:
        continue
      if dataset == "video" and "bigbuckbunny" not in record:
        continue
      out[f"{dataset}/{rid}"] = prep(dataset, ds[i])
      if sum(k.startswith(dataset) for k in out) >= want:
        break
  return list(out.values())


L, NI, NV = 1024, 4, 2  # one static shape for every rope_index call below: a single compilation


def positions_of(ids, segment_ids, images, videos, aiv):
  """TMRoPE ids [3, n] of one row: ids padded to L, grids padded with all-zero rows after the real ones."""
  n = len(ids)
  pad = lambda a, rows: np.concatenate([np.asarray(a, np.float32).reshape(-1, *rows.shape[1:]), rows])[:len(rows)]
  image_grid = pad([g for _, g in images], np.zeros((NI, 3), np.float32)).astype(np.int32)
  video_grid = pad([v[1] for v in videos], np.zeros((NV, 3), np.float32)).astype(np.int32)
  spg = pad([v[2] for v in videos], np.zeros((NV,), np.float32))
  pos, _ = rope(np.pad(ids, (0, L - n))[None], segment_ids=np.pad(segment_ids, (0, L - n))[None],
                image_grid_thw=image_grid, video_grid_thw=video_grid, second_per_grids=spg,
                use_audio_in_video=np.asarray([aiv]))
  return np.asarray(pos[:, 0, :n])


def positions_alone(s: Sample):
  """TMRoPE ids of one sample in a row of its own."""
  return positions_of(s.input_ids, np.ones(s.num_tokens, np.int32), s.images, s.videos, s.use_audio_in_video)


def test_packed_positions_restart_and_equal_each_sample_alone(real_samples):
  kinds = {s.kind for s in real_samples}
  assert kinds == {0, 1, 2, 3} and any(s.use_audio_in_video for s in real_samples)
  assert any(len(s.images) == 2 for s in real_samples)
  bucket = Bucket(L, 3, max_images=NI, max_image_patches=512, max_videos=NV, max_video_patches=512, max_audios=4,
                  max_audio_frames=800)
  packer = Packer([bucket])
  done = drain(packer, real_samples)
  assert sorted(s.name for _, ss, _ in done for s in ss) == sorted(s.name for s in real_samples)
  mixed_rows = 0
  for batch, samples, _ in done:
    check_batch(batch, samples, bucket)
    it = iter(samples)
    for r in range(bucket.batch_size):
      seg = batch["segment_ids"][r]
      grids = batch["image_grid_thw"][r]
      images = [(None, g) for g in grids if g.any()]
      videos = [(None, g, t) for g, t in zip(batch["video_grid_thw"][r], batch["second_per_grids"][r]) if g.any()]
      pos = positions_of(batch["input_ids"][r], seg, images, videos, batch["use_audio_in_video"][r])
      row_kinds = set()
      for k in range(1, int(seg.max(initial=0)) + 1):
        s = next(it)
        row_kinds.add(s.kind)
        np.testing.assert_array_equal(pos[:, seg == k], positions_alone(s), err_msg=s.name)
        assert pos[:, seg == k].min() == 0  # restarts at every sample
      mixed_rows += len(row_kinds) > 1
  assert mixed_rows >= 2  # rows really mix modalities (incl. audio-in-video next to plain samples)

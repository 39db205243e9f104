"""Packing multimodal samples into static-shape batches (the contract of omni_jax.batch).

A batch of a length bucket is `batch_size` rows of `seq_len` tokens, each row holding several samples (segment
ids 1..S, 0 = padding) and fixed-size media buffers (images, video, audio slots and patch / frame budgets per
row). Each sample goes to the smallest bucket whose empty row can hold it, then first-fit into the open batch
of that bucket; when no row of a full batch can take it, the batch is emitted and a new one started. A sample
no bucket can hold is skipped as too long. A bucket whose oldest waiting sample was read more than `max_lag`
reads ago is emitted as it is (partly filled), which bounds both the staleness of rare buckets and the work
of a restore.

A preference pair (preprocess.Pair) is one unit: its two samples (prompt + chosen reply, prompt + rejected reply)
go into the same row, side by side, or the pair is skipped as too long; a row holds at most the bucket's
max_pairs pairs. assemble numbers the pairs of each row in `dpo_pair` (and in the pair fields of the towers that
learn the pair's preference: omni_jax.batch).

A tower that trains on more than the text has its own room in each row (Bucket.sizes) and its own fields; its
data hook (omni_jax.towers.TowerData) says whether a row holds a sample's targets and writes them, so this
module knows no tower.

Checkpointing (grain's get_state / set_state) replays instead of serialising tensors: the state is the
upstream state just before the oldest still-waiting sample, how many records were read since, and which of
them are still waiting. A restore re-reads those records and preprocesses only the waiting ones, so the
restored packer holds exactly the rows it held, and the continued stream equals an uninterrupted one.

A stream that is mostly or wholly bad must not spin for ever: the packer raises TooManySkips (a DataError naming
the datasets and the skip reasons) when `max_records_without_batch` records in a row gave no batch, or when more
than `max_skip_ratio` of the records read were skipped (checked once `skip_ratio_min_records` were read). The
skips waiting to be reported are therefore bounded by `max_records_without_batch`. While no batch comes, a
warning says how many records were read and skipped, every LOG_EVERY records. `interrupt()` (the trainer's
SIGTERM handler) makes an in-process packer that is waiting for a batch raise Interrupted at its next record.
"""

import collections
import dataclasses
import logging
import threading
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import grain
import numpy as np

from omni_jax import batch as batch_lib
from omni_jax import special_tokens
from omni_jax import towers
from omni_jax.input.media import audio as audio_media
from omni_jax.input.media import patches
from omni_jax.input import sources
from omni_jax.input.preprocess import Pair, Sample, SampleError

PAD_ID = special_tokens.PAD  # <|endoftext|>
PATCH_DIM = 3 * patches.TEMPORAL_PATCH_SIZE * patches.PATCH_SIZE * patches.PATCH_SIZE
LOG_EVERY = 1000  # records read without a batch between two "still no batch" warnings
Unit = Union[Sample, Pair]  # what the packer places: a sample, or a pair's two samples together


class TooManySkips(sources.DataError):
  """The stream gives (almost) only bad samples: the message names the datasets and the skip reasons."""


class Interrupted(Exception):
  """The packer was asked to stop (interrupt()) while it waited for a batch."""


_interrupt = threading.Event()


def interrupt() -> None:
  """Make every in-process packer raise Interrupted at its next record (for a SIGTERM while waiting for data)."""
  _interrupt.set()


def clear_interrupt() -> None:
  _interrupt.clear()


@dataclasses.dataclass(frozen=True)
class SkipLimits:
  """When a stream counts as broken (config.data.max_skip_ratio, skip_ratio_min_records,
  max_records_without_batch; validated by omni_jax.config.validate_train)."""
  max_skip_ratio: float = 0.5
  skip_ratio_min_records: int = 1000
  max_records_without_batch: int = 10000

  @classmethod
  def from_config(cls, data) -> "SkipLimits":
    d = cls()
    return cls(float(data.get("max_skip_ratio", d.max_skip_ratio)),
               int(data.get("skip_ratio_min_records", d.skip_ratio_min_records)),
               int(data.get("max_records_without_batch", d.max_records_without_batch)))


@dataclasses.dataclass(frozen=True)
class Bucket:
  """One static batch shape. Media limits are per row; a zero limit omits that media's fields."""
  seq_len: int
  batch_size: int
  max_images: int = 0
  max_image_patches: int = 0
  max_videos: int = 0
  max_video_patches: int = 0
  max_audios: int = 0
  max_audio_frames: int = 0
  num_mel_bins: int = 128
  # Preference pairs per row (config.dpo.max_pairs_per_row); > 0 adds dpo_pair (and the towers' pair fields) to
  # every batch of the bucket; 0: the bucket takes no pair.
  max_pairs: int = 0
  # The towers' room per row ({key of a TowerData.sizes: value}, e.g. the positions of a second sequence); a
  # tower given no room has no fields in this bucket's batches, and the bucket takes no sample with its targets.
  sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.seq_len <= 0 or self.batch_size <= 0:
      raise ValueError(f"bucket {self}: seq_len and batch_size must be positive")
    if self.max_pairs < 0:
      raise ValueError(f"bucket {self}: max_pairs must be >= 0")
    if self.max_audio_frames % 200:
      raise ValueError(f"bucket {self}: max_audio_frames must be a multiple of 200 (one 2 s encoder chunk)")


@dataclasses.dataclass(frozen=True)
class _Load:
  """What a row has used (or a sample needs)."""
  tokens: int = 0
  images: int = 0
  image_patches: int = 0
  videos: int = 0
  video_patches: int = 0
  audios: int = 0
  pairs: int = 0  # preference pairs
  targets: tuple = ()  # (tower name, target) of the samples, in order

  def __add__(self, o):
    counts = [getattr(self, f.name) + getattr(o, f.name) for f in dataclasses.fields(self) if f.name != "targets"]
    return _Load(*counts, targets=self.targets + o.targets)


def _samples(u: Unit) -> tuple[Sample, ...]:
  return u.samples if isinstance(u, Pair) else (u,)


def _need(u: Unit) -> _Load:
  out = _Load(pairs=int(isinstance(u, Pair)))
  for s in _samples(u):
    out = out + _Load(s.num_tokens, len(s.images), sum(len(r) for r, _ in s.images), len(s.videos),
                      sum(len(v[0]) for v in s.videos), len(s.audios), targets=tuple(s.targets.items()))
  return out


def _of(load: _Load, tower: str) -> list:
  return [t for name, t in load.targets if name == tower]


def _fits(load: _Load, b: Bucket, longest_audio: int, hooks: Sequence[towers.TowerData]) -> bool:
  return (load.tokens <= b.seq_len and load.images <= b.max_images and load.image_patches <= b.max_image_patches
          and load.videos <= b.max_videos and load.video_patches <= b.max_video_patches
          and load.audios <= b.max_audios and longest_audio <= b.max_audio_frames and load.pairs <= b.max_pairs
          and all(h.fits(_of(load, h.name), b.sizes) for h in hooks))


def _longest_audio(u: Unit) -> int:
  return max((a.shape[1] for s in _samples(u) for a in s.audios), default=0)


def _tower_need(u: Unit, hooks: Sequence[towers.TowerData]) -> str:
  need = _need(u)
  return "".join(f" (+ {h.describe(_of(need, h.name))})" for h in hooks if _of(need, h.name))


def bucket_for(sample: Unit, buckets: Sequence[Bucket], hooks: Optional[Sequence[towers.TowerData]] = None
               ) -> Optional[int]:
  """Index of the smallest bucket (buckets sorted by seq_len) whose empty row holds the sample (or pair).
  hooks: the towers' data hooks (default: every registered tower's)."""
  hooks = towers.data_hooks() if hooks is None else hooks
  need, longest = _need(sample), _longest_audio(sample)
  for i, b in enumerate(buckets):
    if _fits(need, b, longest, hooks):
      return i
  return None


def check_bucket(b: Bucket, hooks: Sequence[towers.TowerData]) -> None:
  """Raise ValueError when a bucket's tower sizes are unknown to the hooks or inconsistent."""
  unknown = set(b.sizes) - {k for h in hooks for k in h.sizes}
  if unknown:
    raise ValueError(f"bucket {b}: unknown sizes {sorted(unknown)}")
  for h in hooks:
    try:
      h.check_sizes(b.sizes)
    except ValueError as e:
      raise ValueError(f"bucket {b}: {e}") from None


def assemble(rows: Sequence[Sequence[Sample]], b: Bucket, pad_id: int = PAD_ID,
             hooks: Optional[Sequence[towers.TowerData]] = None) -> dict:
  """Rows of samples -> a batch dict of bucket b's static shapes (omni_jax.batch); the fields of each tower that
  b.sizes gives room, with the samples' targets written by its data hook (hooks; default: every registered
  tower's); with b.max_pairs, the numbering of the rows' preference pairs (a pair's chosen sample directly
  followed by its rejected one, as Packer places them)."""
  hooks = towers.data_hooks() if hooks is None else hooks
  n, l = b.batch_size, b.seq_len
  out = {"input_ids": np.full((n, l), pad_id, np.int32), "labels": np.full((n, l), batch_lib.IGNORE, np.int32),
         "segment_ids": np.zeros((n, l), np.int32), "kind": np.zeros((n, l), np.int32),
         "use_audio_in_video": np.zeros((n,), bool)}
  if b.max_images:
    out["pixel_values"] = np.zeros((n, b.max_image_patches, PATCH_DIM), np.float32)
    out["image_grid_thw"] = np.zeros((n, b.max_images, 3), np.int32)
  if b.max_videos:
    out["pixel_values_videos"] = np.zeros((n, b.max_video_patches, PATCH_DIM), np.float32)
    out["video_grid_thw"] = np.zeros((n, b.max_videos, 3), np.int32)
    out["second_per_grids"] = np.zeros((n, b.max_videos), np.float32)
  if b.max_audios:
    out["audio_features"] = np.zeros((n, b.max_audios, b.num_mel_bins, b.max_audio_frames), np.float32)
    out["audio_lengths"] = np.zeros((n, b.max_audios), np.int32)
  if b.max_pairs:
    out[batch_lib.PAIR_FIELD] = np.zeros((n, l), np.int32)
  carried = []  # the hooks of the towers this bucket gives room
  for h in hooks:
    fields = h.empty(n, b.sizes, pairs=b.max_pairs > 0)
    if fields:
      out.update(fields)
      carried.append(h)
  for r, row in enumerate(rows):
    pos = pair = 0
    cursors = {h.name: 0 for h in carried}
    for seg, s in enumerate(row, 1):
      k = s.num_tokens
      number = 0
      if s.pair is not None and b.max_pairs:
        pair += s.pair.chosen
        number = 2 * pair - 1 if s.pair.chosen else 2 * pair
        if s.pair.text:
          out[batch_lib.PAIR_FIELD][r, pos:pos + k] = number
      for h in carried:
        if h.name in s.targets:
          marked = number if s.pair is not None and h.name in s.pair.towers else 0
          cursors[h.name] = h.write(out, r, cursors[h.name], pos, seg, s.targets[h.name], marked)
      out["input_ids"][r, pos:pos + k] = s.input_ids
      out["labels"][r, pos:pos + k] = s.labels
      out["segment_ids"][r, pos:pos + k] = seg
      out["kind"][r, pos:pos + k] = s.kind
      pos += k
    out["use_audio_in_video"][r] = any(s.use_audio_in_video for s in row)
    images = [im for s in row for im in s.images]
    videos = [v for s in row for v in s.videos]
    audios = [a for s in row for a in s.audios]
    if images:
      out["pixel_values"][r], out["image_grid_thw"][r] = patches.pack(images, b.max_image_patches, b.max_images)
    if videos:
      out["pixel_values_videos"][r], out["video_grid_thw"][r] = patches.pack(
          [(v[0], v[1]) for v in videos], b.max_video_patches, b.max_videos)
      out["second_per_grids"][r, :len(videos)] = [v[2] for v in videos]
    if audios:
      out["audio_features"][r], out["audio_lengths"][r] = audio_media.pad_batch(audios, b.max_audios,
                                                                                b.max_audio_frames)
  return out


class _OpenBatch:
  """The rows of one bucket being filled, and the read index of each sample in them."""

  def __init__(self):
    self.rows: list[list[Sample]] = []
    self.loads: list[_Load] = []
    self.reads: list[int] = []  # absolute read index of each waiting sample
    self.states: list[Any] = []  # upstream state just before each waiting sample was read

  def place(self, s: Unit, b: Bucket, hooks: Sequence[towers.TowerData]) -> bool:
    """First-fit into an existing row or a new one (a pair's two samples together); False when the batch is full
    for this sample."""
    need, longest = _need(s), _longest_audio(s)
    for i, load in enumerate(self.loads):
      if _fits(load + need, b, longest, hooks):
        self.rows[i].extend(_samples(s))
        self.loads[i] = load + need
        return True
    if len(self.rows) < b.batch_size:
      self.rows.append(list(_samples(s)))
      self.loads.append(need)
      return True
    return False


class Packer:
  """The packing policy, free of grain: add samples, collect finished batches."""

  def __init__(self, buckets: Sequence[Bucket], max_lag: int = 512, pad_id: int = PAD_ID,
               hooks: Optional[Sequence[towers.TowerData]] = None):
    """hooks: the towers' data hooks (default: every registered tower's)."""
    self.buckets = sorted(buckets, key=lambda b: b.seq_len)
    self.max_lag = max_lag
    self.pad_id = pad_id
    self.hooks = tuple(towers.data_hooks() if hooks is None else hooks)
    for b in self.buckets:
      check_bucket(b, self.hooks)
    self.open = [_OpenBatch() for _ in self.buckets]

  def add(self, s: Unit, read: int, state: Any = None) -> Optional[tuple]:
    """Place a sample or a pair; returns (batch, samples, bucket index) of a batch it did not fit, else None.

    Raises SampleError (too_long) when no bucket can hold it.
    """
    i = bucket_for(s, self.buckets, self.hooks)
    if i is None:
      b, need = self.buckets[-1], _need(s)
      what = f"a preference pair (2 segments, {b.max_pairs} pairs a row): " if need.pairs else ""
      raise SampleError("too_long", f"{s.name}: {what}{need.tokens} tokens{_tower_need(s, self.hooks)}, "
                                    f"{need.images} images, {need.videos} videos, {need.audios} audios (longest "
                                    f"{_longest_audio(s)} mel "
                                    f"frames) fit no bucket (largest: {b.seq_len} tokens, {b.max_images} images / "
                                    f"{b.max_image_patches} patches, {b.max_videos} videos / {b.max_video_patches} "
                                    f"patches, {b.max_audios} audios / {b.max_audio_frames} frames)")
    done = None
    ob = self.open[i]
    if not ob.place(s, self.buckets[i], self.hooks):
      done = self.emit(i) + (i,)
      ob = self.open[i]
      ob.place(s, self.buckets[i], self.hooks)
    ob.reads.append(read)
    ob.states.append(state)
    return done

  def stale(self, read: int) -> Optional[int]:
    """A bucket whose oldest waiting sample is more than max_lag reads old, if any."""
    for i, ob in enumerate(self.open):
      if ob.reads and read - ob.reads[0] >= self.max_lag:
        return i
    return None

  def emit(self, i: int) -> tuple:
    """(batch, samples in row order) of bucket i; its open batch starts empty."""
    ob, self.open[i] = self.open[i], _OpenBatch()
    return assemble(ob.rows, self.buckets[i], self.pad_id, self.hooks), [s for row in ob.rows for s in row]

  def first_nonempty(self) -> Optional[int]:
    return next((i for i, ob in enumerate(self.open) if ob.rows), None)

  def waiting(self) -> list[tuple[int, Any]]:
    """(read index, upstream state before it) of every waiting sample."""
    return [(r, st) for ob in self.open for r, st in zip(ob.reads, ob.states)]


_KIND_NAMES = {v: k for k, v in batch_lib.KINDS.items()}


def batch_info(samples: Sequence[Sample], skipped: Sequence[tuple], bucket: Bucket) -> dict:
  """Accounting that travels with a batch: what was packed and what was skipped since the previous batch."""
  return {"samples": [s.name for s in samples],
          "pairs": sum(1 for s in samples if s.pair is not None and s.pair.chosen),
          "kinds": dict(collections.Counter(_KIND_NAMES[s.kind] for s in samples)),
          "tokens": int(sum(s.num_tokens for s in samples)),
          "loss_tokens": int(sum(int((s.labels != batch_lib.IGNORE).sum()) for s in samples)),
          "seq_len": bucket.seq_len, "rows": bucket.batch_size, "skipped": [list(x) for x in skipped]}


class PackedDataset(grain.IterDataset):
  """grain stage: (dataset name, stored example) records -> (batch, info) pairs, checkpointable.

  At the end of a finite stream, skips not yet reported with a batch come as one (None, info) pair.
  """

  def __init__(self, parent: grain.IterDataset, preprocess: Callable[[str, Any], Sample],
               buckets: Sequence[Bucket], max_lag: int = 512, pad_id: int = PAD_ID,
               limits: Optional[SkipLimits] = None, hooks: Optional[Sequence[towers.TowerData]] = None):
    """hooks: the towers' data hooks (default: every registered tower's), carried to the workers with the
    dataset: a tower registered by code packs there too."""
    super().__init__(parent)
    self._preprocess = preprocess
    self._buckets = tuple(buckets)
    self._max_lag = max_lag
    self._pad_id = pad_id
    self._limits = limits or SkipLimits()
    self._hooks = tuple(towers.data_hooks() if hooks is None else hooks)

  def __iter__(self):
    return _PackedIterator(self._parent.__iter__(), self._preprocess, self._buckets, self._max_lag, self._pad_id,
                           self._limits, self._hooks)

  def __str__(self):
    return f"PackedDataset(buckets={[(b.seq_len, b.batch_size) for b in self._buckets]}, max_lag={self._max_lag})"


class _PackedIterator(grain.DatasetIterator):
  """Reads records, preprocesses, packs; one batch per __next__ (see the module doc for the state)."""

  def __init__(self, parent, preprocess, buckets, max_lag, pad_id, limits: Optional[SkipLimits] = None,
               hooks: Optional[Sequence[towers.TowerData]] = None):
    super().__init__(parent)
    self._preprocess = preprocess
    self._packer = Packer(buckets, max_lag, pad_id, hooks)
    self._limits = limits or SkipLimits()
    self._reads = 0  # records read from upstream so far
    self._skipped: list[tuple] = []  # (name, reason, message) not yet reported with a batch
    self._exhausted = False
    # For the skip limits (not checkpointed: a restored iterator starts counting afresh).
    self._seen = 0  # records read by this iterator
    self._skip_count = 0  # of them skipped
    self._since_batch = 0  # records read since the last batch came out
    self._reasons: collections.Counter = collections.Counter()  # (dataset, reason) -> skips
    self._example: dict = {}  # reason -> the first skip message of that reason

  def _process(self, record) -> Optional[Unit]:
    dataset, example = record
    try:
      return self._preprocess(dataset, example)
    except SampleError as e:
      self._skip(_name_of(record), e.reason, str(e))
    except Exception as e:  # noqa: BLE001 - an unforeseen decoder failure must not stop the run
      logging.exception("unexpected error preprocessing %s", _name_of(record))
      self._skip(_name_of(record), "error", f"{_name_of(record)}: {type(e).__name__}: {e}")
    return None

  def _out(self, done: tuple, i: int):
    batch, samples = done[:2]
    info = batch_info(samples, self._skipped, self._packer.buckets[i])
    self._skipped = []
    self._since_batch = 0
    return batch, info

  def _skip(self, name: str, reason: str, message: str):
    self._skipped.append((name, reason, message))
    self._skip_count += 1
    self._reasons[(name.split("/", 1)[0], reason)] += 1
    self._example.setdefault(reason, f"{name} ({reason}): {message}")

  def _summary(self) -> str:
    datasets = sorted({d for d, _ in self._reasons})
    reasons = collections.Counter()
    for (_, reason), n in self._reasons.items():
      reasons[reason] += n
    first = "; ".join(self._example[r] for r, _ in reasons.most_common(3))
    return (f"dataset{'s' if len(datasets) > 1 else ''} {', '.join(repr(d) for d in datasets) or '?'}: "
            f"{self._skip_count} of {self._seen} records skipped ("
            + ", ".join(f"{r}: {n}" for r, n in reasons.most_common()) + f"); for example {first}")

  def _check_limits(self):
    lim = self._limits
    if self._since_batch >= lim.max_records_without_batch:
      raise TooManySkips(f"no batch after {self._since_batch} records in a row "
                         f"(config.data.max_records_without_batch={lim.max_records_without_batch}); "
                         f"{self._summary()}")
    if (self._seen >= lim.skip_ratio_min_records and self._skip_count > lim.max_skip_ratio * self._seen):
      raise TooManySkips(f"{self._skip_count / self._seen:.0%} of the records were skipped, more than "
                         f"config.data.max_skip_ratio={lim.max_skip_ratio}; {self._summary()}")
    if self._since_batch and self._since_batch % LOG_EVERY == 0:
      logging.warning("still no batch after %d records; %s", self._since_batch, self._summary())

  def __next__(self):
    while True:
      if _interrupt.is_set():
        raise Interrupted(f"interrupted while waiting for a batch ({self._since_batch} records read since the last)")
      stale = self._packer.stale(self._reads)
      if stale is not None:
        return self._out(self._packer.emit(stale), stale)
      if self._exhausted:
        i = self._packer.first_nonempty()
        if i is not None:
          return self._out(self._packer.emit(i), i)
        if self._skipped:  # skips after the last batch still get reported: an info without a batch
          info = batch_info([], self._skipped, self._packer.buckets[0])
          self._skipped = []
          return None, info
        raise StopIteration
      state = self._parent.get_state()
      try:
        record = next(self._parent)
      except StopIteration:
        self._exhausted = True
        continue
      read = self._reads
      self._reads += 1
      self._seen += 1
      self._since_batch += 1
      sample = self._process(record)
      done = None
      if sample is not None:
        try:
          done = self._packer.add(sample, read, state)
        except SampleError as e:
          self._skip(sample.name, e.reason, str(e))
      if done is not None:
        return self._out(done, done[2])
      self._check_limits()

  def get_state(self) -> dict:
    waiting = self._packer.waiting()
    if waiting:
      base_read, base_state = min(waiting, key=lambda w: w[0])
    else:
      base_read, base_state = self._reads, self._parent.get_state()
    return {"parent": base_state, "base_read": base_read, "reads": self._reads,
            "waiting": sorted(r - base_read for r, _ in waiting), "skipped": [list(s) for s in self._skipped],
            "exhausted": self._exhausted}

  def set_state(self, state: dict):
    self._packer = Packer(self._packer.buckets, self._packer.max_lag, self._packer.pad_id, self._packer.hooks)
    self._parent.set_state(state["parent"])
    waiting = set(state["waiting"])
    for offset in range(state["reads"] - state["base_read"]):
      before = self._parent.get_state() if offset in waiting else None
      record = next(self._parent)
      if offset not in waiting:
        continue
      sample = self._process(record)
      if sample is not None and self._packer.add(sample, state["base_read"] + offset, before) is not None:
        # Only if a waiting sample now preprocesses differently (its media file changed since the checkpoint).
        logging.warning("restoring the packer: a batch of samples read before the checkpoint was dropped")
    self._reads = state["reads"]
    self._skipped = [tuple(s) for s in state["skipped"]]
    self._exhausted = state["exhausted"]
    self._seen = self._skip_count = self._since_batch = 0  # the limits count from the restore on
    self._reasons.clear()
    self._example.clear()


def _name_of(record) -> str:
  dataset, example = record
  rid = example.get("id", b"?") if hasattr(example, "get") else "?"
  rid = rid.decode("utf-8", "replace") if isinstance(rid, bytes) else str(rid)
  return f"{dataset}/{rid}"

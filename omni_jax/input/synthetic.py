"""A deterministic synthetic text source: packed batches that follow omni_jax.batch, no files needed.

Each row packs several "documents" (segments) and ends in padding. A document is an arithmetic progression
of token ids modulo a small vocabulary (random start and stride), so a model can learn it: the loss falls
well below log(vocab) once attention has learnt to read the stride from the previous tokens.

Row r of batch n depends only on (seed, split, n, r): any process can build exactly its own rows, a resumed
run sees the same data as an uninterrupted one, and the iterator state is one integer. The state protocol
(get_state() -> JSON-able dict, set_state(dict)) is what omni_jax.checkpoint saves beside the model; grain
iterators follow the same protocol.
"""

import dataclasses
from typing import Iterable, Optional, Sequence

import numpy as np

from omni_jax import batch as batch_lib
from omni_jax import sizes

_SPLITS = {"train": 0, "eval": 1, "test": 2}
_STRIDES = (1, 2, 3, 5, 7)
FIRST_TOKEN = 16  # ids below are left to special tokens in the tiny test vocabularies


@dataclasses.dataclass(frozen=True)
class MediaSpec:
  """Sizes and token ids for synthetic media: one image slot and one audio slot per row (random values)."""
  image_token_id: int
  vision_start_token_id: int
  vision_end_token_id: int
  audio_token_id: int
  audio_start_token_id: int
  audio_end_token_id: int
  image_grid: tuple[int, int, int] = (1, 4, 4)  # (t, h, w) patches: h * w / merge^2 placeholders
  patch_dim: int = sizes.patch_dim(3, 2, 14)  # the released (C, T, p)
  merge_size: int = 2
  mel_bins: int = 128
  audio_frames: int = 200  # buffer length; each audio has 100..audio_frames frames

  def image_tokens(self) -> int:
    t, h, w = self.image_grid
    return t * h * w // self.merge_size ** 2

  @staticmethod
  def audio_tokens(frames: int) -> int:
    return sizes.audio_token_count(frames)


class SyntheticSource:
  """Iterator over batches {input_ids, labels, segment_ids, kind} of rows [row_start, row_stop).

  batch_size is the GLOBAL batch; a process builds only its rows (omni_jax.train.data.process_rows).
  kinds: the modalities the first document of a row is drawn from; "image" and "audio" need `media`: that
  document then opens with the media placeholders (no loss on them) and the batch carries random pixel
  patches / log-mel features, so the encoders run (their outputs carry no signal to learn from).
  """

  def __init__(self, *, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0, split: str = "train",
               min_segment_len: int = 16, rows: Optional[tuple[int, int]] = None,
               kinds: Sequence[str] = ("text",), exclude_ids: Iterable[int] = (),
               media: Optional[MediaSpec] = None):
    if vocab_size <= FIRST_TOKEN + 8:
      raise ValueError(f"synthetic data needs vocab_size > {FIRST_TOKEN + 8}, got {vocab_size}")
    if split not in _SPLITS:
      raise ValueError(f"unknown split {split!r}; choose one of {sorted(_SPLITS)}")
    self.batch_size, self.seq_len, self.seed, self.split = batch_size, seq_len, seed, split
    self.min_segment_len = max(2, min(min_segment_len, seq_len))
    self.rows = (0, batch_size) if rows is None else tuple(rows)
    excluded = set(int(i) for i in exclude_ids)
    self.vocab = np.asarray([i for i in range(FIRST_TOKEN, vocab_size) if i not in excluded], np.int32)
    unknown = set(kinds) - {"text", "image", "audio"}
    if unknown or (set(kinds) - {"text"} and media is None):
      raise ValueError(f"synthetic kinds {tuple(kinds)}: supported are text, image and audio (the latter two "
                       f"need a MediaSpec)")
    self.kinds = tuple(kinds)
    self.media = media
    self._next = 0

  # The iterator-state protocol (omni_jax.checkpoint saves it beside the train state).
  state_fits_any_process_count = True  # the state is the global batch index (omni_jax.checkpoint)

  def get_state(self) -> dict:
    return {"next_batch": self._next}

  def set_state(self, state: dict) -> None:
    self._next = int(state["next_batch"])

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    out = self.batch(self._next)
    self._next += 1
    return out

  def batch(self, index: int) -> dict:
    rows = [self._row(index, r) for r in range(*self.rows)]
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

  def _row(self, index: int, r: int) -> dict:
    rng = np.random.default_rng([self.seed, _SPLITS[self.split], index, r])
    length = self.seq_len
    ids = np.zeros(length, np.int32)
    labels = np.full(length, batch_lib.IGNORE, np.int32)
    seg = np.zeros(length, np.int32)
    kind = np.zeros(length, np.int32)
    real = length - int(rng.integers(0, self.min_segment_len // 2 + 1))  # a little padding at the end
    m = len(self.vocab)
    first = self.kinds[int(rng.integers(0, len(self.kinds)))]
    out = {} if self.media is None else self._media(rng, first, ids, labels, seg, kind)
    pos = int((seg > 0).sum())  # a media document's placeholders, if any
    s = int(pos > 0)
    media_text = pos > 0  # the first text continues the media document (its caption / transcript)
    while pos < real:
      n = min(int(rng.integers(self.min_segment_len, max(self.min_segment_len, length // 2) + 1)), real - pos)
      start, stride = int(rng.integers(0, m)), int(rng.choice(_STRIDES))
      ids[pos:pos + n] = self.vocab[(start + stride * np.arange(n)) % m]
      labels[pos:pos + n] = ids[pos:pos + n]
      if media_text:
        kind[pos:pos + n] = kind[pos - 1]
        media_text = False
      else:
        s += 1
      seg[pos:pos + n] = s
      pos += n
    return dict(input_ids=ids, labels=labels, segment_ids=seg, kind=kind, **out)

  def _media(self, rng, first: str, ids, labels, seg, kind) -> dict:
    """Fill the row's media slots (zeros = unused) and, for an image/audio document, its placeholders."""
    ms = self.media
    t, h, w = ms.image_grid
    out = dict(pixel_values=np.zeros((t * h * w, ms.patch_dim), np.float32),
               image_grid_thw=np.zeros((1, 3), np.int32),
               audio_features=np.zeros((1, ms.mel_bins, ms.audio_frames), np.float32),
               audio_lengths=np.zeros((1,), np.int32))
    if first == "image":
      out["pixel_values"][:] = rng.standard_normal(out["pixel_values"].shape)
      out["image_grid_thw"][0] = ms.image_grid
      tokens = [ms.vision_start_token_id] + [ms.image_token_id] * ms.image_tokens() + [ms.vision_end_token_id]
    elif first == "audio":
      frames = int(rng.integers(ms.audio_frames // 2, ms.audio_frames + 1))
      out["audio_features"][0, :, :frames] = rng.standard_normal((ms.mel_bins, frames))
      out["audio_lengths"][0] = frames
      tokens = ([ms.audio_start_token_id] + [ms.audio_token_id] * ms.audio_tokens(frames)
                + [ms.audio_end_token_id])
    else:
      return out
    n = len(tokens)
    if n + 2 > len(ids):
      raise ValueError(f"seq_len {len(ids)} is too short for a synthetic {first} of {n} tokens")
    ids[:n] = tokens
    seg[:n] = 1
    kind[:n] = batch_lib.KINDS[first]
    return out

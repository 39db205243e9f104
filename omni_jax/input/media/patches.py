"""Pixels -> vision-encoder patch rows: the resize rule, CLIP normalisation, patchify, static-shape packing.

Shared by images and video (rows in merge-block order). numpy + PIL only: this runs in data-loader workers.

Numerics follow transformers' PIL backend (Qwen2VLImageProcessorPil) exactly: uint8 pixels are resized with
PIL bicubic, rescaled in float64 by 1/255, cast to float32 and normalised in float32. Since the input is
uint8, rescale + normalise is a 256-entry lookup table per channel with bit-identical values.
"""

import math
from typing import Sequence

import numpy as np
from PIL import Image

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Pixel budgets of the released preprocessor: images 56^2 .. 16384 * 28^2; video frames 128 * 28^2
# .. 768 * 28^2 (Qwen2_5OmniProcessor's video size).
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 16384 * 28 * 28
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, *, factor: int = PATCH_SIZE * MERGE_SIZE,
                 min_pixels: int = IMAGE_MIN_PIXELS, max_pixels: int = IMAGE_MAX_PIXELS) -> tuple[int, int]:
  """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect ratio kept.

  Python's round() (half to even) is what the reference uses, so 42 / 28 = 1.5 rounds to 2 and 70 / 28 = 2.5
  rounds to 2 as well.
  """
  if min(height, width) <= 0:
    raise ValueError(f"image size {height}x{width} is empty")
  if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
    raise ValueError(f"aspect ratio of {height}x{width} exceeds {MAX_ASPECT_RATIO}")
  h = round(height / factor) * factor
  w = round(width / factor) * factor
  if h * w > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h = max(factor, math.floor(height / beta / factor) * factor)
    w = max(factor, math.floor(width / beta / factor) * factor)
  elif h * w < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h = math.ceil(height * beta / factor) * factor
    w = math.ceil(width * beta / factor) * factor
  return h, w


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bicubic resize of a uint8 [H, W, 3] array (PIL's filter, antialiased when shrinking)."""
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), resample=Image.BICUBIC))


def _lookup_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """[C, 256] float32: the normalised value of each uint8 level, computed as the reference computes it."""
  levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
  mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return (levels[None, :] - mean32[:, None]) / std32[:, None]


_CLIP_TABLE = _lookup_table(CLIP_MEAN, CLIP_STD)


def patchify(frames: np.ndarray, *, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
             temporal_patch_size: int = TEMPORAL_PATCH_SIZE, table: np.ndarray = _CLIP_TABLE):
  """uint8 frames [F, H, W, C] -> (rows [t*h*w, C*T*p*p] float32 normalised, grid (t, h, w)).

  F must be a multiple of temporal_patch_size and H, W multiples of patch_size * merge_size. Rows are in
  merge-block order (t, block_row, block_col, in_row, in_col) and each row is laid out (C, T, p, p), the
  order the encoder's merger and rotary positions rely on.
  """
  f, height, width, c = frames.shape
  tp, p, m = temporal_patch_size, patch_size, merge_size
  if f % tp or height % (p * m) or width % (p * m):
    raise ValueError(f"frames {frames.shape} are not a multiple of (T={tp}, {p * m}, {p * m})")
  gt, gh, gw = f // tp, height // p, width // p
  x = frames.reshape(gt, tp, gh // m, m, p, gw // m, m, p, c)
  x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)  # (t, bh, bw, ih, iw, C, T, py, px)
  rows = x.reshape(gt * gh * gw, c, tp * p * p)
  out = table[np.arange(c)[None, :, None], rows]  # uint8 level -> normalised float32, per channel
  return out.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


def pack(items: Sequence[tuple[np.ndarray, Sequence[int]]], max_patches: int, max_items: int):
  """Concatenate (rows, grid) items into a static buffer: (pixel_values [max_patches, D], grid_thw [max_items, 3]).

  Unused rows and grid rows are zero; the encoder ignores them, so every batch of the same bucket has one
  shape and compiles once. Raises ValueError when the items do not fit (the pipeline picks a bigger bucket
  or drops the sample).
  """
  if len(items) > max_items:
    raise ValueError(f"{len(items)} images/videos exceed the buffer's {max_items} slots")
  total = sum(len(rows) for rows, _ in items)
  if total > max_patches:
    raise ValueError(f"{total} patches exceed the buffer's {max_patches} rows")
  dim = items[0][0].shape[1] if items else 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE
  pixels = np.zeros((max_patches, dim), np.float32)
  grids = np.zeros((max_items, 3), np.int32)
  start = 0
  for i, (rows, grid) in enumerate(items):
    if int(np.prod(grid)) != len(rows):
      raise ValueError(f"item {i}: grid {tuple(grid)} does not describe {len(rows)} rows")
    pixels[start:start + len(rows)] = rows
    grids[i] = grid
    start += len(rows)
  return pixels, grids

"""Images -> vision patch rows and image_grid_thw, as transformers' Qwen2VLImageProcessor (PIL backend) makes them.

numpy + PIL only (no jax): this runs in data-loader workers. Unreadable files raise MediaError naming the file,
which the pipeline turns into a skipped sample.

PIL reads the header first and decodes only on load(): width * height is checked against the MediaBudget in
between, so an image over budget costs no decoding. A JPEG far larger than the processor keeps is decoded by
libjpeg at a reduced scale (draft), never below the size smart_resize asks for.
"""

import io
import os
from typing import Callable, Optional, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from omni_jax.input.media import MediaBudget
from omni_jax.input.media import MediaError
from omni_jax.input.media import patches

ImageSource = Union[str, os.PathLike, bytes, np.ndarray, Image.Image]
DraftSize = Callable[[int, int], Optional[tuple[int, int]]]  # (height, width) -> smallest (height, width) or None

# A JPEG is decoded at a reduced scale only above this many times the released processor's max_pixels (or a
# config's, when larger): below it the full decode is cheap, and images of ordinary size keep the exact pixels
# of the reference processor, also under the small pixel budgets of test configs.
DRAFT_RATIO = 4


def _name(source) -> str:
  if isinstance(source, (str, os.PathLike)):
    return os.fspath(source)
  return f"<{type(source).__name__}>"


def _to_rgb(image: Image.Image) -> Image.Image:
  """RGB with any transparency composited onto white, as the reference's convert_to_rgb does."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
  return image.convert("RGB")


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
  """uint8 [H, W], [H, W, 1|3|4] -> [H, W, 3]; alpha blended onto white with the reference's rounding."""
  if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
    raise MediaError(f"{_name(a)}: expected a uint8 [H, W(, 1|3|4)] array, got {a.dtype} {a.shape}")
  if a.ndim == 2:
    a = a[..., None]
  if a.shape[2] == 1:
    return np.repeat(a, 3, axis=2)
  if a.shape[2] == 4:
    alpha = a[..., 3:4] / 255
    return np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
  return np.ascontiguousarray(a)


def _check_pixels(name: str, width: int, height: int, budget: MediaBudget) -> None:
  if width * height > budget.max_image_pixels:
    raise MediaError(f"{name}: image of {width}x{height} = {width * height} pixels; at most "
                     f"{budget.max_image_pixels} pixels")


def _decode(source: ImageSource, budget: Optional[MediaBudget],
            draft_for: Optional[DraftSize] = None) -> tuple[np.ndarray, int, int]:
  """(uint8 RGB [h, w, 3], header height, header width).

  draft_for(height, width) gives the (height, width) a JPEG may be decoded down to (libjpeg scales by 1/2,
  1/4 or 1/8 and keeps at least that size), or None for a full decode.
  """
  budget = MediaBudget() if budget is None else budget
  name = _name(source)
  if isinstance(source, np.ndarray):
    if source.ndim >= 2:
      _check_pixels(name, source.shape[1], source.shape[0], budget)
    pixels = _array_to_rgb(source)
    return pixels, pixels.shape[0], pixels.shape[1]
  try:
    if isinstance(source, Image.Image):
      _check_pixels(name, source.width, source.height, budget)
      return np.asarray(_to_rgb(source)), source.height, source.width
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
      height, width = image.height, image.width
      _check_pixels(name, width, height, budget)  # from the header: nothing is decoded yet
      target = draft_for(height, width) if draft_for is not None else None
      if target is not None and image.format in ("JPEG", "MPO"):  # MPO: a camera's multi-picture JPEG
        image.draft("RGB", (target[1], target[0]))
      image.load()  # PIL decodes lazily: make truncated or corrupt data fail here
      return np.asarray(_to_rgb(image)), height, width
  except MediaError:
    raise
  except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise MediaError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e


def load_image(source: ImageSource, budget: Optional[MediaBudget] = None) -> np.ndarray:
  """uint8 RGB [H, W, 3] from a path, encoded bytes, a PIL image or an array ([H, W], [H, W, 3|4] uint8).

  More than budget.max_image_pixels (MediaBudget() when None) raises MediaError before decoding.
  """
  return _decode(source, budget)[0]


def preprocess_image(image: ImageSource, *, min_pixels: int = patches.IMAGE_MIN_PIXELS,
                     max_pixels: int = patches.IMAGE_MAX_PIXELS, patch_size: int = patches.PATCH_SIZE,
                     merge_size: int = patches.MERGE_SIZE,
                     temporal_patch_size: int = patches.TEMPORAL_PATCH_SIZE,
                     budget: Optional[MediaBudget] = None) -> tuple[np.ndarray, np.ndarray]:
  """(pixel_values [h*w, 3*T*p*p] float32, image_grid_thw [3] int64 = (1, h, w)) for one image.

  The image is resized by smart_resize (multiples of patch_size * merge_size within the pixel budget) and
  repeated over the temporal_patch_size frames of a patch, as the reference does. The grid depends only on
  the header's size; a JPEG over DRAFT_RATIO * max(max_pixels, the released
  max_pixels) is decoded at a reduced scale no smaller than it.
  More than budget.max_image_pixels (MediaBudget() when None) raises MediaError before decoding.
  """
  def target(height: int, width: int) -> tuple[int, int]:
    return patches.smart_resize(height, width, factor=patch_size * merge_size, min_pixels=min_pixels,
                                max_pixels=max_pixels)

  def draft_for(height: int, width: int) -> Optional[tuple[int, int]]:
    if height * width <= DRAFT_RATIO * max(max_pixels, patches.IMAGE_MAX_PIXELS):
      return None
    try:
      return target(height, width)
    except ValueError:  # refused below, with the message naming the image
      return None

  pixels, full_height, full_width = _decode(image, budget, draft_for)
  try:
    height, width = target(full_height, full_width)
  except ValueError as e:
    raise MediaError(f"{_name(image)}: {e}") from e
  pixels = patches.resize(pixels, height, width)
  frames = np.broadcast_to(pixels[None], (temporal_patch_size, *pixels.shape))
  rows, grid = patches.patchify(frames, patch_size=patch_size, merge_size=merge_size,
                                temporal_patch_size=temporal_patch_size)
  return rows, np.asarray(grid, np.int64)

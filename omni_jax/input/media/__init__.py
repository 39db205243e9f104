"""Decoding images, video and audio into model inputs (numpy only: no jax in data workers).

Every decoder takes a MediaBudget (MediaBudget() when a caller passes none). A file is refused with a
MediaError from its header before anything is decoded, and decoding stops with a MediaError as soon as it
passes the budget, because headers can lie or leave out the length: a few KB of hostile data can never make
a worker allocate more than the budget allows.
"""

import dataclasses


class MediaError(ValueError):
  """A media file cannot be read or decoded; the message names the file."""


@dataclasses.dataclass(frozen=True)
class MediaBudget:
  """The most a single media item may take to decode. The defaults admit real training data.

  A video's audio track (audio-in-video) is audio: max_audio_seconds and the sample-rate bounds apply to it.
  Images are also refused by PIL's own decompression-bomb limit (about 179M pixels), whatever this says.
  """
  max_audio_seconds: float = 600.0  # the processor keeps at most 300 s of any waveform
  min_sample_rate: int = 8000
  max_sample_rate: int = 384000
  max_image_pixels: int = 64 * 1024 * 1024  # width * height, from the header
  max_video_seconds: float = 1800.0
  max_video_frame_pixels: int = 4096 * 2304  # width * height of one frame
  max_video_frames: int = 216000  # frames in the stream, from the header or counted while decoding


__all__ = ["MediaBudget", "MediaError"]

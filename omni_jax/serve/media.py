"""A request's media decoded before the model sees it: on a pool of its own, under the server's budgets.

The model's thread only prefills: every media part of a request is decoded and preprocessed here first (audio
to 16 kHz samples, images and videos to patch rows), with the budgets of protocol.Limits checked from the
file's header before anything large is allocated (omni_jax.input.media). A slow or hostile file then costs
one decoding thread, not every client's turn. The files a request's data URLs were written to are removed as
soon as decoding ends, whatever happened.

Errors name the request's field ("messages.0.content.1.input_audio: 2000.0 s of audio; at most 30 s"), never
a path on the server.
"""

import asyncio
import concurrent.futures
import dataclasses
import shutil
import threading
from typing import Callable, Optional

from omni_jax.serve import protocol
from omni_jax.serve.protocol import ServeError


def budget_of(limits: protocol.Limits):
  """The media budget of a server's limits (omni_jax.input.media.MediaBudget)."""
  from omni_jax.input.media import MediaBudget  # noqa: PLC0415

  return MediaBudget(max_audio_seconds=limits.audio_seconds(), max_image_pixels=limits.max_image_pixels,
                     max_video_seconds=limits.max_video_seconds,
                     max_video_frame_pixels=limits.max_video_frame_pixels)


class MediaDecoder:
  """Decodes requests' media parts on `workers` threads; at most `max_pending` requests wait for one (more
  get a 429)."""

  def __init__(self, preprocessor, limits: protocol.Limits, *, workers: int = 2, max_pending: int = 16):
    if workers < 1 or max_pending < 1:
      raise ValueError(f"--decode_workers ({workers}) and the decode queue ({max_pending}) must be >= 1")
    from omni_jax.input import preprocess  # noqa: PLC0415 - jax-free; only with a model

    self.preprocessor = None
    if preprocessor is not None:  # the model's own processing, under the server's budget
      options = dataclasses.replace(preprocessor.options, budget=budget_of(limits))
      self.preprocessor = preprocess.Preprocessor(preprocessor.tokenizer, preprocessor.fmt, options,
                                                  preprocessor.system_prompt)
    self.limits, self.max_pending = limits, max_pending
    self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="omni-media")
    self.pending = 0
    self._lock = threading.Lock()

  def close(self) -> None:
    self.pool.shutdown(wait=False, cancel_futures=True)

  async def run(self, work: Callable, *args):
    """work(*args) on the pool; a 429 when too many requests already wait for it."""
    with self._lock:
      if self.pending >= self.max_pending:
        raise ServeError(429, f"the server is busy ({self.pending} requests' media are being decoded); retry later",
                         type="rate_limit_error", code="queue_full")
      self.pending += 1
    try:
      return await asyncio.get_running_loop().run_in_executor(self.pool, work, *args)
    finally:
      with self._lock:
        self.pending -= 1

  def decode(self, conversation: list, workdir: Optional[str] = None) -> list:
    """The conversation with every media part decoded (audio: {"type": "audio", "array", "sample_rate"};
    image / video: {"type", "decoded"}); removes `workdir` (the request's written data URLs) in any case."""
    try:
      aiv = any(p.get("use_audio_in_video", False) for m in conversation
                for p in _parts(m) if p.get("type") == "video")
      return [dict(m, content=[self._part(p, aiv) for p in m["content"]]) if isinstance(m["content"], list) else m
              for m in conversation]
    finally:
      if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)

  def _part(self, part: dict, aiv: bool) -> dict:
    kind = part.get("type")
    if kind not in ("image", "audio", "video"):
      return part
    from omni_jax.input import preprocess  # noqa: PLC0415
    from omni_jax.input.media import MediaError  # noqa: PLC0415
    from omni_jax.input.media import audio as audio_media  # noqa: PLC0415

    path, param = part["path"], part.get("param", kind)
    try:
      if kind == "audio":
        wave = audio_media.load_audio(path, budget=self.preprocessor.options.budget)
        return {"type": "audio", "array": wave, "sample_rate": audio_media.SAMPLE_RATE}
      clean = {k: v for k, v in part.items() if k != "param"}
      decoded = self.preprocessor.decode_part(clean, aiv, param)
      out = {"type": kind, "decoded": decoded}
      if kind == "video":
        out["use_audio_in_video"] = bool(part.get("use_audio_in_video", False))
      return out
    except (MediaError, preprocess.SampleError, OSError) as e:
      raise ServeError(400, _without_path(str(e), path, param), param=param, code="invalid_media") from None


def _parts(message: dict) -> list:
  return message["content"] if isinstance(message.get("content"), list) else []


def _without_path(message: str, path: str, param: str) -> str:
  """A decoder's message with the server's file path replaced by the request's field name."""
  message = " ".join(message.replace(path, param).split())
  while message.startswith(param + ": " + param):  # "param: param: why" when the decoder named the file too
    message = message[len(param) + 2:]
  return message

"""OmniSession: one conversation's state (Thinker KV cache and positions, Talker text track, Token2Wav state).

Work in progress: the signatures are final, the bodies land in the next commits.
"""

import uuid
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from omni_jax.serve.events import Event


class OmniSession:
  """A real-time conversation with an OmniChat model: push input as it arrives, respond() streams the reply."""

  def __init__(self, model, *, speaker: Optional[str] = None, max_len: int = 4096, system: Optional[str] = None,
               session_id: Optional[str] = None):
    self.model, self.speaker, self.max_len, self.system = model, speaker, max_len, system
    self.id = session_id or uuid.uuid4().hex
    self.turn = 0

  def push_text(self, text: str) -> None:
    raise NotImplementedError

  def push_audio(self, wave: np.ndarray, sample_rate: int = 16000) -> None:
    raise NotImplementedError

  def push_image(self, image: Any) -> None:
    raise NotImplementedError

  def push_video(self, video: Any, *, use_audio_in_video: bool = False, fps: Optional[float] = None) -> None:
    raise NotImplementedError

  def push_message(self, message: dict) -> None:
    raise NotImplementedError

  def respond(self, *, speak: bool = False, max_new_tokens: Optional[int] = None, seed: Optional[int] = None,
              **sampling) -> Iterator[Event]:
    raise NotImplementedError

  def close(self) -> None:
    raise NotImplementedError

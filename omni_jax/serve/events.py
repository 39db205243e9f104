"""What an omni session streams: one Event per text piece, speech-code chunk, audio chunk, and the turn's end.

Every event carries time.perf_counter() at the moment it was produced, so a consumer (the HTTP server, the
benchmark) reads the latency timeline off the stream itself: time to first text / audio after the end of the
user's input is `event.t - session.input_closed_at`.
"""

import dataclasses
import time
from typing import Any, Literal, Optional

import numpy as np

Kind = Literal["text", "codes", "audio", "done"]
KINDS = ("text", "codes", "audio", "done")
SAMPLE_RATE = 24000  # Token2Wav's output rate (audio payloads)


@dataclasses.dataclass(frozen=True)
class Done:
  """The payload of a turn's "done" event: the whole reply and why it stopped.

  text: the reply's text (stop token removed); tokens: the Thinker's ids including the stop id, if any;
  codes: all speech codes (int32 [M], before the Talker's stop id; None without speech); finish_reason:
  "stop" (a stop id was chosen) or "length" (max_new_tokens reached); prompt_tokens: the conversation's
  tokens the reply was generated from (system, earlier turns, this input, chat markup); timings: seconds from the end of the user's input
  (`first_text`, `first_codes`, `first_audio`, `end`) where they happened, and `audio_seconds` voiced.
  """
  text: str
  tokens: np.ndarray
  finish_reason: str
  prompt_tokens: int
  codes: Optional[np.ndarray] = None
  timings: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Event:
  """One streamed output. kind / payload:

    "text"   str: the next piece of the reply's text (never ends inside a multi-byte character)
    "codes"  np.ndarray int32 [n]: the next speech codes (the Talker's codec ids, in order)
    "audio"  np.ndarray float32 [samples]: the next 24 kHz mono samples (in [-1, 1])
    "done"   Done: the turn's summary (always the last event of a respond() call)

  t: time.perf_counter() when the event was produced; session: the session's id; turn: the turn's index in
  the session (0, 1, ...).
  """
  kind: Kind
  payload: Any
  t: float
  session: str = ""
  turn: int = 0

  @classmethod
  def now(cls, kind: Kind, payload: Any, *, session: str = "", turn: int = 0) -> "Event":
    if kind not in KINDS:
      raise ValueError(f"event kind {kind!r} is not one of {KINDS}")
    return cls(kind, payload, time.perf_counter(), session, turn)

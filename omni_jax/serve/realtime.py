"""The Realtime WebSocket endpoint: a live voice (and camera) conversation over OpenAI's Realtime event protocol.

    ws://127.0.0.1:8000/v1/realtime?model=NAME      (server.create_app mounts it; the web page at / uses it)

    with OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").realtime.connect(model=NAME) as conn:
      conn.session.update(session={"type": "realtime", "output_modalities": ["audio"],
                                   "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}})
      conn.input_audio_buffer.append(audio=base64_pcm16)      # as the microphone records (any chunk size)
      for event in conn: ...                                  # speech_started / stopped, deltas, response.done

One connection is one OmniSession (serve/session.py) whose caches live across its turns; all its model work
(prefill, the reply's start and cancel) runs on the server's worker thread through Worker.call, in the order the
events came, and its replies decode in the worker's engine slots beside the HTTP requests' (continuous
batching: no other decode path). The event loop only parses, resamples, detects turns and writes events.

Input: `input_audio_buffer.append` takes base64 PCM16 mono at the session's rate (16 or 24 kHz, resampled to
16 kHz as a stream). With server turn detection (the default; vad.TurnDetector) audio is prefilled from the
moment speech starts (with prefix_padding_ms before it), in the session's 2 s chunks as it arrives, so at the
end of the turn only the last chunk and the turn's markup remain; the detector's end of turn commits it and
starts the reply (create_response). Speech that starts during a reply cancels it (barge-in, interrupt_response):
no more of it is sent, and the cache keeps only the tokens the client was sent. Without turn detection the
audio is held until `input_audio_buffer.commit` (so `clear` can drop it). `input_image_buffer.append` (a
camera frame, base64 JPEG, DashScope's event) keeps the newest frame; it is prefilled as the user's next turn
opens, before its audio. `conversation.item.create` adds a user message (input_text, input_audio, input_image).
A conversation that outgrows the session's cache drops its oldest turns (`session.truncation`, "auto" by
default: OmniSession's truncation), so a long call goes on.

Output: response.output_text.delta (text replies) or response.output_audio_transcript.delta +
response.output_audio.delta (base64 PCM16 mono 24 kHz) as decoded; with the session option
"event_names": "beta" (chosen also by DashScope's flat session fields) the older response.text.delta,
response.audio_transcript.delta and response.audio.delta names. response.done carries usage and the reply's
latency (metadata: ms from the end of the user's turn to the first text / audio).

Security and limits (RealtimeLimits; python -m omni_jax.serve flags): the Host / Origin / API-key checks of
the HTTP gate (the key as `Authorization: Bearer` or, from browsers, the subprotocol
`openai-insecure-api-key.<key>`; a page of the server's own origin is allowed), at most max_connections
sessions, frames of at most max_event_bytes, max_buffer_seconds of audio held, max_frames_per_second camera
frames, max_session_seconds per connection. A bad event gets an `error` event and the connection goes on; a
violated limit gets an `error` event and a close (1008, 1009 for a frame too large). A dropped socket cancels
its reply and frees its cache at once.
"""

import asyncio
import base64
import binascii
import dataclasses
import json
import logging
import secrets
import time
import uuid
from typing import Any, Optional

import numpy as np

from omni_jax.serve import guard
from omni_jax.serve import media as media_lib
from omni_jax.serve import protocol
from omni_jax.serve import server as server_lib
from omni_jax.serve import vad
from omni_jax.serve.protocol import ServeError

log = logging.getLogger(__name__)

IN_RATES = (16000, 24000)  # PCM16 input rates taken (OpenAI's 24 kHz, DashScope's 16 kHz)
MODEL_RATE = 16000  # the audio tower's
OUT_RATE = protocol.OUT_SAMPLE_RATE
KEY_PROTOCOL = "openai-insecure-api-key."
# A full conversation drops its oldest turns until what follows the system turn takes at most this much of the
# context: room for several more turns before the next truncation prefills the conversation again.
AUTO_RETENTION = 0.75
DEFAULT_TURN_DETECTION = dict(type="server_vad", threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500,
                              create_response=True, interrupt_response=True)
_BETA = {"response.output_text.delta": "response.text.delta", "response.output_text.done": "response.text.done",
         "response.output_audio.delta": "response.audio.delta", "response.output_audio.done": "response.audio.done",
         "response.output_audio_transcript.delta": "response.audio_transcript.delta",
         "response.output_audio_transcript.done": "response.audio_transcript.done",
         "conversation.item.added": "conversation.item.created"}


@dataclasses.dataclass(frozen=True)
class RealtimeLimits:
  """What one Realtime connection may do (python -m omni_jax.serve --realtime_* flags)."""
  max_connections: int = 4  # open sessions (each holds its caches)
  max_event_bytes: int = 4 << 20  # one WebSocket message
  max_buffer_seconds: float = 60.0  # audio held and not yet prefilled (without turn detection: until commit)
  max_frames_per_second: float = 2.0  # camera frames (input_image_buffer.append), sustained
  frame_burst_seconds: float = 10.0  # frames may come this many seconds' worth at once (after a stall)
  max_session_seconds: float = 1800.0  # a connection's life
  idle_seconds: float = 600.0  # a connection that sends nothing for this long is closed

  def __post_init__(self):
    if self.max_connections < 1 or self.max_event_bytes < 1024 or self.max_buffer_seconds <= 0 \
        or self.max_frames_per_second <= 0 or self.frame_burst_seconds <= 0 or self.max_session_seconds <= 0 \
        or self.idle_seconds <= 0:
      raise ValueError(f"realtime limits must be positive (max_event_bytes >= 1024): {self}")


class EventError(Exception):
  """A client event the session cannot take: an `error` event (code, param) and the connection goes on;
  close: a violated limit, after which the connection is closed with that code."""

  def __init__(self, message: str, code: str = "invalid_event", param: Optional[str] = None,
               type_: str = "invalid_request_error", close: Optional[int] = None):
    super().__init__(message)
    self.code, self.param, self.type, self.close = code, param, type_, close


def _event_id() -> str:
  return "event_" + uuid.uuid4().hex[:20]


def _b64(data: Any, param: str, limit: int) -> bytes:
  if not isinstance(data, str):
    raise EventError(f"{param} must be a base64 string", "invalid_value", param)
  if len(data) > limit * 4 // 3 + 4:
    raise EventError(f"{param} is over {limit} bytes", "invalid_value", param)
  try:
    return base64.b64decode(data, validate=True)
  except (binascii.Error, ValueError):
    raise EventError(f"{param} is not valid base64", "invalid_base64", param) from None


def _pcm16(data: bytes, param: str) -> np.ndarray:
  if len(data) % 2:
    raise EventError(f"{param}: PCM16 audio has an even number of bytes, got {len(data)}", "invalid_value", param)
  return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0


@dataclasses.dataclass
class SessionConfig:
  """The Realtime session's settings (session.update)."""
  output_modalities: tuple = ("audio",)
  instructions: Optional[str] = None
  voice: Optional[str] = None
  input_rate: int = 24000
  turn_detection: Optional[dict] = dataclasses.field(default_factory=lambda: dict(DEFAULT_TURN_DETECTION))
  max_output_tokens: Optional[int] = None
  temperature: Optional[float] = None  # None: the model's configured sampling; 0: greedy
  event_names: str = "ga"
  truncation: Any = "auto"  # as the client gave it: "auto", "disabled" or {"type": "retention_ratio", ...}

  @property
  def retention(self) -> Optional[float]:
    """The OmniSession's truncation: the fraction of the context a truncated conversation keeps (None: off)."""
    if self.truncation == "disabled":
      return None
    return AUTO_RETENTION if self.truncation == "auto" else float(self.truncation["retention_ratio"])

  def object(self, session_id: str, model_name: str) -> dict:
    fmt = {"type": "audio/pcm", "rate": self.input_rate}
    return {"type": "realtime", "object": "realtime.session", "id": session_id, "model": model_name,
            "output_modalities": list(self.output_modalities), "instructions": self.instructions or "",
            "max_output_tokens": self.max_output_tokens if self.max_output_tokens is not None else "inf",
            "audio": {"input": {"format": fmt, "turn_detection": self.turn_detection},
                      "output": {"format": {"type": "audio/pcm", "rate": OUT_RATE}, "voice": self.voice}},
            "temperature": self.temperature, "event_names": self.event_names, "truncation": self.truncation}


def _modalities(value, param: str) -> tuple:
  if not isinstance(value, list) or not value or any(m not in ("text", "audio") for m in value):
    raise EventError(f"{param} must be a list of 'text' / 'audio', got {value!r}", "invalid_value", param)
  return ("audio",) if "audio" in value else ("text",)


def _turn_detection(value, param: str) -> Optional[dict]:
  if value is None:
    return None
  if not isinstance(value, dict) or value.get("type", "server_vad") != "server_vad":
    raise EventError(f"{param}: only {{'type': 'server_vad'}} or null is supported, got {value!r}",
                     "invalid_value", param)
  out = dict(DEFAULT_TURN_DETECTION)
  for k, v in value.items():
    if k not in out and k not in ("idle_timeout_ms",):
      raise EventError(f"{param}.{k}: unknown field", "unknown_parameter", f"{param}.{k}")
    if k == "idle_timeout_ms" or v is None:
      continue
    ok = (isinstance(v, bool) if k in ("create_response", "interrupt_response") else
          isinstance(v, (int, float)) and not isinstance(v, bool) if k == "threshold" else
          isinstance(v, str) if k == "type" else isinstance(v, int) and not isinstance(v, bool))
    if not ok:
      raise EventError(f"{param}.{k}: bad value {v!r}", "invalid_value", f"{param}.{k}")
    out[k] = v
  try:
    vad.TurnDetector(out["threshold"], out["prefix_padding_ms"], out["silence_duration_ms"])
  except ValueError as e:
    raise EventError(str(e), "invalid_value", param) from None
  return out


def _rate(fmt, param: str) -> int:
  """A format object ({"type": "audio/pcm", "rate"}) or DashScope's / the beta's "pcm16" string: its rate."""
  if isinstance(fmt, str):
    if fmt != "pcm16":
      raise EventError(f"{param}: only PCM16 audio is taken ('pcm16' or {{'type': 'audio/pcm'}}), got {fmt!r}",
                       "invalid_value", param)
    return 16000
  if not isinstance(fmt, dict) or fmt.get("type", "audio/pcm") != "audio/pcm":
    raise EventError(f"{param}: only {{'type': 'audio/pcm', 'rate': 16000 | 24000}} is taken, got {fmt!r}",
                     "invalid_value", param)
  rate = fmt.get("rate", 24000)
  if rate not in IN_RATES:
    raise EventError(f"{param}.rate: audio at {rate} Hz is not taken; send 16000 or 24000 Hz PCM16",
                     "unsupported_sample_rate", f"{param}.rate")
  return int(rate)


def update_config(config: SessionConfig, session: Any, voices: list, can_speak: bool) -> SessionConfig:
  """session.update's `session` object (GA shape, or DashScope's / the beta's flat fields) applied to config."""
  if not isinstance(session, dict):
    raise EventError("session.update needs a `session` object", "missing_required_parameter", "session")
  c = dataclasses.replace(config)
  flat = any(k in session for k in ("modalities", "input_audio_format", "voice", "turn_detection"))
  known = {"type", "model", "output_modalities", "modalities", "instructions", "audio", "voice", "input_audio_format",
           "output_audio_format", "turn_detection", "max_output_tokens", "max_response_output_tokens", "event_names",
           "tool_choice", "tools", "temperature", "input_audio_transcription", "include", "prompt", "tracing",
           "truncation", "object", "id"}
  for k in session:
    if k not in known:
      raise EventError(f"session.{k}: unknown field", "unknown_parameter", f"session.{k}")
  if "output_modalities" in session or "modalities" in session:
    key = "output_modalities" if "output_modalities" in session else "modalities"
    c.output_modalities = _modalities(session[key], f"session.{key}")
  if "instructions" in session:
    if not isinstance(session["instructions"], str):
      raise EventError("session.instructions must be a string", "invalid_value", "session.instructions")
    c.instructions = session["instructions"] or None
  audio = session.get("audio") or {}
  if not isinstance(audio, dict):
    raise EventError("session.audio must be an object", "invalid_value", "session.audio")
  inp, out = audio.get("input") or {}, audio.get("output") or {}
  if "format" in inp:
    c.input_rate = _rate(inp["format"], "session.audio.input.format")
  if "input_audio_format" in session:
    c.input_rate = _rate(session["input_audio_format"], "session.input_audio_format")
  if "turn_detection" in inp:
    c.turn_detection = _turn_detection(inp["turn_detection"], "session.audio.input.turn_detection")
  if "turn_detection" in session:
    c.turn_detection = _turn_detection(session["turn_detection"], "session.turn_detection")
  if "format" in out and _out_rate(out["format"]) != OUT_RATE:
    raise EventError(f"session.audio.output.format: the reply's audio is PCM16 at {OUT_RATE} Hz",
                     "invalid_value", "session.audio.output.format")
  voice = out.get("voice", session.get("voice"))
  if voice is not None:
    if voice not in voices:
      raise EventError(f"voice {voice!r} is not one of this model's voices {voices}", "unknown_voice",
                       "session.audio.output.voice")
    c.voice = voice
  tokens = session.get("max_output_tokens", session.get("max_response_output_tokens"))
  if tokens is not None:
    if tokens != "inf" and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1):
      raise EventError(f"session.max_output_tokens must be a positive integer or 'inf', got {tokens!r}",
                       "invalid_value", "session.max_output_tokens")
    c.max_output_tokens = None if tokens == "inf" else tokens
  if "truncation" in session:
    c.truncation = _truncation(session["truncation"])
  if session.get("temperature") is not None:
    t = session["temperature"]
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t <= 2:
      raise EventError(f"session.temperature must be a number in [0, 2] (0: greedy), got {t!r}", "invalid_value",
                       "session.temperature")
    c.temperature = float(t)
  if "event_names" in session:
    if session["event_names"] not in ("ga", "beta"):
      raise EventError("session.event_names must be 'ga' or 'beta'", "invalid_value", "session.event_names")
    c.event_names = session["event_names"]
  elif flat:
    c.event_names = "beta"
  if "audio" in c.output_modalities and not can_speak:
    raise EventError("this model cannot speak (it has no Talker and Token2Wav); use output_modalities ['text']",
                     "audio_unsupported", "session.output_modalities")
  return c


def _truncation(value) -> Any:
  """session.truncation: "auto", "disabled" or {"type": "retention_ratio", "retention_ratio": r in (0, 1]}."""
  if value in ("auto", "disabled"):
    return value
  ratio = value.get("retention_ratio") if isinstance(value, dict) and value.get("type") == "retention_ratio" \
      else None
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1 or len(value) > 2:
    raise EventError(f"session.truncation must be 'auto', 'disabled' or {{'type': 'retention_ratio', "
                     f"'retention_ratio': r}} with 0 < r <= 1, got {value!r}", "invalid_value", "session.truncation")
  return {"type": "retention_ratio", "retention_ratio": float(ratio)}


def _out_rate(fmt) -> Optional[int]:
  if isinstance(fmt, str):
    return OUT_RATE if fmt in ("pcm16", "pcm24") else None
  return fmt.get("rate", OUT_RATE) if isinstance(fmt, dict) and fmt.get("type", "audio/pcm") == "audio/pcm" else None


# ---------------------------------------------------------------------------------------------------------
# Admission: the gate's checks for a WebSocket handshake.


def check_handshake(scope, gate: guard.GateConfig) -> None:
  """Host, Origin and API key of a WebSocket handshake (the HTTP gate's rules), or a ServeError. Browsers
  cannot set headers on a WebSocket: the key may come as the subprotocol `openai-insecure-api-key.<key>`, and a
  page of the server's own origin is allowed."""
  headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
  hosts = {h.strip().lower().strip("[]") for h in gate.allowed_hosts}
  host = headers.get("host", "")
  if "*" not in hosts and guard.host_name(host) not in hosts:
    raise ServeError(400, f"the Host header {host!r} is not one this server answers to (--allowed_hosts)",
                     code="invalid_host")
  origin = headers.get("origin")
  if origin is not None:
    origins = {o.strip().rstrip("/") for o in gate.cors_origins}
    if not guard.same_origin(origin, host) and "*" not in origins and origin.rstrip("/") not in origins:
      raise ServeError(403, f"WebSocket connections from {origin!r} are not allowed (--cors_origins)",
                       type="permission_error", code="origin_not_allowed")
  if gate.api_key is not None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",")]
    keys = [token.strip()] if scheme.lower() == "bearer" else []
    keys += [p[len(KEY_PROTOCOL):] for p in offered if p.startswith(KEY_PROTOCOL)]
    if not any(secrets.compare_digest(k.encode(), gate.api_key.encode()) for k in keys):
      raise ServeError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' or the subprotocol "
                       f"'{KEY_PROTOCOL}<key>'", type="authentication_error", code="invalid_api_key")


def chosen_subprotocol(scope) -> Optional[str]:
  """`realtime` when the client offers it (the key's subprotocol is never echoed back)."""
  for k, v in scope.get("headers", ()):
    if k.decode("latin-1").lower() == "sec-websocket-protocol":
      offered = [p.strip() for p in v.decode("latin-1").split(",")]
      return "realtime" if "realtime" in offered else None
  return None


# ---------------------------------------------------------------------------------------------------------
# One connection.


class _Response:
  """A reply being streamed: its ids, its worker job, what it produced."""

  def __init__(self, modalities: tuple):
    self.id, self.item_id = "resp_" + uuid.uuid4().hex[:20], "item_" + uuid.uuid4().hex[:20]
    self.modalities, self.audio = modalities, "audio" in modalities
    self.text, self.audio_samples = [], 0
    self.job = None
    self.closed = False  # response.done sent
    self.turn_closed_at: Optional[float] = None  # perf_counter() of the end of the user's turn
    self.first: dict = {}  # perf_counter() of the first "text" / "audio"
    self.usage = (0, 0)  # (prompt tokens, reply tokens)


class _Sink:
  """The worker job's output queue: put_nowait runs on the event loop (Job.send's call_soon_threadsafe)."""

  def __init__(self, conn: "Connection", response: _Response):
    self.conn, self.response = conn, response

  def put_nowait(self, item) -> None:
    self.conn.on_job_item(self.response, item)


class Connection:
  """One Realtime WebSocket connection (see the module doc): events in, events out, a session on the worker."""

  def __init__(self, websocket, worker, limits: protocol.Limits, rt: RealtimeLimits, model_name: str):
    self.ws, self.worker, self.limits, self.rt, self.model_name = websocket, worker, limits, rt, model_name
    backend = worker.backend
    self.backend = backend
    self.config = SessionConfig(voice=backend.default_voice,
                                output_modalities=("audio",) if backend.can_speak else ("text",))
    self.id = "sess_" + uuid.uuid4().hex[:20]
    self.out: asyncio.Queue = asyncio.Queue()
    self.session = None  # OmniSession, touched on the worker thread only
    self.response: Optional[_Response] = None
    self.detector = None
    self.resampler = None
    self.received = 0  # 16 kHz samples of input audio so far
    self.ring = np.zeros(0, np.float32)  # the newest input not yet prefilled (prefix padding, or until commit)
    self.ring_start = 0  # sample index of ring[0]
    self.in_speech = False  # between speech_started and speech_stopped (audio is being prefilled)
    self.turn_open = False  # input of the user's turn was prefilled (it is committed by a response or commit)
    self.item_id: Optional[str] = None
    self.frame: Optional[np.ndarray] = None  # the newest camera frame not yet prefilled
    self.frame_tokens = max(1.0, rt.max_frames_per_second * rt.frame_burst_seconds)  # the frames' bucket
    self.frame_clock = time.monotonic()
    self.inbox_bytes = 0  # read off the socket and not yet handled
    self.started = time.monotonic()
    self.turns = 0  # replies started
    self.arrived = time.monotonic()  # when the event being handled came off the socket
    self.turn_failed = False  # a call of this turn failed (e.g. the conversation is full): its audio is dropped
    self.detector_start = 0  # sample where the detector's clock starts
    self.frame_due = False  # the turn's frame is still to be prefilled
    self.waiting: list = []  # the turn's audio kept while the conversation is in a reply
    self.commit_due: Optional[bool] = None  # a turn ended during a reply: commit (and respond if True) after it

  # -- output

  def send(self, type_: str, **fields) -> None:
    if self.config.event_names == "beta":
      type_ = _BETA.get(type_, type_)
    self.out.put_nowait(dict(type=type_, event_id=_event_id(), **fields))

  def error(self, e: EventError, event_id: Optional[str] = None) -> None:
    self.send("error", error={"type": e.type, "code": e.code, "message": str(e), "param": e.param,
                              "event_id": event_id})

  async def writer(self) -> None:
    while True:
      event = await self.out.get()
      if event is None:
        return
      await self.ws.send_text(json.dumps(event, separators=(",", ":")))

  # -- worker calls

  def call(self, fn, event_id: Optional[str] = None):
    """fn on the worker thread, after everything asked before; its failure becomes an `error` event."""
    loop = asyncio.get_running_loop()
    future = asyncio.wrap_future(self.worker.call(fn), loop=loop)
    future.add_done_callback(lambda f: self._reported(f, event_id))
    return future

  def _reported(self, future, event_id) -> None:
    if future.cancelled() or future.exception() is None:
      return
    e = future.exception()
    self.turn_failed = True  # the rest of this turn's audio is dropped, not answered with an error each
    self.error(_as_event_error(e), event_id)

  # -- the session

  def _new_session(self, instructions: Optional[str]):
    from omni_jax.serve import session as session_lib  # noqa: PLC0415

    backend = self.backend

    def make():
      if self.session is not None:
        self.session.close()
      self.session = session_lib.OmniSession(backend.model, speaker=self.config.voice, system=instructions,
                                             max_len=backend.max_len, speech=backend.can_speak,
                                             truncation=self.config.retention)
    return make

  def close_session(self) -> None:
    def close():
      if self.session is not None:
        self.session.close()
        self.session = None
    self.worker.call(close)

  # -- events in

  async def handle(self, raw: str) -> None:
    try:
      event = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise EventError("the message is not a JSON object", "invalid_json") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
      raise EventError("an event is a JSON object with a string `type`", "invalid_event", "type")
    handler = _HANDLERS.get(event["type"])
    if handler is None:
      raise EventError(f"unknown event type {event['type']!r}", "invalid_event_type", "type")
    await handler(self, event)

  async def session_update(self, event) -> None:
    session = event.get("session")
    new = update_config(self.config, session, self.backend.voices, self.backend.can_speak)
    if new.instructions != self.config.instructions:
      if self.session_started:
        raise EventError("session.instructions can only change before the conversation's first input",
                         "invalid_value", "session.instructions")
      self.config = new
      await self.call(self._new_session(new.instructions), event.get("event_id"))
    if new.retention != self.config.retention:
      def set_truncation(ratio=new.retention):
        if self.session is not None:
          self.session.truncation = ratio
      await self.call(set_truncation, event.get("event_id"))
    if new.input_rate != self.config.input_rate:
      self.resampler = None
    if new.turn_detection != self.config.turn_detection:
      self.detector = None
      if new.turn_detection is None and self.in_speech:  # detection switched off mid-turn: hold the rest
        self.in_speech = False
    self.config = new
    self.send("session.updated", session=self.config.object(self.id, self.model_name))

  @property
  def session_started(self) -> bool:
    return self.turn_open or self.turns > 0

  def _to_model_rate(self, wave: np.ndarray) -> np.ndarray:
    if self.config.input_rate == MODEL_RATE:
      return wave
    if self.resampler is None:
      import soxr  # noqa: PLC0415 - a dependency of the audio stack

      self.resampler = soxr.ResampleStream(self.config.input_rate, MODEL_RATE, 1, dtype="float32")
    return self.resampler.resample_chunk(wave)

  async def audio_append(self, event) -> None:
    data = _b64(event.get("audio"), "audio", self.rt.max_event_bytes)
    wave = self._to_model_rate(_pcm16(data, "audio"))
    self.ring = np.concatenate([self.ring, wave])
    self.received += wave.shape[0]
    if self.ring.shape[0] + sum(w.shape[0] for w in self.waiting) > self.rt.max_buffer_seconds * MODEL_RATE:
      self.ring, self.ring_start, self.waiting = np.zeros(0, np.float32), self.received, []
      raise EventError(f"the input audio buffer holds more than {self.rt.max_buffer_seconds:g} s not yet in the "
                       "conversation; commit it (input_audio_buffer.commit) or turn on server_vad",
                       "input_audio_buffer_full", "audio", close=1008)
    td = self.config.turn_detection
    if td is None:
      return
    if self.detector is None:
      self.detector = vad.TurnDetector(td["threshold"], td["prefix_padding_ms"], td["silence_duration_ms"])
      self.detector_start = self.received - wave.shape[0]
    for kind, ms in self.detector.push(wave):
      at = self.detector_start + ms * MODEL_RATE // 1000
      if kind == "start":
        await self._speech_started(ms, at)
      else:
        self._prefill_ring()
        self.in_speech = False
        self.send("input_audio_buffer.speech_stopped", audio_end_ms=ms, item_id=self.item_id)
        self._commit(td["create_response"])
    if self.in_speech:
      self._prefill_ring()
    else:  # keep the prefix padding only
      keep = (td["prefix_padding_ms"] + 60) * MODEL_RATE // 1000
      if self.ring.shape[0] > keep:
        self.ring_start += self.ring.shape[0] - keep
        self.ring = self.ring[-keep:]

  async def _speech_started(self, ms: int, at: int) -> None:
    td = self.config.turn_detection
    self.in_speech = True
    self.item_id = "item_" + uuid.uuid4().hex[:20]
    self.send("input_audio_buffer.speech_started", audio_start_ms=ms, item_id=self.item_id)
    if self.response is not None and td.get("interrupt_response", True):  # barge-in
      await self._cancel_response("turn_detected")
    cut = max(0, at - self.ring_start)
    self.ring, self.ring_start = self.ring[cut:], self.ring_start + cut
    self._open_turn()
    self._prefill_ring()

  @property
  def held(self) -> bool:
    """The conversation is in a reply: the user's input waits (in the ring) until the reply ends."""
    return self.response is not None

  def _open_turn(self) -> None:
    """A user turn opens: the newest camera frame goes in first (with its audio, when the turn is prefilled)."""
    if not self.turn_open:
      self.turn_failed, self.frame_due = False, True
    self.turn_open = True

  def _prefill_ring(self) -> None:
    """The audio so far belongs to the turn: prefill it (after the turn's camera frame), or, while the
    conversation is in a reply, keep it for the reply's end."""
    if self.ring.shape[0]:
      self.waiting.append(self.ring)
      self.ring_start += self.ring.shape[0]
      self.ring = np.zeros(0, np.float32)
    if self.held:
      return
    if self.frame_due and self.frame is not None and not self.turn_failed:
      frame, self.frame = self.frame, None
      self.call(lambda: self.session.push_image(frame))
    self.frame_due = False
    if self.waiting and not self.turn_failed:
      wave = np.concatenate(self.waiting)
      self.call(lambda: self.session.push_audio(wave, MODEL_RATE))
    self.waiting = []

  async def audio_commit(self, event) -> None:
    if self.ring.shape[0] == 0 and not self.turn_open:
      raise EventError("the input audio buffer is empty", "input_audio_buffer_commit_empty")
    self.in_speech = False
    self.item_id = self.item_id or "item_" + uuid.uuid4().hex[:20]
    self._open_turn()
    self._prefill_ring()
    self._commit(create=False)

  def _commit(self, create: bool) -> None:
    """End the user's audio part (events now; the session's part ends on the worker, after its audio); with
    create, the reply starts. While a reply decodes, both wait for its end."""
    if self.held:
      self.commit_due = max(self.commit_due or False, create)
      return
    item = self.item_id or "item_" + uuid.uuid4().hex[:20]
    self.item_id = None
    self.call(lambda: self.session.end_audio())
    self.send("input_audio_buffer.committed", item_id=item, previous_item_id=None)
    message = {"id": item, "type": "message", "object": "realtime.item", "role": "user", "status": "completed",
               "content": [{"type": "input_audio", "transcript": None}]}
    self.send("conversation.item.added", item=message, previous_item_id=None)
    self.send("conversation.item.done", item=message, previous_item_id=None)
    if create:
      self._respond({})

  def _resume(self) -> None:
    """A reply ended: the input that came during it goes in now (and its commit, if the turn ended)."""
    if self.turn_open:
      self._prefill_ring()
    if self.commit_due is not None:
      create, self.commit_due = self.commit_due, None
      self._commit(create)

  async def audio_clear(self, event) -> None:
    if self.config.turn_detection is not None and self.in_speech:
      raise EventError("the audio of the current turn is already in the conversation (server_vad prefills it "
                       "as it arrives); it cannot be cleared", "input_audio_buffer_clear_prefilled")
    self.ring, self.ring_start, self.waiting = np.zeros(0, np.float32), self.received, []
    self.send("input_audio_buffer.cleared")

  async def image_append(self, event) -> None:
    # A token bucket: max_frames_per_second sustained, bursts of frame_burst_seconds' worth (frames that queued
    # up while the server stalled come at once), timed when the frame came off the socket.
    rate = self.rt.max_frames_per_second
    capacity = max(1.0, rate * self.rt.frame_burst_seconds)
    now = self.arrived
    self.frame_tokens = min(capacity, self.frame_tokens + (now - self.frame_clock) * rate)
    self.frame_clock = now
    if self.frame_tokens < 1.0:
      raise EventError(f"more than {rate:g} camera frames a second", "rate_limit_exceeded", "image",
                       type_="rate_limit_error")
    self.frame_tokens -= 1.0
    data = _b64(event.get("image"), "image", self.limits.max_media_bytes)
    self.frame = await asyncio.to_thread(_decode_image, data, self.limits)

  async def item_create(self, event) -> None:
    item = event.get("item")
    if not isinstance(item, dict) or item.get("type", "message") != "message":
      raise EventError("conversation.item.create takes an item of type 'message'", "invalid_value", "item.type")
    if item.get("role") != "user":
      raise EventError(f"item.role {item.get('role')!r}: only user messages are added (the session writes the "
                       "assistant's turns; instructions set the system turn)", "invalid_value", "item.role")
    content = item.get("content")
    if not isinstance(content, list) or not content:
      raise EventError("item.content must be a non-empty list of parts", "invalid_value", "item.content")
    if self.held:
      raise EventError(f"a response ({self.response.id}) is in progress; add items when it is done",
                       "conversation_already_has_active_response")
    steps = []
    for i, part in enumerate(content):
      param = f"item.content[{i}]"
      kind = part.get("type") if isinstance(part, dict) else None
      if kind in ("input_text", "text"):
        text = part.get("text")
        if not isinstance(text, str):
          raise EventError(f"{param}.text must be a string", "invalid_value", f"{param}.text")
        steps.append(lambda text=text: self.session.push_text(text))
      elif kind == "input_audio":
        wave = _pcm16(_b64(part.get("audio"), f"{param}.audio", self.limits.max_media_bytes), f"{param}.audio")
        if self.config.input_rate != MODEL_RATE:
          from omni_jax.input.media import audio as audio_media  # noqa: PLC0415

          wave = audio_media.resample(wave, self.config.input_rate)
        steps.append(lambda wave=wave: self.session.push_audio(wave, MODEL_RATE, final=True))
      elif kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url:
          raise EventError(f"{param}.image_url must be a data:image/...;base64 URL", "invalid_value",
                           f"{param}.image_url")
        data = _b64(url.split(";base64,", 1)[1], f"{param}.image_url", self.limits.max_media_bytes)
        frame = await asyncio.to_thread(_decode_image, data, self.limits)
        steps.append(lambda frame=frame: self.session.push_image(frame))
      else:
        raise EventError(f"{param}.type {kind!r} is not one of input_text, input_audio, input_image",
                         "invalid_value", f"{param}.type")
    self.in_speech = False
    self._open_turn()
    self._prefill_ring()
    for step in steps:
      self.call(step, event.get("event_id"))
    item_id = item.get("id") or "item_" + uuid.uuid4().hex[:20]
    # The echo names the parts without their data.
    parts = [p if p.get("type") in ("input_text", "text") else {"type": p["type"]} for p in content]
    message = dict(item, id=item_id, object="realtime.item", status="completed", content=parts)
    self.send("conversation.item.added", item=message, previous_item_id=None)
    self.send("conversation.item.done", item=message, previous_item_id=None)

  async def response_create(self, event) -> None:
    options = event.get("response") or {}
    if not isinstance(options, dict):
      raise EventError("response must be an object", "invalid_value", "response")
    self._respond(options)

  async def response_cancel(self, event) -> None:
    if self.response is None:
      raise EventError("there is no response to cancel", "response_cancel_not_active")
    await self._cancel_response("client_cancelled")

  # -- replies

  def _respond(self, options: dict) -> None:
    if self.response is not None:
      raise EventError(f"a response ({self.response.id}) is in progress; cancel it first",
                       "conversation_already_has_active_response")
    for k in options:
      if k not in ("output_modalities", "modalities", "max_output_tokens", "voice", "instructions", "metadata",
                   "conversation", "audio"):
        raise EventError(f"response.{k}: unknown field", "unknown_parameter", f"response.{k}")
    modalities = self.config.output_modalities
    if "output_modalities" in options or "modalities" in options:
      key = "output_modalities" if "output_modalities" in options else "modalities"
      modalities = _modalities(options[key], f"response.{key}")
    speak = "audio" in modalities
    if speak and not self.backend.can_speak:
      raise EventError("this model cannot speak; ask for output_modalities ['text']", "audio_unsupported",
                       "response.output_modalities")
    voice = options.get("voice", ((options.get("audio") or {}).get("output") or {}).get("voice", self.config.voice))
    if speak and voice not in self.backend.voices:
      raise EventError(f"voice {voice!r} is not one of {self.backend.voices}", "unknown_voice", "response.voice")
    limit = self.limits.max_new_tokens
    tokens = options.get("max_output_tokens", self.config.max_output_tokens)
    if tokens not in (None, "inf"):
      if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise EventError("response.max_output_tokens must be a positive integer or 'inf'", "invalid_value",
                         "response.max_output_tokens")
      limit = min(limit, tokens)
    if not self.turn_open:
      raise EventError("there is no user input to respond to", "input_missing")
    self.in_speech = False
    self._prefill_ring()
    response = self.response = _Response(modalities)
    response.turn_closed_at = time.perf_counter()
    self.turn_open, self.item_id = False, None
    self.turns += 1
    self.send("response.created", response=self._response_object(response, "in_progress"))
    backend, session_ref = self.backend, self
    t = self.config.temperature
    sampling = {} if t is None else dict(do_sample=False) if t == 0 else dict(do_sample=True, temperature=t)

    def start():
      from omni_jax.serve import session as session_lib  # noqa: PLC0415

      s = session_ref.session
      engine = s._engine(slots=session_ref.worker.max_batch, max_new_tokens=backend.limits.max_new_tokens)  # noqa: SLF001
      [reply] = session_lib.start_replies([s], engine, speak=speak, max_new_tokens=limit, speakers=[voice],
                                          **sampling)
      response.usage = (reply.row.prompt_tokens, 0)
      return reply

    loop = asyncio.get_running_loop()
    response.job = server_lib.Job(None, {}, loop=loop, out=_Sink(self, response), start=start, keep_session=True)
    self.worker.attach(response.job)
    item = {"id": response.item_id, "type": "message", "object": "realtime.item", "role": "assistant",
            "status": "in_progress", "content": []}
    self.send("response.output_item.added", response_id=response.id, output_index=0, item=item)
    part = {"type": "audio", "transcript": ""} if response.audio else {"type": "text", "text": ""}
    self.send("response.content_part.added", response_id=response.id, item_id=response.item_id, output_index=0,
              content_index=0, part=part)

  async def _cancel_response(self, reason: str) -> None:
    response = self.response
    if response is None:
      return
    await asyncio.wrap_future(self.worker.cancel_now(response.job))
    response.usage = (response.usage[0], response.job.sent_tokens)  # what the cache keeps of the reply
    self._close_response(response, "cancelled", {"type": "cancelled", "reason": reason})

  def on_job_item(self, response: _Response, item) -> None:
    """The worker's output for a response (on the loop): deltas, its end or its failure."""
    kind, value = item
    if response.closed:
      return
    where = dict(response_id=response.id, item_id=response.item_id, output_index=0, content_index=0)
    if kind == "error":
      e = value
      self.send("error", error={"type": e.type, "code": e.code, "message": str(e.message), "param": e.param,
                                "event_id": None})
      self._close_response(response, "failed", {"type": "failed", "error": {"type": e.type, "code": e.code}})
    elif kind == "end":
      if not response.closed:  # ended without "done" (cancelled by the server)
        self._close_response(response, "cancelled", {"type": "cancelled", "reason": "server"})
    elif value.kind == "text" and value.payload:
      response.text.append(value.payload)
      response.first.setdefault("text", time.perf_counter())
      name = "response.output_audio_transcript.delta" if response.audio else "response.output_text.delta"
      self.send(name, delta=value.payload, **where)
    elif value.kind == "audio" and response.audio:
      pcm = protocol.pcm16(value.payload)
      response.first.setdefault("audio", time.perf_counter())
      response.audio_samples += len(pcm) // 2
      self.send("response.output_audio.delta", delta=base64.b64encode(pcm).decode("ascii"), **where)
    elif value.kind == "done":
      done = value.payload
      text = "".join(response.text)
      if response.audio:
        self.send("response.output_audio.done", **where)
        self.send("response.output_audio_transcript.done", transcript=text, **where)
      else:
        self.send("response.output_text.done", text=text, **where)
      details = None if done.finish_reason == "stop" else {"type": "incomplete", "reason": "max_output_tokens"}
      response.usage = (int(done.prompt_tokens), int(len(done.tokens)))
      self._close_response(response, "completed" if details is None else "incomplete", details)

  def _close_response(self, response: _Response, status: str, details: Optional[dict]) -> None:
    if response.closed:
      return
    response.closed = True
    if self.response is response:
      self.response = None
      self._resume()
    text = "".join(response.text)
    part = ({"type": "audio", "transcript": text} if response.audio else {"type": "text", "text": text})
    item = {"id": response.item_id, "type": "message", "object": "realtime.item", "role": "assistant",
            "status": "completed" if status == "completed" else "incomplete", "content": [part]}
    where = dict(response_id=response.id, output_index=0)
    self.send("response.content_part.done", item_id=response.item_id, content_index=0, part=part, **where)
    self.send("response.output_item.done", item=item, **where)
    obj = self._response_object(response, status, details, [item])
    self.send("response.done", response=obj)

  def _response_object(self, response: _Response, status: str, details: Optional[dict] = None,
                       output: Optional[list] = None) -> dict:
    prompt, completion = response.usage
    t0 = response.turn_closed_at
    metadata = {f"first_{k}_ms": f"{(t - t0) * 1000:.1f}" for k, t in response.first.items()}
    return {"id": response.id, "object": "realtime.response", "status": status, "status_details": details,
            "output": output or [], "output_modalities": list(response.modalities), "conversation_id": self.id,
            "metadata": metadata or None,
            "usage": {"total_tokens": prompt + completion, "input_tokens": prompt, "output_tokens": completion,
                      "input_token_details": {"text_tokens": prompt, "audio_tokens": 0, "cached_tokens": 0},
                      "output_token_details": {"text_tokens": completion, "audio_tokens": 0}}}

  # -- life

  async def reader(self, inbox: asyncio.Queue, drained: asyncio.Event) -> None:
    """Messages off the socket with their arrival time, while the handler may wait for the worker. The inbox
    holds at most 8 events' bytes: a client far ahead of the model then waits on its socket."""
    while True:
      while self.inbox_bytes > 8 * self.rt.max_event_bytes:
        drained.clear()
        await drained.wait()
      try:
        message = await self.ws.receive()
      except Exception:  # noqa: BLE001 - the socket is gone
        message = {"type": "websocket.disconnect"}
      self.inbox_bytes += _size(message)
      inbox.put_nowait((time.monotonic(), message))
      if message["type"] == "websocket.disconnect":
        return

  async def run(self) -> None:
    """Serve the connection until the client leaves or a limit closes it; its reply and cache go with it."""
    writer = asyncio.create_task(self.writer())
    inbox: asyncio.Queue = asyncio.Queue()
    drained = asyncio.Event()
    reader = asyncio.create_task(self.reader(inbox, drained))
    close_code = 1000
    try:
      await self.call(self._new_session(self.config.instructions))
      self.send("session.created", session=self.config.object(self.id, self.model_name))
      while True:
        left = self.rt.max_session_seconds - (time.monotonic() - self.started)
        if left <= 0:
          self.error(EventError(f"the session is over its {self.rt.max_session_seconds:g} s", "session_expired"))
          close_code = 1008
          break
        try:
          self.arrived, message = await asyncio.wait_for(inbox.get(), timeout=min(left, self.rt.idle_seconds))
          self.inbox_bytes -= _size(message)
          drained.set()
        except asyncio.TimeoutError:
          if left < self.rt.idle_seconds:  # the session's end: the check above says so
            continue
          self.error(EventError(f"no event for {self.rt.idle_seconds:g} s", "idle_timeout"))
          close_code = 1008
          break
        if message["type"] == "websocket.disconnect":
          close_code = None
          break
        raw = message.get("text")
        if raw is None:
          raw = (message.get("bytes") or b"").decode("utf-8", "replace")
        event_id = None
        try:
          if len(raw) > self.rt.max_event_bytes:
            raise EventError(f"an event is at most {self.rt.max_event_bytes} bytes, got {len(raw)}",
                             "message_too_large", close=1009)
          try:
            event_id = json.loads(raw).get("event_id") if raw.startswith("{") else None
          except (json.JSONDecodeError, AttributeError):
            event_id = None
          await self.handle(raw)
        except EventError as e:
          self.error(e, event_id)
          if e.close:
            close_code = e.close
            break
    except Exception as e:  # noqa: BLE001 - the socket went away, or the server failed this connection
      if not _disconnected(e):
        log.exception("realtime connection failed", exc_info=e)
        self.error(EventError(f"the server failed on this connection ({type(e).__name__})", "internal_error",
                              type_="server_error"))
        close_code = 1011
      else:
        close_code = None
    finally:
      reader.cancel()
      if self.response is not None:  # a dropped socket frees its slot now
        job = self.response.job
        self.response.closed = True
        self.response = None
        if job is not None:
          self.worker.cancel_now(job)
      self.close_session()
      self.out.put_nowait(None)
      try:
        await asyncio.wait_for(writer, timeout=5)
      except Exception:  # noqa: BLE001 - the socket is gone
        writer.cancel()
      if close_code is not None:
        try:
          await self.ws.close(code=close_code)
        except Exception:  # noqa: BLE001 - already closed
          pass


def _size(message: dict) -> int:
  return len(message.get("text") or "") + len(message.get("bytes") or b"")


def _disconnected(e: Exception) -> bool:
  name = type(e).__name__
  return name in ("WebSocketDisconnect", "ConnectionClosed", "ConnectionClosedError", "ConnectionClosedOK",
                  "ClientDisconnected") or isinstance(e, (ConnectionError, asyncio.CancelledError))


def _as_event_error(e: BaseException) -> EventError:
  if isinstance(e, EventError):
    return e
  if isinstance(e, ServeError):
    return EventError(e.message, e.code or "invalid_request", e.param, e.type)
  err = server_lib.user_error(e)
  if err is not None:
    return EventError(err.message, err.code or "invalid_request", err.param)
  log.error("realtime call failed", exc_info=e)
  return EventError(f"the server failed on this event ({type(e).__name__}; details in the server's log)",
                    "internal_error", type_="server_error")


def _decode_image(data: bytes, limits: protocol.Limits) -> np.ndarray:
  from omni_jax.input.media import MediaError  # noqa: PLC0415
  from omni_jax.input.media import image as image_media  # noqa: PLC0415

  try:
    return image_media.load_image(data, media_lib.budget_of(limits))
  except (MediaError, OSError, ValueError) as e:
    raise EventError(f"image: {' '.join(str(e).split())}", "invalid_image", "image") from None


_HANDLERS = {
    "session.update": Connection.session_update,
    "input_audio_buffer.append": Connection.audio_append,
    "input_audio_buffer.commit": Connection.audio_commit,
    "input_audio_buffer.clear": Connection.audio_clear,
    "input_image_buffer.append": Connection.image_append,
    "conversation.item.create": Connection.item_create,
    "response.create": Connection.response_create,
    "response.cancel": Connection.response_cancel,
}


def add_routes(app, worker, limits: protocol.Limits, rt: RealtimeLimits, gate: guard.GateConfig,
               model_name: str) -> None:
  """The WebSocket route /v1/realtime on `app` (server.create_app calls it)."""
  from fastapi import WebSocket  # noqa: PLC0415 - the serve extra
  from fastapi.responses import JSONResponse  # noqa: PLC0415

  open_connections = {"n": 0}

  async def refuse(websocket, e: ServeError) -> None:
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
      await websocket.send_denial_response(JSONResponse(e.body(), status_code=e.status))
    else:
      await websocket.close(code=1008, reason=e.message[:120])

  @app.websocket("/v1/realtime")
  async def realtime(websocket: WebSocket):
    try:
      check_handshake(websocket.scope, gate)
      model = websocket.query_params.get("model", model_name)
      if model != model_name:
        raise ServeError(404, f"The model {model!r} does not exist; this server has {model_name!r}",
                         param="model", code="model_not_found")
      if open_connections["n"] >= rt.max_connections:
        raise ServeError(429, f"the server has {rt.max_connections} realtime sessions open; retry later",
                         type="rate_limit_error", code="too_many_sessions")
    except ServeError as e:
      return await refuse(websocket, e)
    open_connections["n"] += 1
    try:
      await websocket.accept(subprotocol=chosen_subprotocol(websocket.scope))
      await Connection(websocket, worker, limits, rt, model_name).run()
    finally:
      open_connections["n"] -= 1

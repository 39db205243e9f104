"""The OpenAI-compatible HTTP server: FastAPI routes in front of one worker thread that owns the model.

  python -m omni_jax.serve --checkpoint workdirs/tiny_demo            # http://127.0.0.1:8000/v1
  worker = server.Worker(server.Backend(model, limits), limits, max_queue=8, max_batch=4)
  app = server.create_app(worker, limits, model_name="tiny")      # uvicorn.run(app, host="127.0.0.1")

Routes: POST /v1/chat/completions (protocol.py's request format; stream=true answers Server-Sent Events of
chat.completion.chunk objects ending in `data: [DONE]`), GET /v1/models, GET /v1/stats (active, queued, served,
rejected, cancelled, failed: what the leak test reads; batched: requests decoded in a batch), GET /health.

Every request first passes the gate (guard.py: Host, Origin, API key, JSON body within its size and read
timeouts). Concurrency: the event loop only parses and validates; a request's media are decoded on the
decoder's threads (media.py, under the budgets of protocol.Limits; its files removed at once), and then it
becomes a Job on a bounded queue (--max_queue; a full queue answers 429). One worker thread owns the model and
drives the conversation engine's --max_batch slots (continuous batching): a job is prefilled when a slot is
free and joins the running batch at the next step, whatever its decoding settings; a finished reply frees its
slot at once; a job whose client went away is cancelled at the next step (`cancelled` counted). A request's
error before its first event (an undecodable image, a prompt over --max_prompt_tokens, an unknown voice) is
its HTTP status; a failure after the first streamed byte ends the stream with an error object.
"""

import asyncio
import base64
import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Optional

import numpy as np

from omni_jax.serve import guard
from omni_jax.serve import media as media_lib
from omni_jax.serve import protocol
from omni_jax.serve.events import Done, Event
from omni_jax.serve.protocol import ServeError

log = logging.getLogger(__name__)

AUDIO_DELTA_SECONDS = 0.5  # longer audio events go out as several deltas (bounded SSE events)
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")  # the web page


# ---------------------------------------------------------------------------------------------------------
# Engines: one request's conversation -> a stream of Events, on the worker thread.


def user_error(e: Exception) -> Optional[ServeError]:
  """The 400 of a model-side error caused by the request (bad media, a setting, a voice), else None."""
  from omni_jax.generate import limits as limits_lib  # noqa: PLC0415 - only needed with a model
  from omni_jax.input import preprocess  # noqa: PLC0415

  if isinstance(e, limits_lib.ContextLengthError):
    return ServeError(400, " ".join(str(e).split()), param="messages", code="context_length_exceeded")
  if isinstance(e, (preprocess.SampleError, ValueError, TypeError)):
    return ServeError(400, " ".join(str(e).split()), code="invalid_request")
  return None


class Backend:
  """The model behind the server: a request's conversation becomes an OmniSession whose reply is submitted to the
  model's conversation engine (omni_jax.generate.engine), whose slots the worker drives. slots: replies decoded
  at once (--max_batch)."""

  def __init__(self, model, limits: protocol.Limits, slots: int = 1):
    self.model, self.limits, self.slots = model, limits, int(slots)
    talker = model.config.model.get("talker", None)
    self.voices = sorted(talker.speakers.keys()) if talker is not None else []
    self.default_voice = talker.get("default_speaker", None) if talker is not None else None
    # One cache length for every request (the compiled programs are shared; the markup a reply adds fits the
    # 16 spare slots); the prompt limit is checked on each request.
    self.max_len = limits.max_prompt_tokens + limits.max_new_tokens + 16

  @property
  def can_speak(self) -> bool:
    return bool(self.voices) and getattr(self.model, "has_token2wav", False)

  def check_voice(self, voice: Optional[str]) -> Optional[str]:
    """The speaker of a request's audio.voice, or a 400 naming the voices there are (on the event loop: no
    model work; whether the voice has cond / ref_mel is checked by _voiceable on the worker)."""
    if not self.can_speak:
      raise ServeError(400, "this model cannot speak (it has no Talker and Token2Wav); ask for modalities "
                       '["text"]', param="modalities", code="audio_unsupported")
    name = voice or self.default_voice
    if name not in self.voices:
      raise ServeError(400, f"audio.voice: unknown voice {voice!r}; this model has {self.voices}",
                       param="audio.voice", code="unknown_voice")
    return name

  def _voiceable(self, voice: str) -> None:
    from omni_jax.token2wav import voice as voice_lib  # noqa: PLC0415

    try:
      self.model.voicer.voice(voice)
    except voice_lib.VoiceError as e:
      raise ServeError(400, f"audio.voice: {' '.join(str(e).split())}", param="audio.voice",
                       code="unknown_voice") from None

  def start(self, conversation: list, *, speak: bool, voice: Optional[str], max_new_tokens: int, sampling: dict):
    """Prefill a request's conversation into a new session and submit its reply to the conversation engine:
    the session's SessionReply (engine: .engine). A conversation of one user turn (and a system turn) is pushed
    part by part, one with earlier turns is rendered whole (the HTTP API is stateless: the client resends the
    history)."""
    from omni_jax.generate import limits as limits_lib  # noqa: PLC0415
    from omni_jax.serve import session as session_lib  # noqa: PLC0415

    system = [m for m in conversation if m["role"] == "system"]
    users = [m for m in conversation if m["role"] == "user"]
    if speak:
      self._voiceable(voice)
    # A request is one turn: the Talker's prefix is kept only when this turn speaks.
    session = session_lib.OmniSession(self.model, speaker=voice, system=system[0]["content"] if system else None,
                                      max_len=self.max_len, speech=speak)
    try:
      try:
        if len(users) == 1 and len(system) <= 1 and len(system) + 1 == len(conversation):
          session.push_message(users[0])
        else:
          session.push_conversation(conversation)
      except limits_lib.ContextLengthError as e:  # refused before prefilling: longer than the cache
        raise _too_long(e.prompt_tokens, self.limits) from None
      if session.num_tokens > self.limits.max_prompt_tokens:
        raise _too_long(session.num_tokens, self.limits)
      engine = session._engine(slots=self.slots, max_new_tokens=self.limits.max_new_tokens)  # noqa: SLF001
      sampling = dict(sampling)
      seed = sampling.pop("seed", None)
      [reply] = session_lib.start_replies([session], engine, speak=speak, max_new_tokens=max_new_tokens, seed=seed,
                                          speakers=[voice], **sampling)
    except BaseException:
      session.close()
      raise
    reply.reply.keep = False  # one turn: the slot is freed without copying the caches back
    return reply


def _too_long(n: int, limits: protocol.Limits) -> ServeError:
  return ServeError(400, f"the prompt is {n} tokens (chat markup and media included); this server takes at most "
                    f"{limits.max_prompt_tokens}", param="messages", code="context_length_exceeded")


# ---------------------------------------------------------------------------------------------------------
# The worker: one thread owns the model; jobs come through a bounded queue.


@dataclasses.dataclass
class Job:
  """One accepted request: what to run, where its events go (an asyncio queue on the server's loop).

  A realtime reply (serve/realtime.py) brings its own `start` (run on the worker thread: -> SessionReply of a
  session it keeps across turns, keep_session) instead of a conversation; sent_tokens counts the reply's tokens
  whose events went out before it was cancelled (what the listener got: the cache keeps those)."""
  conversation: Optional[list]
  options: dict  # Backend.start keywords
  loop: Any
  out: Any  # asyncio.Queue of ("event", Event) | ("error", ServeError) | ("end", None)
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
  start: Optional[Callable[[], Any]] = None
  keep_session: bool = False
  sent_tokens: int = 0

  def send(self, kind: str, item: Any) -> None:
    if not self.cancelled.is_set():
      self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, item))

  def cancel(self) -> None:
    self.cancelled.set()


@dataclasses.dataclass(eq=False)
class _Active:
  job: Job
  reply: Any  # omni_jax.serve.session.SessionReply
  batched: bool = False


class Worker:
  """Continuous batching: up to max_batch replies decode at once in the conversation engine's slots. A request
  taken while others decode is prefilled and joins the running batch at the engine's next step; a finished
  reply frees its slot at once, and the next request takes it."""

  def __init__(self, backend: Backend, limits: protocol.Limits, *, max_queue: int = 8, max_batch: int = 1):
    if max_queue < 1 or max_batch < 1:
      raise ValueError(f"--max_queue ({max_queue}) and --max_batch ({max_batch}) must be >= 1")
    self.backend, self.limits, self.max_batch = backend, limits, max_batch
    backend.slots = max_batch
    self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
    self.lock = threading.Lock()
    self.counts = collections.Counter(served=0, rejected=0, cancelled=0, failed=0, batched=0)
    self.active = 0
    self.tasks: queue.Queue = queue.Queue()  # (fn, future): model work of realtime connections, in order
    self._wake = threading.Event()
    self._running: list[_Active] = []
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="omni-worker", daemon=True)

  def start(self) -> "Worker":
    if not self._thread.is_alive():
      self._thread.start()
    return self

  def stop(self) -> None:
    self._stop.set()
    self._wake.set()
    self._thread.join(timeout=30)

  def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
    """Run fn on the worker thread between engine steps (a realtime session's prefill, its reply's start or
    cancel); calls run in the order they were made. Returns fn's future."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    if self._stop.is_set():
      future.set_exception(ServeError(503, "the server is shutting down", type="server_error", code="shutting_down"))
      return future
    self.tasks.put((fn, future))
    self._wake.set()
    return future

  def attach(self, job: Job) -> concurrent.futures.Future:
    """Start a job with its own `start` on the worker (after the calls made before it); its reply joins the
    running batch. The future's result: the SessionReply (or the start's exception, also sent to the job)."""

    def start():
      with self.lock:
        self.active += 1
      try:
        reply = job.start()
      except Exception as e:  # noqa: BLE001 - the worker outlives every request
        self._fail(job, e)
        raise
      self._running.append(_Active(job, reply))
      return reply

    return self.call(start)

  def cancel_now(self, job: Job) -> concurrent.futures.Future:
    """Cancel a job's reply on the worker, after the calls made before (a barge-in: the session takes input
    again at once): the cache keeps the job's sent_tokens. The future's result: whether it was running."""
    job.cancel()

    def cancel():
      for a in list(self._running):
        if a.job is job:
          self._end(a, self._running, "cancelled")
          return True
      return False

    return self.call(cancel)

  def stats(self) -> dict:
    with self.lock:
      return dict(self.counts, active=self.active, queued=self.jobs.qsize(), max_queue=self.jobs.maxsize,
                  max_batch=self.max_batch)

  def _count(self, key: str) -> None:
    with self.lock:
      self.counts[key] += 1

  def submit(self, job: Job) -> None:
    try:
      self.jobs.put_nowait(job)
    except queue.Full:
      self._count("rejected")
      raise ServeError(429, f"the server is busy ({self.jobs.maxsize} requests queued); retry later",
                       type="rate_limit_error", code="queue_full") from None
    self._wake.set()

  def _finish(self, job: Job, outcome: str, last: Optional[tuple] = None) -> None:
    """Count a job and send its last item (so a client that has its reply reads counts that include it)."""
    with self.lock:
      self.counts[outcome] += 1
      self.active -= 1
    if last is not None:
      job.send(*last)
    job.send("end", None)

  def _fail(self, job: Job, e: BaseException) -> None:
    err = e if isinstance(e, ServeError) else user_error(e)
    if err is None:
      log.exception("request failed", exc_info=e)
      # The exception's text may name the server's files: it goes to the log, the client gets its type.
      err = ServeError(500, f"the server failed on this request ({type(e).__name__}; details in the server's log)",
                       type="server_error", code="internal_error")
    self._finish(job, "failed", last=("error", err))

  def _take(self, running: list) -> None:
    """Start queued jobs while a slot is free."""
    while len(running) < self.max_batch:
      try:
        job = self.jobs.get_nowait()
      except queue.Empty:
        return
      with self.lock:
        self.active += 1
      if job.cancelled.is_set():
        self._finish(job, "cancelled")
        continue
      try:
        running.append(_Active(job, self.backend.start(job.conversation, **job.options)))
      except Exception as e:  # noqa: BLE001 - the worker outlives every request
        self._fail(job, e)

  def _calls(self) -> None:
    """Run the calls made so far (call / attach / cancel_now), in order."""
    while True:
      try:
        fn, future = self.tasks.get_nowait()
      except queue.Empty:
        return
      if not future.set_running_or_notify_cancel():
        continue
      try:
        future.set_result(fn())
      except BaseException as e:  # noqa: BLE001 - the caller gets it; the worker goes on
        future.set_exception(e)

  def _run(self) -> None:
    running = self._running
    while not self._stop.is_set():
      if not running and self.jobs.empty() and self.tasks.empty():
        self._wake.wait(0.5)  # idle: woken by submit() or call()
      self._wake.clear()
      for a in list(running):
        if a.job.cancelled.is_set():  # the client went away: its slot is freed now
          self._end(a, running, "cancelled")
      self._calls()
      self._take(running)
      by_reply = {id(a.reply.reply): a for a in running}
      for engine in {id(a.reply.engine): a.reply.engine for a in running}.values():
        try:
          # A new reply's first token goes out before the next generate call, not after it.
          self._send(by_reply, [(r, "token", t) for r, t in engine.admit() if r.error is None])
          events = engine.step()
        except Exception as e:  # noqa: BLE001 - a failed call fails the replies it held, not the worker
          for a in [a for a in running if a.reply.engine is engine]:
            running.remove(a)
            self._close(a)
            self._fail(a.job, e)
          continue
        self._note_batched([a for a in running if a.reply.engine is engine and a.reply.reply.slot is not None])
        self._send(by_reply, events)
      for a in list(running):
        if a.reply.reply.error is not None:
          running.remove(a)
          self._close(a)
          self._fail(a.job, a.reply.reply.error)
        elif a.reply.reply.finished:
          self._end(a, running, "served")
    for a in list(running):
      self._end(a, running, "cancelled")
    self._calls()  # calls made while stopping fail with the closed session, not hang

  @staticmethod
  def _send(by_reply: dict, events: list) -> None:
    """Hand the engine's (reply, kind, id) events to their jobs, unless the job was cancelled."""
    for reply, kind, value in events:
      a = by_reply.get(id(reply))
      if a is not None and not a.job.cancelled.is_set():
        a.job.sent_tokens += kind == "token"
        for event in a.reply.on(kind, value):
          a.job.send("event", event)

  def _close(self, a: _Active) -> None:
    """A request's session goes with its reply; a realtime session outlives it, unless its caches went down
    with a failed call."""
    session = a.reply.session
    if not a.job.keep_session or session._conv is None or session._conv.cache is None:  # noqa: SLF001
      session.close()

  def _note_batched(self, in_slots: list) -> None:
    """Count the requests that decoded beside another (the `batched` figure of /v1/stats)."""
    if len(in_slots) > 1:
      for a in in_slots:
        if not a.batched:
          a.batched = True
          self._count("batched")

  def _end(self, a: _Active, running: list, outcome: str) -> None:
    running.remove(a)
    try:
      if outcome == "served":
        events = list(a.reply.final_events(*a.reply.end()))
        for event in events[:-1]:
          a.job.send("event", event)
        self._finish(a.job, outcome, last=("event", events[-1]))
      else:
        a.reply.abort(keep_tokens=a.job.sent_tokens)
        self._finish(a.job, outcome)
    except Exception as e:  # noqa: BLE001 - the worker outlives every request
      self._fail(a.job, e)
    finally:
      self._close(a)


# ---------------------------------------------------------------------------------------------------------
# The HTTP side.


class _Reply:
  """Turns one job's events into OpenAI objects (chunks or a whole completion)."""

  def __init__(self, request: protocol.ChatRequest, model_name: str):
    self.request, self.model_name = request, model_name
    self.id, self.created = "chatcmpl-" + uuid.uuid4().hex, protocol.now()
    self.audio_id = "audio_" + uuid.uuid4().hex if request.speak else None
    self.format = request.audio.format if request.speak else None
    self.pcm, self.header_sent = [], False

  def audio_data(self, wave: np.ndarray) -> str:
    """base64 of one audio event: pcm16 bytes; for a streamed "wav" the first delta starts with the header."""
    pcm = protocol.pcm16(wave)
    if self.format == "wav" and not self.header_sent:
      pcm, self.header_sent = protocol.streaming_wav_header() + pcm, True
    return base64.b64encode(pcm).decode("ascii")

  def chunk(self, delta: dict, finish: Optional[str] = None) -> str:
    return _sse(protocol.chunk(self.id, self.model_name, self.created, delta, finish))

  def usage(self, done: Done) -> dict:
    return protocol.usage(int(done.prompt_tokens), int(len(done.tokens)))


def _sse(obj: dict) -> str:
  return "data: " + json.dumps(obj, separators=(",", ":")) + "\n\n"


def create_app(worker: Worker, limits: protocol.Limits, *, model_name: str, media_root: Optional[str] = None,
               started: Optional[float] = None, gate: Optional[guard.GateConfig] = None, decode_workers: int = 2,
               realtime_limits=None):
  """The FastAPI app behind its gate (guard.Gate: hosts, origins, API key, body size and timeouts; default
  GateConfig()). worker: started and stopped with the app (lifespan). decode_workers: threads that decode
  requests' media (serve/media.py), so the model's thread only prefills and decodes tokens. The Realtime
  WebSocket /v1/realtime (serve/realtime.py; realtime_limits: its RealtimeLimits) and the web page that talks
  through it (/, serve/static/) are on the same app."""
  import contextlib  # noqa: PLC0415

  from fastapi import FastAPI, Request  # noqa: PLC0415 - the serve extra
  from fastapi.responses import FileResponse, JSONResponse, StreamingResponse  # noqa: PLC0415

  from omni_jax.serve import realtime  # noqa: PLC0415 - imports this module

  created = int(started or time.time())
  transcripts: collections.OrderedDict = collections.OrderedDict()  # audio id -> transcript, for later turns
  if media_root is not None and not os.path.isdir(media_root):
    raise ValueError(f"--media_root {media_root}: no such directory")
  model = getattr(worker.backend, "model", None)
  decoder = media_lib.MediaDecoder(getattr(model, "preprocessor", None), limits, workers=decode_workers,
                                   max_pending=max(worker.jobs.maxsize, 1) * 2)

  @contextlib.asynccontextmanager
  async def lifespan(_app):
    worker.start()
    yield
    worker.stop()
    decoder.close()

  app = FastAPI(title="omni_jax", lifespan=lifespan)
  gate = gate or guard.GateConfig()
  app.add_middleware(guard.Gate, config=gate, max_body_bytes=limits.max_body_bytes)
  realtime.add_routes(app, worker, limits, realtime_limits or realtime.RealtimeLimits(), gate, model_name)

  def error(e: ServeError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(ServeError)
  async def _serve_error(_request, e: ServeError):
    return error(e)

  @app.exception_handler(404)
  async def _not_found(request, _e):
    return error(ServeError(404, f"no route {request.method} {request.url.path}", code="not_found"))

  @app.exception_handler(405)
  async def _bad_method(request, _e):
    return error(ServeError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"))

  def model_card() -> dict:
    return {"id": model_name, "object": "model", "created": created, "owned_by": "omni_jax"}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [model_card()]}

  @app.get("/v1/models/{name:path}")
  async def model(name: str):
    if name != model_name:
      raise ServeError(404, f"The model {name!r} does not exist; this server has {model_name!r}",
                       param="model", code="model_not_found")
    return model_card()

  @app.get("/v1/stats")
  async def stats():
    return worker.stats()

  @app.get("/health")
  async def health():
    return {"status": "ok"}

  @app.get("/")
  async def page():
    return FileResponse(os.path.join(STATIC_DIR, "index.html"), headers={"Cache-Control": "no-cache"})

  @app.get("/static/{name}")
  async def static(name: str):
    path = os.path.join(STATIC_DIR, name)
    if "/" in name or name.startswith(".") or not os.path.isfile(path):
      raise ServeError(404, f"no file /static/{name}", code="not_found")
    return FileResponse(path, headers={"Cache-Control": "no-cache"})

  def prepare(request: protocol.ChatRequest) -> Job:
    """The job with its media decoded (on the decoder's pool: base64, files and decoding stay off the loop
    and off the model's thread). The request's own settings are checked before anything is written; its
    files are removed when decoding ends, whatever happened."""
    options = dict(speak=request.speak, voice=worker.backend.check_voice(request.audio.voice) if request.speak
                   else None, max_new_tokens=request.new_tokens(limits), sampling=request.sampling())
    workdir = tempfile.mkdtemp(prefix="omni_serve_")
    try:
      conversation = protocol.conversation(request, protocol.MediaWriter(workdir, limits, media_root), transcripts)
    except BaseException:
      shutil.rmtree(workdir, ignore_errors=True)
      raise
    return Job(decoder.decode(conversation, workdir), options, loop=None, out=None)

  @app.post("/v1/chat/completions")
  async def chat_completions(http: Request):
    body = await http.body()
    request = protocol.parse_request(body, limits)
    if request.model != model_name:
      raise ServeError(404, f"The model {request.model!r} does not exist; this server has {model_name!r}",
                       param="model", code="model_not_found")
    if _has_media(request):
      job = await decoder.run(prepare, request)
    else:  # nothing to decode: no place taken on the decoders, which slow media may hold
      job = await asyncio.to_thread(prepare, request)
    job.loop, job.out = asyncio.get_running_loop(), asyncio.Queue()
    worker.submit(job)
    reply = _Reply(request, model_name)
    try:
      first = await _next(job, http)
    except BaseException:
      job.cancel()
      raise
    if first[0] == "error":
      return error(first[1])
    if request.stream:
      return StreamingResponse(_stream(job, reply, first, transcripts), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _complete(job, reply, first, http, transcripts)

  return app


def _has_media(request: protocol.ChatRequest) -> bool:
  return any(isinstance(m.content, list) and any(p.type != "text" for p in m.content) for m in request.messages)


async def _next(job: Job, http=None, poll: float = 0.5) -> tuple:
  """The job's next item; ("end", None) when the client went away (the job is cancelled)."""
  while True:
    try:
      return await asyncio.wait_for(job.out.get(), timeout=poll)
    except asyncio.TimeoutError:
      if http is not None and await http.is_disconnected():
        job.cancel()
        return ("end", None)


def _remember(transcripts: collections.OrderedDict, audio_id: str, text: str, keep: int = 256) -> None:
  transcripts[audio_id] = text
  while len(transcripts) > keep:
    transcripts.popitem(last=False)


async def _stream(job: Job, reply: _Reply, first: tuple, transcripts):
  """The SSE body; a client that disconnects cancels the generator here, which cancels the job."""
  request, item, done = reply.request, first, None
  try:
    yield reply.chunk({"role": "assistant", "content": None if request.speak else "", "refusal": None})
    while item[0] != "end":
      kind, value = item
      if kind == "error":
        yield _sse(value.body())
        break
      if value.kind == "text" and value.payload:
        delta = ({"audio": {"id": reply.audio_id, "transcript": value.payload}} if request.speak
                 else {"content": value.payload})
        yield reply.chunk(delta)
      elif value.kind == "audio" and request.speak:
        step = int(AUDIO_DELTA_SECONDS * protocol.OUT_SAMPLE_RATE)
        for i in range(0, len(value.payload), step):
          yield reply.chunk({"audio": {"id": reply.audio_id, "data": reply.audio_data(value.payload[i:i + step])}})
      elif value.kind == "done":
        done = value.payload
        if request.speak:
          _remember(transcripts, reply.audio_id, done.text)
          yield reply.chunk({"audio": {"id": reply.audio_id, "expires_at": reply.created + 3600}})
        yield reply.chunk({}, finish=done.finish_reason)
        if request.stream_options and request.stream_options.include_usage:
          yield _sse(protocol.chunk(reply.id, reply.model_name, reply.created, {}, usage_=reply.usage(done),
                                    choices=False))
      item = await _next(job)
    if done is not None:
      yield "data: [DONE]\n\n"
  finally:
    job.cancel()  # no-op after the end; frees the session of a client that left


async def _complete(job: Job, reply: _Reply, first: tuple, http, transcripts):
  from fastapi.responses import JSONResponse  # noqa: PLC0415

  request, item, audio = reply.request, first, []
  while item[0] != "end":
    kind, value = item
    if kind == "error":
      return JSONResponse(value.body(), status_code=value.status)
    if value.kind == "audio":
      audio.append(protocol.pcm16(value.payload))
    elif value.kind == "done":
      done = value.payload
      audio_obj = None
      if request.speak:
        pcm = b"".join(audio)
        data = protocol.wav_bytes(pcm) if reply.format == "wav" else pcm
        audio_obj = {"id": reply.audio_id, "data": base64.b64encode(data).decode("ascii"),
                     "transcript": done.text, "expires_at": reply.created + 3600}
        _remember(transcripts, reply.audio_id, done.text)
      return protocol.completion(reply.id, reply.model_name, reply.created, done.text, done.finish_reason,
                                 reply.usage(done), audio_obj)
    item = await _next(job, http)
  job.cancel()
  return JSONResponse(ServeError(499, "the client closed the request").body(), status_code=499)

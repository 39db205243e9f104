"""The Realtime WebSocket endpoint (omni_jax/serve/realtime.py) through the official `openai` client's realtime
connection and a raw `websockets` client, on the tiny speaking checkpoint (tests/serve_testlib.py).

Spoken questions are eSpeak speech streamed as 40 ms PCM16 chunks. Checked: server turn detection (speech
started / stopped, committed, the reply starts by itself) with transcript and 24 kHz audio deltas; a second turn
with a camera frame; the reply over the socket equal to OmniSession's reply to the same input; barge-in (speech
during a reply cancels it and the conversation goes on); bad events answered with `error` events on a
connection that stays usable; the handshake's key, origin and connection limits; a camera faster than its limit;
a session past its length; a dropped socket that frees its slot. The voice-activity detector on its own, too.
"""

import base64
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import openai  # noqa: E402 - the test and serve extras (run.sh test installs both): never skipped
from websockets.sync.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402

import serve_testlib
from omni_jax.serve import protocol
from omni_jax.serve import realtime
from omni_jax.serve import server
from omni_jax.serve import vad

NAME = "tiny-omni"
NEW = 6  # reply tokens of the short replies
CHUNK = 640  # 40 ms at 16 kHz
LONG = 32  # reply tokens of a reply meant to be interrupted (about 1 s of decoding here)


@pytest.fixture(scope="module")
def model(tiny_speech_checkpoint):
  from omni_jax import generate  # noqa: PLC0415

  return generate.load(tiny_speech_checkpoint)


def _app(model, **realtime_limits):
  limits = protocol.Limits(max_media_bytes=256 << 10, max_prompt_tokens=448, max_new_tokens=64)
  worker = server.Worker(server.Backend(model, limits), limits, max_queue=4, max_batch=2)
  app = server.create_app(worker, limits, model_name=NAME, realtime_limits=realtime.RealtimeLimits(**realtime_limits))
  return app, worker


@pytest.fixture(scope="module")
def srv(model):
  app, worker = _app(model, max_event_bytes=512 << 10)
  s = serve_testlib.LocalServer(app)
  s.worker = worker
  yield s
  s.stop()


@pytest.fixture(scope="module")
def speech():
  """A spoken question at 16 kHz: 0.5 s of silence, the words, 1.2 s of silence (the turn's end)."""
  from data import espeak  # noqa: PLC0415
  from omni_jax.input.media import audio as audio_media  # noqa: PLC0415

  wave, rate = espeak.synthesize("What colour is the sky today?", "en")
  wave = audio_media.resample(wave.astype(np.float32) / 32768.0, rate)
  return np.concatenate([np.zeros(8000, np.float32), 0.8 * wave, np.zeros(19200, np.float32)]), wave.shape[0]


@pytest.fixture(scope="module")
def frame() -> bytes:
  """A camera frame: a small JPEG."""
  import io  # noqa: PLC0415

  import skimage.data  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415

  out = io.BytesIO()
  Image.fromarray(skimage.data.astronaut()).resize((56, 56)).save(out, "JPEG")
  return out.getvalue()


def _b64_pcm(wave: np.ndarray) -> str:
  return base64.b64encode((np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()).decode()


def _chunks(wave: np.ndarray, n: int = CHUNK):
  for i in range(0, wave.shape[0], n):
    yield _b64_pcm(wave[i:i + n])


SESSION_16K = {"type": "realtime", "max_output_tokens": NEW,
               "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}


class Raw:
  """A raw websockets connection that reads JSON events."""

  def __init__(self, url, **kw):
    self.ws = connect(url, open_timeout=30, **kw)
    self.log = []

  def send(self, **event):
    self.ws.send(json.dumps(event))

  def recv(self, timeout=300) -> dict:
    event = json.loads(self.ws.recv(timeout=timeout))
    self.log.append(event)
    return event

  def until(self, type_, timeout=300) -> list:
    """Events up to and including the next one of `type_`."""
    out = []
    deadline = time.time() + timeout
    while True:
      event = self.recv(timeout=max(1, deadline - time.time()))
      out.append(event)
      if event["type"] == type_:
        return out

  def close(self):
    self.ws.close()


def _reply(events) -> dict:
  """What a response's events carry: transcript / text, PCM16 audio bytes, the response.done object."""
  text = "".join(e["delta"] for e in events if e["type"] in ("response.output_audio_transcript.delta",
                                                              "response.output_text.delta"))
  audio = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta")
  done = [e for e in events if e["type"] == "response.done"]
  return {"text": text, "audio": audio, "done": done[-1]["response"] if done else None,
          "types": [e["type"] for e in events]}


# ---------------------------------------------------------------------------------------------------------


def test_turn_detector_finds_the_spoken_turn(speech):
  wave, n = speech
  d = vad.TurnDetector(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500)
  decisions = []
  for i in range(0, wave.shape[0], 512):  # chunks that do not line up with the 30 ms frames
    decisions += d.push(wave[i:i + 512])
  assert [k for k, _ in decisions] == ["start", "stop"], decisions
  start, stop = decisions[0][1], decisions[1][1]
  assert 150 <= start <= 500, start  # speech at 500 ms, minus the padding, plus the onset
  assert 500 + n * 1000 // 16000 - 400 <= stop <= 500 + n * 1000 // 16000 + 100, (stop, n)
  quiet = vad.TurnDetector()
  noise = 0.003 * np.random.default_rng(0).standard_normal(48000).astype(np.float32)
  assert quiet.push(np.zeros(48000, np.float32)) == [] and quiet.push(noise) == []
  with pytest.raises(ValueError, match="threshold"):
    vad.TurnDetector(threshold=1.5)


def test_openai_client_holds_a_spoken_conversation_with_a_camera(srv, speech, frame):
  wave, _ = speech
  client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
  with client.realtime.connect(model=NAME) as conn:
    assert conn.recv().type == "session.created"
    conn.session.update(session=dict(SESSION_16K, output_modalities=["audio"],
                                     audio=dict(SESSION_16K["audio"], output={"voice": "Ethan"})))
    updated = conn.recv()
    assert updated.type == "session.updated" and updated.session.audio.output.voice == "Ethan"
    turns = []
    for turn in range(2):
      if turn == 1:  # the camera shows something before the second question
        conn.send({"type": "input_image_buffer.append", "image": base64.b64encode(frame).decode()})
      for chunk in _chunks(wave):
        conn.input_audio_buffer.append(audio=chunk)
      events = []
      while True:
        event = conn.recv()
        events.append(event)
        if event.type in ("response.done", "error"):
          break
      types = [e.type for e in events]
      assert "error" not in types, events[-1]
      order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
               "input_audio_buffer.committed", "response.created", "response.output_audio_transcript.delta",
               "response.output_audio.delta", "response.done"]
      assert [types.index(t) for t in order] == sorted(types.index(t) for t in order), types
      transcript = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
      audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
      done = events[-1].response
      assert done.status in ("completed", "incomplete") and 1 <= done.usage.output_tokens <= NEW
      assert transcript and done.output[0].content[0].transcript == transcript
      assert len(audio) > 2 * 2400 and len(audio) % 2 == 0  # > 0.1 s of 24 kHz PCM16
      turns.append(done.usage.input_tokens)
    # The second turn's prompt holds the first turn, its reply and the frame's tokens.
    assert turns[1] > 2 * turns[0]


def test_the_reply_over_the_socket_equals_the_in_process_session(srv, model, speech, frame):
  """Without turn detection (audio held until commit), greedy (temperature 0), two turns, the second with a
  camera frame: transcript, audio and token counts equal OmniSession's greedy replies to the same pushes."""
  from omni_jax.input.media import image as image_media  # noqa: PLC0415
  from omni_jax.serve.session import OmniSession  # noqa: PLC0415

  wave, _ = speech
  raw = Raw(srv.ws_url + f"/v1/realtime?model={NAME}")
  raw.until("session.created")
  raw.send(type="session.update", session=dict(SESSION_16K, temperature=0, audio={
      "input": dict(SESSION_16K["audio"]["input"], turn_detection=None)}))
  raw.until("session.updated")
  session = OmniSession(model, max_len=srv.worker.backend.max_len, speech=True)
  for turn in range(2):
    if turn == 1:
      raw.send(type="input_image_buffer.append", image=base64.b64encode(frame).decode())
      session.push_image(image_media.load_image(frame))
    for chunk in _chunks(wave, 1600):
      raw.send(type="input_audio_buffer.append", audio=chunk)
    raw.send(type="input_audio_buffer.commit")
    raw.send(type="response.create")
    socket_reply = _reply(raw.until("response.done"))
    assert "error" not in socket_reply["types"], raw.log[-5:]
    session.push_audio((np.clip(wave, -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32768.0, 16000)
    events = list(session.respond(speak=True, max_new_tokens=NEW, do_sample=False))
    done = events[-1].payload
    audio = b"".join(protocol.pcm16(e.payload) for e in events if e.kind == "audio")
    assert socket_reply["text"] == done.text and socket_reply["audio"] == audio
    assert socket_reply["done"]["usage"]["output_tokens"] == len(done.tokens)
    assert socket_reply["done"]["usage"]["input_tokens"] == done.prompt_tokens
  raw.close()


def test_text_replies_and_typed_items(srv):
  raw = Raw(srv.ws_url + f"/v1/realtime?model={NAME}", subprotocols=["realtime"])
  assert raw.ws.subprotocol == "realtime"
  raw.until("session.created")
  raw.send(type="session.update", session=dict(SESSION_16K, output_modalities=["text"]))
  raw.until("session.updated")
  raw.send(type="conversation.item.create",
           item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello there."}]})
  raw.send(type="response.create")
  reply = _reply(raw.until("response.done"))
  assert "response.output_text.delta" in reply["types"] and "response.output_audio.delta" not in reply["types"]
  assert reply["text"] and reply["done"]["output"][0]["content"][0]["text"] == reply["text"]
  # The DashScope / beta names, as a session option.
  raw.send(type="session.update", session={"event_names": "beta"})
  raw.until("session.updated")
  raw.send(type="conversation.item.create",
           item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "And then?"}]})
  raw.send(type="response.create", response={"output_modalities": ["audio"]})
  reply = _reply(raw.until("response.done"))
  assert "response.audio_transcript.delta" in reply["types"] and "response.audio.delta" in reply["types"]
  assert "response.output_audio.delta" not in reply["types"]
  raw.close()


def _text_turns(raw, n: int) -> list:
  """n typed turns of ~200 tokens, each answered in text: for each, its response.done, or the error codes of a
  turn that failed (the item's and the response's errors, in either order), the last."""
  out = []
  for _ in range(n):
    raw.send(type="conversation.item.create",
             item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "word " * 200}]})
    raw.send(type="response.create")
    while (event := raw.recv())["type"] not in ("response.done", "error"):
      pass
    if event["type"] == "error":
      codes = {event["error"]["code"]}
      try:  # the item's error may even come after the failed response's response.done
        while True:
          event = raw.recv(timeout=3)
          codes |= {event["error"]["code"]} if event["type"] == "error" else set()
      except TimeoutError:
        pass
      out.append(codes)
      return out
    out.append(event)
  return out


def test_a_long_conversation_drops_its_oldest_turns(srv):
  """Three turns of 200 tokens in a 528-slot session: truncation (on by default) drops the oldest, and each
  reply's prompt is at most the context; "disabled" answers the turn that does not fit with an error."""
  raw = Raw(srv.ws_url + f"/v1/realtime?model={NAME}")
  created = raw.until("session.created")[-1]
  assert created["session"]["truncation"] == "auto"
  raw.send(type="session.update", session=dict(SESSION_16K, output_modalities=["text"]))
  raw.until("session.updated")
  done = _text_turns(raw, 3)
  assert all(e["type"] == "response.done" and e["response"]["status"] in ("completed", "incomplete")
             for e in done), done
  prompts = [e["response"]["usage"]["input_tokens"] for e in done]
  # 3 x 200 tokens do not fit 528: the third prompt does not hold all three turns.
  assert prompts[0] < prompts[1] and max(prompts) + NEW <= srv.worker.backend.max_len, prompts
  assert any(b <= a for a, b in zip(prompts, prompts[1:])), f"no turn was dropped: prompts {prompts}"
  raw.close()

  raw = Raw(srv.ws_url + f"/v1/realtime?model={NAME}")
  raw.until("session.created")
  raw.send(type="session.update", session=dict(SESSION_16K, output_modalities=["text"], truncation="disabled"))
  assert raw.until("session.updated")[-1]["session"]["truncation"] == "disabled"
  raw.send(type="session.update", session={"truncation": {"type": "retention_ratio", "retention_ratio": 0}})
  assert raw.until("error")[-1]["error"]["param"] == "session.truncation"
  out = _text_turns(raw, 3)
  assert [e["type"] for e in out[:2]] == ["response.done"] * 2, out
  assert "context_length_exceeded" in out[2], out[2]
  raw.close()


def test_barge_in_cancels_the_reply_and_the_conversation_goes_on(srv, speech):
  wave, _ = speech
  raw = Raw(srv.ws_url + f"/v1/realtime?model={NAME}")
  raw.until("session.created")
  raw.send(type="session.update", session=dict(SESSION_16K, max_output_tokens=LONG))
  raw.until("session.updated")
  for chunk in _chunks(wave):
    raw.send(type="input_audio_buffer.append", audio=chunk)
  raw.until("response.created")
  for chunk in _chunks(wave[:16000]):  # the user speaks again while the reply decodes
    raw.send(type="input_audio_buffer.append", audio=chunk)
  events = raw.until("response.done")
  types = [e["type"] for e in events]
  done = events[-1]["response"]
  assert done["status"] == "cancelled" and done["status_details"]["reason"] == "turn_detected", done
  assert "input_audio_buffer.speech_started" in types
  assert done["usage"]["output_tokens"] < LONG  # what the client was sent: the cache keeps those
  for chunk in _chunks(wave[16000:]):
    raw.send(type="input_audio_buffer.append", audio=chunk)
  reply = _reply(raw.until("response.done"))
  assert reply["done"]["status"] in ("completed", "incomplete") and reply["text"], raw.log[-3:]
  raw.close()
  # Without interrupt_response, speech during a reply waits for its end, then is answered.
  raw = Raw(srv.ws_url + f"/v1/realtime?model={NAME}")
  raw.until("session.created")
  raw.send(type="session.update", session=dict(SESSION_16K, max_output_tokens=LONG, output_modalities=["text"], audio={
      "input": dict(SESSION_16K["audio"]["input"], turn_detection={"type": "server_vad", "interrupt_response": False})}))
  raw.until("session.updated")
  raw.send(type="conversation.item.create",
           item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello."}]})
  raw.send(type="response.create")
  raw.until("response.created")
  for chunk in _chunks(wave):
    raw.send(type="input_audio_buffer.append", audio=chunk)
  first = raw.until("response.done")
  assert first[-1]["response"]["status"] in ("completed", "incomplete")
  second = raw.until("response.done")
  types = [e["type"] for e in first + second]
  assert types.count("input_audio_buffer.committed") == 1 and types.count("response.created") == 1, types
  assert second[-1]["response"]["status"] in ("completed", "incomplete") and _reply(second)["text"]
  raw.close()
  # Cancelling by hand, too.
  raw = _text_reply_started(srv)
  raw.send(type="response.cancel")
  done = raw.until("response.done")[-1]["response"]
  assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
  raw.close()


def test_bad_events_get_errors_and_the_connection_stays_usable(srv):
  raw = Raw(srv.ws_url + f"/v1/realtime?model={NAME}")
  raw.until("session.created")

  def refused(code, **event):
    raw.send(**event)
    e = raw.until("error")[-1]["error"]
    assert e["code"] == code, e
    return e

  raw.ws.send("not json")
  assert raw.until("error")[-1]["error"]["code"] == "invalid_json"
  refused("invalid_event_type", type="input_audio_buffer.push", audio="")
  assert refused("invalid_base64", type="input_audio_buffer.append", audio="%%%not-base64")["param"] == "audio"
  refused("invalid_value", type="input_audio_buffer.append", audio=base64.b64encode(b"\x00\x01\x02").decode())
  e = refused("unsupported_sample_rate", type="session.update",
              session={"audio": {"input": {"format": {"type": "audio/pcm", "rate": 8000}}}})
  assert "8000" in e["message"]
  refused("unknown_voice", type="session.update", session={"audio": {"output": {"voice": "Nobody"}}})
  refused("unknown_parameter", type="session.update", session={"colour": "blue"})
  refused("response_cancel_not_active", type="response.cancel")
  refused("input_missing", type="response.create")
  refused("invalid_value", type="conversation.item.create", item={"type": "message", "role": "assistant",
                                                                  "content": [{"type": "input_text", "text": "x"}]})
  refused("invalid_image", type="input_image_buffer.append", image=base64.b64encode(b"not a jpeg").decode())
  raw.send(type="session.update", session={"output_modalities": ["text"]})
  assert raw.until("session.updated")[-1]["session"]["output_modalities"] == ["text"]
  # A frame over max_event_bytes: an error event, then the server closes (1009).
  raw.send(type="input_audio_buffer.append", audio="A" * (600 << 10))
  assert raw.until("error")[-1]["error"]["code"] == "message_too_large"
  with pytest.raises(ConnectionClosed) as closed:
    raw.recv(timeout=30)
  assert closed.value.rcvd.code == 1009


def _text_reply_started(srv) -> Raw:
  """A connection whose text reply (up to LONG tokens) to "Hello." has just started."""
  raw = Raw(srv.ws_url + f"/v1/realtime?model={NAME}")
  raw.until("session.created")
  raw.send(type="session.update", session={"output_modalities": ["text"], "max_output_tokens": LONG})
  raw.until("session.updated")
  raw.send(type="conversation.item.create",
           item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello."}]})
  raw.send(type="response.create")
  raw.until("response.created")
  return raw


def _stats(url) -> dict:
  with urllib.request.urlopen(url + "/v1/stats", timeout=10) as r:
    return json.load(r)


def test_a_dropped_socket_frees_its_slot_and_session(srv):
  before = _stats(srv.url)
  raw = _text_reply_started(srv)
  raw.ws.socket.close()  # no close frame: the connection just drops
  deadline = time.time() + 60
  while time.time() < deadline:
    s = _stats(srv.url)
    if s["active"] == 0 and s["cancelled"] + s["served"] > before["cancelled"] + before["served"]:
      break
    time.sleep(0.1)
  assert s["active"] == 0 and s["cancelled"] + s["served"] > before["cancelled"] + before["served"], s
  assert all(r is None for e in srv.worker.backend.model._engines.values() for r in e.replies)  # noqa: SLF001


def test_handshake_key_origin_and_limits(model, frame):
  from omni_jax.serve import guard  # noqa: PLC0415

  limits = protocol.Limits(max_prompt_tokens=448, max_new_tokens=64)
  worker = server.Worker(server.Backend(model, limits), limits, max_queue=4, max_batch=2)
  app = server.create_app(worker, limits, model_name=NAME, gate=guard.GateConfig(api_key="sesame"),
                          realtime_limits=realtime.RealtimeLimits(max_connections=1, max_session_seconds=4,
                                                                  max_frames_per_second=1, frame_burst_seconds=1))
  s = serve_testlib.LocalServer(app)
  url = s.ws_url + f"/v1/realtime?model={NAME}"
  try:
    for kw, status in ((dict(), 401), (dict(additional_headers={"Authorization": "Bearer wrong"}), 401),
                       (dict(subprotocols=["realtime", "openai-insecure-api-key.wrong"]), 401),
                       (dict(additional_headers={"Authorization": "Bearer sesame", "Origin": "http://evil.example"}),
                        403)):
      with pytest.raises(InvalidStatus) as refused:
        connect(url, open_timeout=30, **kw)
      assert refused.value.response.status_code == status, kw
    with pytest.raises(InvalidStatus) as refused:
      connect(s.ws_url + "/v1/realtime?model=other", open_timeout=30, additional_headers={"Authorization": "Bearer sesame"})
    assert refused.value.response.status_code == 404
    # The page's files are public (a browser cannot add the key to a navigation); the API is not.
    for path, status in (("/", 200), ("/static/app.js", 200), ("/static/../server.py", 404), ("/v1/models", 401)):
      try:
        with urllib.request.urlopen(s.url + path, timeout=10) as r:
          got = r.status
      except urllib.error.HTTPError as e:
        got = e.code
      assert got == status, path
    # The page's own origin may call the API (with the key); another site may not.
    for origin, status in ((s.url, 200), ("http://evil.example", 403)):
      req = urllib.request.Request(s.url + "/v1/models", headers={"Origin": origin, "Authorization": "Bearer sesame"})
      try:
        with urllib.request.urlopen(req, timeout=10) as r:
          got = r.status
      except urllib.error.HTTPError as e:
        got = e.code
      assert got == status, origin
    # A browser page of the server's own origin, with the key as a subprotocol.
    raw = Raw(url, subprotocols=["realtime", "openai-insecure-api-key.sesame"],
              additional_headers={"Origin": s.url})
    assert raw.ws.subprotocol == "realtime"
    raw.until("session.created")
    with pytest.raises(InvalidStatus) as refused:  # one session at a time here
      connect(url, open_timeout=30, additional_headers={"Authorization": "Bearer sesame"})
    assert refused.value.response.status_code == 429
    image = base64.b64encode(frame).decode()
    raw.send(type="input_image_buffer.append", image=image)
    raw.send(type="input_image_buffer.append", image=image)
    e = raw.until("error")[-1]["error"]
    assert e["code"] == "rate_limit_exceeded" and e["type"] == "rate_limit_error"
    raw.send(type="session.update", session={"output_modalities": ["text"]})
    raw.until("session.updated")
    assert raw.until("error", timeout=30)[-1]["error"]["code"] == "session_expired"
    with pytest.raises(ConnectionClosed) as closed:
      raw.recv(timeout=30)
    assert closed.value.rcvd.code == 1008
    # The slot is free again once the session is over.
    deadline = time.time() + 30
    while True:
      try:
        Raw(url, additional_headers={"Authorization": "Bearer sesame"}).close()
        break
      except InvalidStatus:
        assert time.time() < deadline
        time.sleep(0.2)
  finally:
    s.stop()

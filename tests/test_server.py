"""The OpenAI-compatible server (omni_jax/serve/server.py) through the official `openai` client.

One localhost server (uvicorn in a thread) on a tiny Thinker + Talker + Token2Wav checkpoint with two voices
(tests/serve_testlib.py), shared by every test: streamed text equal to OmniChat's greedy reply, streamed and whole spoken replies (a
24 kHz WAV / PCM whose transcript is that reply), image and audio inputs as data URLs, the request limits and
malformed requests with their statuses, the media root, two concurrent clients, and a dropped stream that
leaves no session behind (/v1/stats).
"""

import base64
import io
import json
import os
import threading
import time
import urllib.error
import urllib.request
import wave

import numpy as np
import pytest
import soundfile

import openai  # noqa: E402 - the test and serve extras (run.sh test installs both): never skipped
import fastapi  # noqa: E402,F401

import serve_testlib  # noqa: E402
from omni_jax.serve import protocol  # noqa: E402
from omni_jax.serve import server  # noqa: E402

NAME = "tiny-omni"
NEW = 6  # max_tokens of the short replies: one decode program for all of them
GREEDY = dict(max_tokens=NEW, temperature=0)


class _Server(serve_testlib.LocalServer):
  def __init__(self, model, media_root):
    self.limits = protocol.Limits(max_media_bytes=256 << 10, max_prompt_tokens=256, max_new_tokens=400)
    self.worker = server.Worker(server.Backend(model, self.limits), self.limits, max_queue=4, max_batch=2)
    super().__init__(server.create_app(self.worker, self.limits, model_name=NAME, media_root=media_root))

  def stats(self) -> dict:
    with urllib.request.urlopen(self.url + "/v1/stats", timeout=10) as r:
      return json.load(r)

  def post_raw(self, body: bytes) -> tuple[int, dict]:
    """A body the openai client would never send (it always sends valid JSON)."""
    req = urllib.request.Request(self.url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, json.load(r)
    except urllib.error.HTTPError as e:
      return e.code, json.load(e)


@pytest.fixture(scope="module")
def model(tiny_speech_checkpoint):
  from omni_jax import generate  # noqa: PLC0415

  return generate.load(tiny_speech_checkpoint)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
  """A media root holding a small image; outside it a secret file and a symlink from inside pointing to it."""
  import skimage.data  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415

  base = tmp_path_factory.mktemp("media")
  root = base / "root"
  root.mkdir()
  Image.fromarray(skimage.data.astronaut()).resize((56, 56)).save(root / "astronaut.png")
  (base / "secret.png").write_bytes((root / "astronaut.png").read_bytes())
  os.symlink(base / "secret.png", root / "link.png")
  t = np.arange(16000) / 16000.0
  soundfile.write(root / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
  return root


@pytest.fixture(scope="module")
def srv(model, media):
  s = _Server(model, str(media))
  yield s
  s.stop()


@pytest.fixture(scope="module")
def client(srv):
  return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _user(*parts):
  return [{"role": "user", "content": list(parts)}]


def _data_url(path, mime) -> str:
  return f"data:{mime};base64," + base64.b64encode(open(path, "rb").read()).decode()


@pytest.fixture(scope="module")
def hello(model):
  """OmniChat's own greedy reply to "Hello there." (what every text path must reproduce)."""
  return model.chat("Hello there.", max_new_tokens=NEW, do_sample=False)


def test_models_and_streamed_text(client, hello):
  assert [m.id for m in client.models.list().data] == [NAME]
  stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello there."}],
                                          stream=True, stream_options={"include_usage": True}, **GREEDY)
  chunks = list(stream)
  pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
  assert len(pieces) >= 2 and "".join(pieces) == hello  # token by token, equal to the non-streamed reply
  assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
  assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
  assert chunks[-1].usage.completion_tokens == NEW and chunks[-1].usage.prompt_tokens > 5
  whole = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello there."}], **GREEDY)
  assert whole.choices[0].message.content == hello and whole.usage.completion_tokens == NEW


def _audio_of(delta) -> dict:
  """delta.audio as a dict (a typed ChoiceDeltaAudio in recent clients, an extra field in older ones)."""
  audio = getattr(delta, "audio", None) or (delta.model_extra or {}).get("audio")
  return audio.model_dump() if hasattr(audio, "model_dump") else audio


@pytest.mark.slow  # the Talker's and Token2Wav's first compiles: ~20 s idle, a minute on a loaded machine
def test_streamed_speech_is_a_24khz_wav_of_the_text(client, hello):
  stream = client.chat.completions.create(
      model=NAME, messages=[{"role": "user", "content": "Hello there."}], stream=True,
      modalities=["text", "audio"], audio={"voice": "Chelsie", "format": "wav"}, **GREEDY)
  audio = [a for c in stream if c.choices and (a := _audio_of(c.choices[0].delta))]
  assert audio and len({a["id"] for a in audio}) == 1
  transcript = "".join(a.get("transcript") or "" for a in audio)
  data = b"".join(base64.b64decode(a["data"]) for a in audio if a.get("data"))
  assert transcript == hello
  with wave.open(io.BytesIO(data)) as w:  # header of unknown length, then the PCM deltas
    assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
  samples = np.frombuffer(data[44:], "<i2")
  assert len([a for a in audio if a.get("data")]) >= 2  # in deltas
  assert samples.size >= 480 and samples.size % 480 == 0 and np.abs(samples).max() > 0  # 480 samples per code
  # Not streamed, pcm16: the same transcript, raw samples; content is null as in OpenAI's audio replies.
  whole = client.chat.completions.create(
      model=NAME, messages=[{"role": "user", "content": "Hello there."}], modalities=["text", "audio"],
      audio={"voice": "Chelsie", "format": "pcm16"}, **GREEDY)
  message = whole.choices[0].message
  assert message.content is None and message.audio.transcript == hello
  pcm = np.frombuffer(base64.b64decode(message.audio.data), "<i2")
  np.testing.assert_array_equal(pcm, samples)  # the same seeded speech either way
  # A later turn may name the reply by its audio id alone (its transcript stands for it).
  again = client.chat.completions.create(
      model=NAME, messages=[{"role": "user", "content": "Hello there."}, {"role": "assistant", "audio": {"id": message.audio.id}},
                            {"role": "user", "content": "And?"}], **GREEDY)
  assert again.choices[0].message.content


def test_image_and_audio_inputs(client, model, media, hello):
  image, tone = str(media / "astronaut.png"), str(media / "tone.wav")
  question = "What is in the picture?"
  reply = client.chat.completions.create(model=NAME, **GREEDY, messages=_user(
      {"type": "image_url", "image_url": {"url": _data_url(image, "image/png")}}, {"type": "text", "text": question}))
  assert reply.choices[0].message.content == model.chat(question, image=image, max_new_tokens=NEW, do_sample=False)
  by_path = client.chat.completions.create(model=NAME, **GREEDY, messages=_user(  # under the media root
      {"type": "image_url", "image_url": {"url": "astronaut.png"}}, {"type": "text", "text": question}))
  assert by_path.choices[0].message.content == reply.choices[0].message.content
  # Audio: OpenAI's bare base64 and a data URL give the reply to the file itself (a file URL inside the media
  # root); the audio
  # reaches the model (the reply differs from the text-only one).
  wav64 = base64.b64encode(open(tone, "rb").read()).decode()
  replies = [client.chat.completions.create(model=NAME, **GREEDY, messages=_user(
      {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}, {"type": "text", "text": "Hello there."}
  )).choices[0].message.content for data in (wav64, "data:audio/wav;base64," + wav64, "file://" + tone)]
  assert replies[0] == replies[1] == replies[2] != hello


def _refused(client, status, code, **kw):
  kw.setdefault("messages", [{"role": "user", "content": "Hi"}])
  kw.setdefault("max_tokens", NEW)
  with pytest.raises(openai.APIStatusError) as e:
    client.chat.completions.create(model=NAME, **kw)
  assert e.value.status_code == status, e.value.body
  assert e.value.body["code"] == code, e.value.body
  assert e.value.body["message"]
  return e.value.body


def test_bad_requests(client, srv, media):
  before = srv.stats()
  status, body = srv.post_raw(b'{"model": "tiny-omni", "messages": [')
  assert status == 400 and body["error"]["code"] == "invalid_json" and "JSON" in body["error"]["message"]
  assert "foo" in _refused(client, 400, "unknown_parameter", extra_body={"foo": 1})["message"]
  big = np.random.default_rng(0).integers(0, 255, 300 << 10, dtype=np.uint8).tobytes()  # over the 256 KiB limit
  body = _refused(client, 413, "media_too_large", messages=_user(
      {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(big).decode()}}))
  assert body["param"] == "messages.0.content.0.image_url"
  body = _refused(client, 400, "invalid_value", messages=_user(
      {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aiff"}}))
  assert body["param"] == "messages.0.content.0.input_audio.format"
  body = _refused(client, 400, "context_length_exceeded", messages=[{"role": "user", "content": "word " * 600}])
  assert int(body["message"].split("the prompt is ")[1].split()[0]) > 600, body  # all of it, not what fitted
  _refused(client, 400, "invalid_value", modalities=["text", "audio"], audio={"voice": "Ethan", "format": "mp3"})
  _refused(client, 400, "unknown_voice", modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
  _refused(client, 400, "invalid_value", max_tokens=0)
  with pytest.raises(openai.BadRequestError, match="exceeds this server's limit"):
    client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=10_000)
  with pytest.raises(openai.NotFoundError, match="does not exist"):
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
  _refused(client, 400, "unsupported_parameter", tools=[{"type": "function", "function": {"name": "f"}}])
  # Paths outside the media root: "..", a symlink out of it, an absolute path elsewhere; remote URLs.
  secret = str(media.parent / "secret.png")
  for url in ("../secret.png", "link.png", secret, "file://" + secret):
    _refused(client, 403, "outside_media_root", messages=_user({"type": "image_url", "image_url": {"url": url}}))
  _refused(client, 400, "unsupported_url",
           messages=_user({"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}))
  body = _refused(client, 400, "invalid_media", messages=_user(  # not an image: the decoder's error, a 400
      {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"nope").decode()}}))
  assert body["param"] == "messages.0.content.0.image_url" and "omni_serve" not in body["message"], body
  after = srv.stats()
  assert after["active"] == after["queued"] == 0 and after["served"] == before["served"]


def test_two_concurrent_clients(client, srv, hello):
  before = srv.stats()
  results = {}

  def ask(key, prompt):
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                            stream=True, **GREEDY)
    results[key] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

  threads = [threading.Thread(target=ask, args=(k, "Hello there.")) for k in ("a", "b")]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=300)
  assert results == {"a": hello, "b": hello}
  assert srv.stats()["served"] == before["served"] + 2


class _Collect(server.Job):
  """A job whose items land in a list (the worker driven directly, without HTTP)."""

  def send(self, kind, item):
    self.items.append((kind, item))


def test_requests_taken_together_decode_in_one_batch(model, hello):
  """Two requests waiting when the worker starts are prefilled one by one and decoded together in the engine's
  slots; each gets its own solo reply, and both slots are freed."""
  limits = protocol.Limits(max_prompt_tokens=256, max_new_tokens=400)
  worker = server.Worker(server.Backend(model, limits), limits, max_queue=4, max_batch=2)
  options = dict(speak=False, voice=None, max_new_tokens=NEW, sampling={"do_sample": False})
  prompts = ["Hello there.", "Tell me a story."]
  jobs = [_Collect([{"role": "user", "content": p}], dict(options), loop=None, out=None) for p in prompts]
  for job in jobs:
    job.items = []
    worker.submit(job)
  worker.start()
  deadline = time.time() + 300
  while not all(j.items and j.items[-1][0] == "end" for j in jobs):
    assert time.time() < deadline, [j.items for j in jobs]
    time.sleep(0.05)
  worker.stop()
  texts = ["".join(e.payload for kind, e in j.items if kind == "event" and e.kind == "text") for j in jobs]
  assert texts == [hello, model.chat(prompts[1], max_new_tokens=NEW, do_sample=False)]
  stats = worker.stats()
  assert (stats["batched"], stats["served"], stats["active"]) == (2, 2, 0)


def test_a_request_joins_replies_already_decoding(model, hello):
  """Continuous batching: a request submitted while a long reply decodes gets its first token and its whole
  (short) reply before the long one ends, both equal to their solo replies, and every slot is freed."""
  limits = protocol.Limits(max_prompt_tokens=256, max_new_tokens=400)
  worker = server.Worker(server.Backend(model, limits), limits, max_queue=4, max_batch=2)
  options = lambda n: dict(speak=False, voice=None, max_new_tokens=n, sampling={"do_sample": False})  # noqa: E731
  long = _Collect([{"role": "user", "content": "Tell me a story."}], options(300), loop=None, out=None)
  short = _Collect([{"role": "user", "content": "Hello there."}], options(NEW), loop=None, out=None)
  long.items, short.items = [], []
  worker.start()
  worker.submit(long)
  deadline = time.time() + 300
  while len(long.items) < 3:  # the long reply is decoding
    assert time.time() < deadline, long.items
    time.sleep(0.01)
  worker.submit(short)
  while not (short.items and short.items[-1][0] == "end"):
    assert time.time() < deadline, short.items
    time.sleep(0.01)
  assert not (long.items and long.items[-1][0] == "end"), "the short request waited for the long reply"
  while not (long.items and long.items[-1][0] == "end"):
    assert time.time() < deadline
    time.sleep(0.05)
  worker.stop()
  text = lambda job: "".join(e.payload for kind, e in job.items if kind == "event" and e.kind == "text")  # noqa: E731
  assert text(short) == hello
  assert text(long) == model.chat("Tell me a story.", max_new_tokens=300, do_sample=False)
  stats = worker.stats()
  assert (stats["served"], stats["active"], stats["batched"]) == (2, 0, 2)


def test_dropped_stream_frees_its_session(client, srv):
  before = srv.stats()
  stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Tell me a story."}],
                                          stream=True, max_tokens=400, temperature=0)
  for i, _ in enumerate(stream):
    if i == 3:
      break
  stream.close()  # the client goes away mid-reply
  deadline = time.time() + 120
  while True:
    s = srv.stats()
    if s["cancelled"] > before["cancelled"] and s["active"] == 0 and s["queued"] == 0:
      break
    assert time.time() < deadline, f"the dropped request still holds a session: {s}"
    time.sleep(0.2)
  assert s["served"] == before["served"]


def test_full_queue_is_429():
  """The bounded queue, without a model: a worker that never starts takes max_queue jobs, then refuses."""

  class _NoModel(server.Backend):
    def __init__(self):
      self.voices, self.default_voice = [], None

  worker = server.Worker(_NoModel(), protocol.Limits(), max_queue=2)
  job = lambda: server.Job([], {}, loop=None, out=None)  # noqa: E731
  worker.submit(job())
  worker.submit(job())
  with pytest.raises(protocol.ServeError) as e:
    worker.submit(job())
  assert e.value.status == 429 and e.value.body()["error"]["type"] == "rate_limit_error"
  stats = worker.stats()
  assert (stats["queued"], stats["rejected"], stats["active"]) == (2, 1, 0)


def test_echoed_assistant_messages_are_accepted(tmp_path):
  """A client that appends a previous response's message (refusal, annotations, audio with data) is served;
  tool calls are refused; consecutive text parts become one (as chat.render joins them)."""
  body = {"model": NAME, "messages": [
      {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
      {"role": "assistant", "content": None, "refusal": None, "annotations": [], "tool_calls": None,
       "audio": {"id": "audio_1", "data": "AAAA", "expires_at": 1, "transcript": "Hi!"}},
      {"role": "assistant", "audio": {"id": "audio_2"}}, {"role": "user", "content": "More."}]}
  request = protocol.parse_request(json.dumps(body).encode(), protocol.Limits())
  media = protocol.MediaWriter(str(tmp_path), protocol.Limits(), None)
  assert protocol.conversation(request, media, {"audio_2": "Hello again."}) == [
      {"role": "user", "content": [{"type": "text", "text": "Hello"}]}, {"role": "assistant", "content": "Hi!"},
      {"role": "assistant", "content": "Hello again."}, {"role": "user", "content": "More."}]
  with pytest.raises(protocol.ServeError, match="unknown or expired audio id"):
    protocol.conversation(request, media, {})
  body["messages"][1]["tool_calls"] = [{"id": "call_1"}]
  with pytest.raises(protocol.ServeError, match="tool calls are not supported"):
    protocol.parse_request(json.dumps(body).encode(), protocol.Limits())


def test_command_line_errors(tmp_path):
  """python -m omni_jax.serve: a missing media root or checkpoint is one error line and exit status 2."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for args, message in ((["--checkpoint", str(tmp_path), "--media_root", str(tmp_path / "nope")],
                         "--media_root"), (["--checkpoint", str(tmp_path / "nope")], "no such checkpoint")):
    out = subprocess.run([sys.executable, "-m", "omni_jax.serve", *args], capture_output=True, text=True,
                         cwd=root, timeout=300)
    assert out.returncode == 2 and message in out.stderr.strip().splitlines()[-1], out.stderr[-2000:]

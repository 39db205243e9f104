"""The server under hostile input: a real `python -m omni_jax.serve` process on localhost, driven the way an
attacker or a broken client would.

One server process (its own TMPDIR, an API key, a 2 s read timeout, a 1 MiB body limit) on the tiny speaking
checkpoint whose LM head favours the padded vocabulary rows (ids the tokenizer cannot decode). Checked:
- media whose headers promise huge decodes (a 4 KB WAV at 1 Hz, a rate of 2^31-1 Hz, 25 minutes of FLAC
  silence, a 10000 x 10000 PNG) are refused with a 400 naming the field, the server's peak memory grows by less
  than 500 MB for each, and a normal request sent meanwhile is answered within seconds;
- refused requests (too many tokens, unknown voice, bad media) leave no files in the server's TMPDIR;
- many sampled replies, streamed concurrently, end normally: no 500, no error event, no broken stream;
- a body over the limit is refused from its Content-Length before it is read, and a chunked one as it streams;
- a half-sent request (headers or body) is closed within the read timeout;
- cross-site requests (text/plain, another Origin, another Host) and requests without the API key are refused;
- the server answers normally at the end and counted no failure.
"""

import base64
import concurrent.futures
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import wave

import numpy as np
import pytest
import soundfile

import serve_testlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key-123"
NAME = "hostile"
READ_TIMEOUT = 2.0
MAX_BODY_MB = 1


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Server:
  """`python -m omni_jax.serve` in a subprocess with its own TMPDIR."""

  def __init__(self, checkpoint: str, tmpdir: str):
    self.port, self.tmpdir = _free_port(), tmpdir
    env = dict(os.environ, TMPDIR=tmpdir, OMNI_JAX_API_KEY=KEY)
    self.log = open(os.path.join(tmpdir, "..", "server.log"), "w")
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "omni_jax.serve", "--checkpoint", checkpoint, "--port", str(self.port),
         "--model_name", NAME, "--max_prompt_tokens", "256", "--max_new_tokens", "64", "--max_batch", "4",
         "--max_queue", "16", "--read_timeout", str(READ_TIMEOUT), "--max_body_mb", str(MAX_BODY_MB)],
        cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
    self.url = f"http://127.0.0.1:{self.port}"
    deadline = time.time() + 300
    while True:
      assert self.proc.poll() is None, self.output()
      try:
        if self.get("/health")[0] == 200:
          break
      except OSError:
        pass
      assert time.time() < deadline, self.output()
      time.sleep(0.5)

  def output(self) -> str:
    self.log.flush()
    with open(self.log.name) as f:
      return f.read()[-4000:]

  def request(self, method: str, path: str, body: bytes = None, headers: dict = None, timeout: float = 120):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    h.update(headers or {})
    h = {k: v for k, v in h.items() if v is not None}
    req = urllib.request.Request(self.url + path, data=body, headers=h, method=method)
    try:
      with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()
    except urllib.error.HTTPError as e:
      return e.code, e.read()

  def get(self, path: str, **kw):
    return self.request("GET", path, **kw)

  def chat(self, messages, **fields):
    body = json.dumps(dict(model=NAME, messages=messages, **fields)).encode()
    status, data = self.request("POST", "/v1/chat/completions", body)
    return status, (json.loads(data) if not fields.get("stream") or status != 200 else data.decode())

  def peak_rss_mb(self) -> float:
    with open(f"/proc/{self.proc.pid}/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")

  def temp_entries(self) -> list:
    return sorted(os.listdir(self.tmpdir))

  def stop(self):
    self.proc.terminate()
    try:
      self.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      self.proc.kill()
    self.log.close()


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
  root = tmp_path_factory.mktemp("hostile")
  checkpoint = serve_testlib.make_checkpoint(str(root / "ckpt"), padded_rows_gain=30.0)
  tmpdir = root / "tmp"
  tmpdir.mkdir()
  server = _Server(checkpoint, str(tmpdir))
  status, reply = server.chat([{"role": "user", "content": "Hello."}], max_tokens=4, temperature=0)
  assert status == 200, reply  # compiles the text programs before anything is timed
  yield server
  server.stop()


def _audio_part(data: bytes, fmt: str) -> dict:
  return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def _image_part(data: bytes) -> dict:
  return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def _wav(rate: int, frames: int) -> bytes:
  buf = io.BytesIO()
  with wave.open(buf, "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes(b"\x00\x00" * frames)
  return buf.getvalue()


def _flac_silence(seconds: int, rate: int = 8000) -> bytes:
  buf = io.BytesIO()
  with soundfile.SoundFile(buf, "w", samplerate=rate, channels=1, format="FLAC") as f:
    block = np.zeros(rate * 60, np.int16)
    for _ in range(seconds // 60):
      f.write(block)
  return buf.getvalue()


def _png(width: int, height: int) -> bytes:
  from PIL import Image  # noqa: PLC0415

  buf = io.BytesIO()
  Image.new("1", (width, height)).save(buf, format="PNG")
  return buf.getvalue()


HOSTILE = {
    "wav at 1 Hz": lambda: _audio_part(_wav(1, 2000), "wav"),
    "wav at 2^31-1 Hz": lambda: _audio_part(_wav(2 ** 31 - 1, 2000), "wav"),
    "25 min of flac silence": lambda: _audio_part(_flac_silence(25 * 60), "flac"),
    "10000 x 10000 png": lambda: _image_part(_png(10000, 10000)),
}


def _timed_normal_request(srv) -> float:
  start = time.perf_counter()
  status, reply = srv.chat([{"role": "user", "content": "Hello."}], max_tokens=4, temperature=0)
  assert status == 200, reply
  return time.perf_counter() - start


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_media_is_refused_cheaply(srv, case):
  part = HOSTILE[case]()
  assert len(json.dumps(part)) < (MAX_BODY_MB << 20), "the hostile file must fit the body limit"
  peak = srv.peak_rss_mb()
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    hostile = pool.submit(srv.chat, [{"role": "user", "content": [part, {"type": "text", "text": "What?"}]}],
                          max_tokens=4)
    normal_seconds = _timed_normal_request(srv)
    status, reply = hostile.result(timeout=120)
  assert status == 400, reply
  error = reply["error"]
  assert error["code"] == "invalid_media" and error["param"].startswith("messages.0.content.0"), error
  assert "/tmp" not in error["message"] and "omni_serve" not in error["message"], error
  assert srv.peak_rss_mb() - peak < 500, f"{case}: peak RSS {peak:.0f} -> {srv.peak_rss_mb():.0f} MB"
  assert normal_seconds < 10, f"a normal request took {normal_seconds:.1f} s beside {case}"


def test_refused_requests_leave_no_files(srv):
  audio = _audio_part(_wav(16000, 16000), "wav")
  before = srv.temp_entries()
  refusals = [
      (dict(max_tokens=10_000), 400),  # over --max_new_tokens
      (dict(modalities=["text", "audio"], audio={"voice": "Nobody", "format": "wav"}), 400),  # unknown voice
  ]
  for fields, status in refusals * 5:
    got, reply = srv.chat([{"role": "user", "content": [audio, {"type": "text", "text": "Hi"}]}], **fields)
    assert got == status, reply
  for _ in range(5):
    got, reply = srv.chat([{"role": "user", "content": [_audio_part(b"RIFF not really", "wav")]}], max_tokens=4)
    assert got == 400 and reply["error"]["code"] == "invalid_media", reply
  got, reply = srv.chat([{"role": "user", "content": [audio, {"type": "text", "text": "Hi"}]}], max_tokens=2)
  assert got == 200, reply
  assert srv.temp_entries() == before


def _stream(srv, seed: int) -> tuple:
  body = json.dumps(dict(model=NAME, messages=[{"role": "user", "content": "Tell me something."}], stream=True,
                         max_tokens=32, temperature=1.0, seed=seed)).encode()
  status, data = srv.request("POST", "/v1/chat/completions", body, timeout=600)  # queued behind a compile
  return status, data.decode()


def test_sampled_streams_never_break(srv):
  """The LM head favours ids the tokenizer lacks: decoding must never emit them, and no stream may break."""
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    results = list(pool.map(lambda s: _stream(srv, s), range(8)))
  for status, body in results:
    assert status == 200, body
    events = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", body[-500:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), body[-500:]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length"), chunks[-1]


def _raw(srv, data: bytes, wait: float) -> bytes:
  """Send raw bytes, read until the server closes the connection (or `wait` seconds pass)."""
  with socket.create_connection(("127.0.0.1", srv.port), timeout=wait) as s:
    s.sendall(data)
    out = b""
    try:
      while True:
        piece = s.recv(65536)
        if not piece:
          return out
        out += piece
    except socket.timeout:
      return out + b"<still open>"


def _head(path: str, headers: dict) -> bytes:
  lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in headers.items()]
  return ("\r\n".join(lines) + "\r\n\r\n").encode()


AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def test_oversize_body_is_refused_before_it_is_read(srv):
  start = time.perf_counter()
  out = _raw(srv, _head("/v1/chat/completions", dict(AUTH, **{"Content-Length": str(1 << 30)})), wait=10)
  assert out.startswith(b"HTTP/1.1 413") and b"request_too_large" in out, out[:300]
  assert time.perf_counter() - start < 5
  chunk = b"x" * 65536
  chunked = _head("/v1/chat/completions", dict(AUTH, **{"Transfer-Encoding": "chunked"}))
  chunked += b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range((MAX_BODY_MB << 20) // len(chunk) + 2))
  out = _raw(srv, chunked, wait=10)
  assert out.startswith(b"HTTP/1.1 413"), out[:300]


def test_half_sent_requests_are_closed(srv):
  start = time.perf_counter()
  out = _raw(srv, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n", wait=READ_TIMEOUT + 8)
  assert b"<still open>" not in out and time.perf_counter() - start < READ_TIMEOUT + 5, out
  start = time.perf_counter()
  out = _raw(srv, _head("/v1/chat/completions", dict(AUTH, **{"Content-Length": "100"})) + b'{"model": ',
             wait=READ_TIMEOUT + 8)
  assert out.startswith(b"HTTP/1.1 408") and time.perf_counter() - start < READ_TIMEOUT + 5, out[:300]


def test_cross_site_and_unauthenticated_requests_are_refused(srv):
  body = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()
  post = lambda **h: srv.request("POST", "/v1/chat/completions", body, headers=h)  # noqa: E731
  status, data = post(**{"Content-Type": "text/plain", "Origin": "http://evil.example", "Host": "evil.example"})
  assert status in (400, 403, 415), data
  assert post(**{"Content-Type": "text/plain"})[0] == 415
  assert post(Origin="http://evil.example")[0] == 403
  assert post(Host="evil.example")[0] == 400
  assert post(Host="evil.example:8000")[0] == 400
  assert post(Authorization=None)[0] == 401
  assert post(Authorization="Bearer wrong")[0] == 401
  for path in ("/v1/models", "/v1/stats", "/health"):
    assert srv.get(path, headers={"Authorization": None})[0] == 401
    assert srv.get(path)[0] == 200
  preflight = srv.request("OPTIONS", "/v1/chat/completions", headers={
      "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
  assert preflight[0] == 403


def test_the_server_still_answers_and_counted_no_failure(srv):
  status, reply = srv.chat([{"role": "user", "content": "Hello."}], max_tokens=4, temperature=0)
  assert status == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length"), reply
  deadline = time.time() + 30
  while True:  # the worker frees a session just after its last event went out
    stats = json.loads(srv.get("/v1/stats")[1])
    if stats["active"] == 0 or time.time() > deadline:
      break
    time.sleep(0.2)
  assert stats["failed"] == 0 and stats["active"] == 0, stats
  assert srv.proc.poll() is None


# ---------------------------------------------------------------------------------------------------------
# Without a server: the request's types and ranges, and the gate's CORS for an allowed origin.


@pytest.mark.parametrize("fields, param", [
    (dict(max_tokens="8"), "max_tokens"), (dict(seed=2 ** 64), "seed"), (dict(seed=-2 ** 63 - 1), "seed"),
    (dict(top_k=2 ** 40), "top_k"), (dict(stream=1), "stream"), (dict(temperature="0.5"), "temperature"),
])
def test_request_types_are_strict_and_integers_bounded(fields, param):
  from omni_jax.serve import protocol  # noqa: PLC0415

  body = json.dumps(dict(model=NAME, messages=[{"role": "user", "content": "Hi"}], **fields)).encode()
  with pytest.raises(protocol.ServeError) as e:
    protocol.parse_request(body, protocol.Limits())
  assert e.value.status == 400 and e.value.param == param, e.value.body()
  ok = protocol.parse_request(json.dumps(dict(model=NAME, messages=[{"role": "user", "content": "Hi"}],
                                              seed=2 ** 63 - 1, max_tokens=8, temperature=1)).encode(),
                              protocol.Limits())
  assert (ok.seed, ok.max_tokens, ok.temperature) == (2 ** 63 - 1, 8, 1.0)


def test_nul_in_a_media_path_is_a_400(tmp_path):
  from omni_jax.serve import protocol  # noqa: PLC0415

  media = protocol.MediaWriter(str(tmp_path), protocol.Limits(), str(tmp_path))
  with pytest.raises(protocol.ServeError) as e:
    media.url("a\x00.png", "image", "messages.0.content.0.image_url")
  assert e.value.status == 400 and e.value.code == "invalid_media"


def test_gate_allows_listed_origins_with_cors_headers():
  from starlette.applications import Starlette  # noqa: PLC0415
  from starlette.responses import JSONResponse  # noqa: PLC0415
  from starlette.routing import Route  # noqa: PLC0415
  from starlette.testclient import TestClient  # noqa: PLC0415

  from omni_jax.serve import guard  # noqa: PLC0415

  async def echo(request):
    return JSONResponse({"n": len(await request.body())})

  app = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
  config = guard.GateConfig(allowed_hosts=("testserver",), cors_origins=("https://app.example",))
  client = TestClient(guard.Gate(app, config, max_body_bytes=100))
  ok = client.post("/echo", json={"a": 1}, headers={"Origin": "https://app.example"})
  assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
  assert client.post("/echo", json={"a": 1}, headers={"Origin": "https://other.example"}).status_code == 403
  pre = client.options("/echo", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
  assert pre.status_code == 204 and "POST" in pre.headers["access-control-allow-methods"]
  assert client.post("/echo", content=b"x" * 101, headers={"Content-Type": "application/json"}).status_code == 413
  assert client.post("/echo", json={"a": 1}).status_code == 200  # no Origin: not a browser's cross-site request

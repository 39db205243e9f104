"""The realtime page (omni_jax/serve/static) in a real browser: headless Chromium driven by selenium.

  .venv/bin/python -m pytest -q tests/test_realtime_page.py

A localhost server (uvicorn in a thread: serve_testlib.LocalServer) on the tiny speaking checkpoint serves the
page and /v1/realtime; one spoken turn over a plain WebSocket warms its programs first. Chromium's fake devices
stand in for the user: the microphone plays an eSpeak NG sentence followed by silence (Chrome loops the file),
the camera is Chrome's test pattern. The page connects on its own;
the test waits until one turn went the whole way (the server's VAD ended it, a reply came back as transcript and
audio deltas, and the page played that audio), then checks the latency figures on screen, a screenshot and the
browser's console (no JS errors). The tiny model's words and audio are random: what arrives is tested, not what
it says.

Needs /usr/bin/chromium, /usr/bin/chromedriver (Debian's chromium, chromium-driver: run.sh test installs them)
and selenium (the test extra). Without them the test fails in CI (CI=true) and is skipped elsewhere.
"""

import io
import json
import os
import time

import numpy as np
import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
NAME = "tiny-omni"
REPLY_TOKENS = 16  # the page's ?max_output_tokens=: short replies keep the test's turns quick
WAIT_S = 120  # for the first complete turn
SENTENCE = "Hello there. What do you see on my camera today?"


def _missing(reason: str):
  if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
    pytest.fail(f"{reason}: CI must run the browser test (run.sh test installs chromium, chromium-driver and "
                "the test extra)", pytrace=False)
  pytest.skip(reason)


def _selenium():
  """selenium's webdriver module, after checking that the browser and its driver are installed."""
  for path in (CHROMIUM, CHROMEDRIVER):
    if not os.access(path, os.X_OK):
      _missing(f"{path} is missing (apt-get install chromium chromium-driver)")
  try:
    from selenium import webdriver  # noqa: PLC0415
  except ImportError as e:
    _missing(f"selenium is not importable ({e}; pip install -e '.[test]')")
  return webdriver


@pytest.fixture(scope="module")
def srv(tiny_speech_checkpoint):
  import serve_testlib  # noqa: PLC0415

  from omni_jax.generate import api  # noqa: PLC0415
  from omni_jax.serve import protocol  # noqa: PLC0415
  from omni_jax.serve import server  # noqa: PLC0415

  model = api.load(tiny_speech_checkpoint)
  # Room for several turns of history (each ~3 s of speech, a camera frame and a short reply).
  limits = protocol.Limits(max_media_bytes=256 << 10, max_prompt_tokens=1024, max_new_tokens=64)
  worker = server.Worker(server.Backend(model, limits), limits, max_queue=4, max_batch=1)
  local = serve_testlib.LocalServer(server.create_app(worker, limits, model_name=NAME))
  yield local.url
  local.stop()


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> str:
  """The fake microphone's file: 1 s of silence (the page connects meanwhile), a spoken sentence, then 12 s of
  silence, so the server's VAD (500 ms) ends the turn and the reply (the first one compiles the model's programs)
  has time to play before Chrome loops the file and the user "speaks" again (which would interrupt it: barge-in).
  """
  import scipy.signal  # noqa: PLC0415
  import soundfile  # noqa: PLC0415

  from data import espeak  # noqa: PLC0415

  speech, rate = espeak.synthesize(SENTENCE, "en")
  assert len(speech) > rate, "eSpeak NG made less than a second of speech"
  speech = scipy.signal.resample_poly(speech.astype(np.float32) / 32768.0, 48000, rate)  # Chrome's capture rate
  wave = np.concatenate([np.zeros(48000), 0.8 * speech / max(1e-6, np.abs(speech).max()), np.zeros(12 * 48000)])
  path = str(tmp_path_factory.mktemp("fake_mic") / "speech.wav")
  soundfile.write(path, wave.astype(np.float32), 48000, subtype="PCM_16")
  return path


def _warm_up(srv: str, wav: str) -> None:
  """One spoken turn with a camera frame through /v1/realtime, shaped as the page sends them, before the browser
  starts: the server compiles its programs now rather than while the page streams in real time (a server far
  behind answers the backlog's turns late, and each reply is cut off by the next turn: barge-in)."""
  import base64  # noqa: PLC0415

  import scipy.signal  # noqa: PLC0415
  import skimage.data  # noqa: PLC0415
  import soundfile  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415
  from websockets.sync.client import connect  # noqa: PLC0415

  wave, rate = soundfile.read(wav, dtype="float32")
  wave = scipy.signal.resample_poly(wave[:rate * 6], 1, rate // 24000)  # the sentence and 1.5+ s of silence
  frame = io.BytesIO()
  Image.fromarray(skimage.data.astronaut()).resize((448, 336)).save(frame, "JPEG")  # the page's frame size
  with connect(srv.replace("http", "ws") + f"/v1/realtime?model={NAME}", open_timeout=30) as ws:
    ws.send(json.dumps({"type": "session.update", "session": {"max_output_tokens": REPLY_TOKENS}}))
    ws.send(json.dumps({"type": "input_image_buffer.append", "image": base64.b64encode(frame.getvalue()).decode()}))
    pcm = (np.clip(wave, -1, 1) * 32767).astype("<i2")
    for i in range(0, pcm.shape[0], 960):  # 40 ms chunks at 24 kHz
      ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i:i + 960]).decode()}))
    deadline = time.time() + 300
    while (event := json.loads(ws.recv(timeout=max(1, deadline - time.time()))))["type"] != "response.done":
      assert event["type"] != "error", event


def _chromium(webdriver, wav: str):
  from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
               "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
               f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required"):
    options.add_argument(flag)
  options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _stats(driver) -> dict:
  return driver.execute_script("return window.omniStats ? JSON.parse(JSON.stringify(window.omniStats)) : null;")


def _done_turn(stats):
  """The first turn that went the whole way: finished (completed, or incomplete: the reply budget), with a
  transcript, audio received and played."""
  if not stats or not stats["sessionCreated"] or stats["playedSamples"] <= 0:
    return None
  for turn in stats["turns"]:
    finished = turn["status"] in ("completed", "incomplete")
    if finished and turn["text"] and turn["audioDeltas"] > 0 and turn["playedSamples"] > 0:
      return turn
  return None


def _js_errors(logs) -> list:
  return [entry for entry in logs if entry.get("level") == "SEVERE"]


def test_page_talks_with_the_server(request, tmp_path):
  webdriver = _selenium()  # first: without a browser no model is loaded
  srv, wav = request.getfixturevalue("srv"), request.getfixturevalue("speech_wav")
  _warm_up(srv, wav)
  browser = _chromium(webdriver, wav)
  try:
    _talk(browser, srv, tmp_path)
  finally:
    browser.quit()


def _talk(browser, srv, tmp_path):
  browser.set_page_load_timeout(30)
  browser.get(f"{srv}/?max_output_tokens={REPLY_TOKENS}")
  logs, stats, turn = [], None, None
  deadline = time.time() + WAIT_S
  while time.time() < deadline:
    stats = _stats(browser)
    logs += browser.get_log("browser")
    if (turn := _done_turn(stats)) is not None or _js_errors(logs) or (stats and stats["lastError"]):
      break
    time.sleep(0.5)
  shot = tmp_path / "realtime_page.png"
  browser.save_screenshot(str(shot))
  logs += browser.get_log("browser")
  state = "null" if stats is None else (json.dumps({k: v for k, v in stats.items() if k != "eventLog"})[:3000]
                                         + "\nevent log (page ms): " + json.dumps(stats["eventLog"]))
  assert not _js_errors(logs), f"JS errors in the console: {_js_errors(logs)}\nomniStats: {state}"
  assert stats is not None, "the page never set window.omniStats"
  assert stats["lastError"] is None, f"the page shows an error: {stats['lastError']}\nomniStats: {state}"
  assert turn is not None, f"no complete turn within {WAIT_S} s\nomniStats: {state}"

  # The page's own side of the session: connected, the microphone and camera streamed to the server.
  assert stats["connected"] and stats["sessionCreated"] and stats["model"] == NAME
  assert stats["audioChunksSent"] > 25, stats["audioChunksSent"]  # > 1 s of 40 ms chunks
  assert stats["imagesSent"] >= 1, "the camera sent no frame"
  # The turn: the server's VAD measured the speech, the reply's text and audio came and were played.
  assert turn["speechMs"] is not None and 500 < turn["speechMs"] < 8000, turn
  assert turn["text"] in stats["transcript"] and stats["audioDeltas"] >= turn["audioDeltas"] > 0
  assert 0 < turn["playedSamples"] <= turn["audioSamples"], turn
  # Latency from the end-of-turn decision, on screen as in omniStats.
  assert 0 < turn["firstTextMs"] < WAIT_S * 1000 and 0 < turn["firstAudioMs"] < WAIT_S * 1000, turn
  assert stats["firstTextMs"] is not None and stats["firstAudioMs"] is not None
  row = browser.find_elements("css selector", "#latency tr")[turn["n"] - 1]
  cells = [td.text for td in row.find_elements("css selector", "td")]
  # (JavaScript rounds halves up, Python to even.)
  assert abs(int(cells[2]) - turn["firstTextMs"]) <= 1 and abs(int(cells[3]) - turn["firstAudioMs"]) <= 1, cells
  assert turn["text"] in browser.execute_script("return document.getElementById('log').textContent")  # as sent

  from PIL import Image  # noqa: PLC0415

  data = shot.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, len(data)
  image = Image.open(io.BytesIO(data)).convert("RGB")
  colors = image.getcolors(4096)  # None: more than 4096
  assert image.size[0] >= 800 and (colors is None or len(colors) > 20), "the screenshot is not a rendered page"

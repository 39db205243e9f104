"""End-to-end latency of a spoken turn through the Realtime WebSocket (/v1/realtime): a client streams a spoken
question in real time and times the reply's first audio delta, against the same turn run by OmniSession in the
same process on the same model.

  .venv/bin/python bench/bench_realtime.py [--size tiny|100m] [--chunk_ms 40] [--reply 16] [--iters 3]
  .venv/bin/python bench/bench_realtime.py --checkpoint DIR      # any speaking checkpoint (e.g. 7B-shaped on a GPU)

The model: bench_stream.py's full Qwen2.5-Omni of --size (the real vocabulary, random perturbed weights, a
voice), served by server.create_app on localhost (uvicorn, the worker's engine). The question: eSpeak speech
(about 2 s), then silence, sent as base64 PCM16 at 16 kHz in --chunk_ms chunks paced at real time, as a
microphone would; server turn detection (server_vad, silence_duration_ms --silence_ms) ends the turn and the
reply starts by itself. Clocks, on the client: end of speech (the last voiced chunk sent), the VAD's decision
(speech_stopped received), the first transcript delta and the first audio delta. A reply is at most --reply
tokens and --codes speech codes.

In process: OmniSession is pushed the same samples in the same chunks (2 s are prefilled as they arrive), and
respond(speak=True) is timed from the end of its input to the first text and audio events. The ratio socket /
in process compares the VAD's decision -> first audio over the socket with end of input -> first audio in process
(1.0: the socket, JSON and base64 add nothing). Medians of --iters turns after a warm-up turn (compiles
excluded). Figures: docs/serving.md ("Realtime latency").
"""

import argparse
import base64
import json
import time

import numpy as np

import common  # noqa: F401  pylint: disable=unused-import  (puts the repository and tests/ on sys.path)

RATE = 16000


def question() -> tuple[np.ndarray, int]:
  """(16 kHz speech with 0.3 s of silence before it, the sample where the speech ends)."""
  from data import espeak  # noqa: PLC0415
  from omni_jax.input.media import audio as audio_media  # noqa: PLC0415

  wave, rate = espeak.synthesize("What is the weather like in Paris today?", "en")
  wave = audio_media.resample(wave.astype(np.float32) / 32768.0, rate)
  voiced = np.flatnonzero(np.abs(wave) > 0.01)
  wave = wave[:voiced[-1] + 1] * 0.8
  lead = np.zeros(int(0.3 * RATE), np.float32)
  return np.concatenate([lead, wave]), lead.shape[0] + wave.shape[0]


def socket_turn(url: str, model_name: str, wave: np.ndarray, end: int, chunk: int, silence_ms: int,
                reply: int) -> dict:
  from websockets.sync.client import connect  # noqa: PLC0415

  tail = np.zeros(int((silence_ms + 1500) * RATE / 1000), np.float32)  # enough silence for the VAD to decide
  audio = np.concatenate([wave, tail])
  pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
  times: dict = {}
  with connect(f"{url}/v1/realtime?model={model_name}", open_timeout=60, max_size=None) as ws:
    assert json.loads(ws.recv())["type"] == "session.created"
    ws.send(json.dumps({"type": "session.update", "session": {
        "type": "realtime", "output_modalities": ["audio"], "max_output_tokens": reply,
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE},
                            "turn_detection": {"type": "server_vad", "silence_duration_ms": silence_ms}}}}}))
    t0 = time.perf_counter()
    for i in range(0, audio.shape[0], chunk):  # paced at real time: chunk i goes out when it has been "recorded"
      due = t0 + (i + chunk) / RATE
      time.sleep(max(0.0, due - time.perf_counter()))
      ws.send(json.dumps({"type": "input_audio_buffer.append",
                          "audio": base64.b64encode(pcm[2 * i:2 * (i + chunk)]).decode()}))
      if i < end <= i + chunk:
        times["end"] = time.perf_counter()
      while True:  # read what has arrived without waiting
        try:
          event = json.loads(ws.recv(timeout=0))
        except TimeoutError:
          break
        _note(event, times)
      if "audio" in times:
        break
    while "done" not in times:
      _note(json.loads(ws.recv(timeout=600)), times)
  return times


def _note(event: dict, times: dict) -> None:
  kind = {"input_audio_buffer.speech_stopped": "vad", "response.output_audio_transcript.delta": "text",
          "response.output_audio.delta": "audio", "response.done": "done", "error": "error"}.get(event["type"])
  if kind == "error":
    raise RuntimeError(f"the server sent an error: {event['error']}")
  if kind is not None:
    times.setdefault(kind, time.perf_counter())


def session_turn(model, max_len: int, wave: np.ndarray, chunk: int, reply: int) -> dict:
  from omni_jax.serve.session import OmniSession  # noqa: PLC0415

  session = OmniSession(model, max_len=max_len, speech=True)
  quantised = (np.clip(wave, -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32768.0
  for i in range(0, wave.shape[0], chunk):
    session.push_audio(quantised[i:i + chunk], RATE)
  times = {"end": time.perf_counter()}
  for event in session.respond(speak=True, max_new_tokens=reply):
    times.setdefault(event.kind, time.perf_counter())
  session.close()
  return times


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", default="tiny", help="bench_stream.py's model sizes: tiny, 100m")
  p.add_argument("--checkpoint", default=None, help="a speaking checkpoint to serve instead of --size")
  p.add_argument("--chunk_ms", type=int, default=40, help="audio per append event (20-100 ms)")
  p.add_argument("--silence_ms", type=int, default=500, help="the VAD's silence_duration_ms")
  p.add_argument("--reply", type=int, default=16, help="reply tokens (max_output_tokens)")
  p.add_argument("--codes", type=int, default=96, help="most speech codes of a reply (random weights rarely stop)")
  p.add_argument("--iters", type=int, default=3)
  args = p.parse_args()
  import bench_stream  # noqa: PLC0415 - the model builder
  import jax  # noqa: PLC0415
  import serve_testlib  # noqa: PLC0415 - uvicorn in a thread

  from omni_jax import generate  # noqa: PLC0415
  from omni_jax.serve import protocol  # noqa: PLC0415
  from omni_jax.serve import server  # noqa: PLC0415

  directory = args.checkpoint or bench_stream.build_reference(args.size)[1]
  model = generate.load(directory)
  model.speech.defaults["max_new_tokens"] = args.codes  # the sessions' code budget (config.generate.talker)
  name = args.size if args.checkpoint is None else "model"
  limits = protocol.Limits(max_prompt_tokens=512, max_new_tokens=max(64, args.reply))
  worker = server.Worker(server.Backend(model, limits), limits, max_queue=4, max_batch=2)
  srv = serve_testlib.LocalServer(server.create_app(worker, limits, model_name=name))
  wave, end = question()
  chunk = args.chunk_ms * RATE // 1000
  sock, local = [], []
  try:
    for i in range(args.iters + 1):  # turn 0 compiles
      s = socket_turn(srv.ws_url, name, wave, end, chunk, args.silence_ms, args.reply)
      o = session_turn(model, worker.backend.max_len, wave, chunk, args.reply)
      if i:
        sock.append(s)
        local.append(o)
  finally:
    srv.stop()
  med = lambda rows, a, b: float(np.median([r[b] - r[a] for r in rows])) * 1e3  # noqa: E731
  vad_audio, local_audio = med(sock, "vad", "audio"), med(local, "end", "audio")
  print(f"{args.checkpoint or 'size ' + args.size}, {wave.shape[0] / RATE:.1f} s question in {args.chunk_ms} ms chunks, {args.reply} tokens, "
        f"{jax.devices()[0].device_kind}, medians of {args.iters}:\n"
        f"  socket: end of speech -> VAD decision {med(sock, 'end', 'vad'):.0f} ms (silence_duration_ms "
        f"{args.silence_ms}), -> first text {med(sock, 'end', 'text'):.0f} ms, -> first audio "
        f"{med(sock, 'end', 'audio'):.0f} ms; VAD decision -> first text {med(sock, 'vad', 'text'):.0f} ms, -> first "
        f"audio {vad_audio:.0f} ms\n"
        f"  in process: end of input -> first text {med(local, 'end', 'text'):.0f} ms, -> first audio "
        f"{local_audio:.0f} ms\n"
        f"  socket / in process (VAD decision vs end of input -> first audio): {vad_audio / local_audio:.2f}",
        flush=True)


if __name__ == "__main__":
  main()

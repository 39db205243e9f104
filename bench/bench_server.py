"""What the HTTP server adds to a reply: time to the first streamed text, to the first audio delta and to the
end, through `python -m omni_jax.serve`'s app (uvicorn on localhost, the official openai client, SSE) against
the same turn run by OmniSession in the same process, on the same model.

  .venv/bin/python bench/bench_server.py [--checkpoint PATH] [--reply 16] [--iters 5]

Default model: the tests' tiny speaking checkpoint (tests/serve_testlib.py: tiny Thinker + Talker + Token2Wav,
Griffin-Lim voice). Both sides decode `--reply` tokens greedily for a short text prompt (the server's clock
starts before the request is sent, the session's before push_message); spoken: the same with modalities text +
audio. Medians of --iters runs after a warm-up (compilation excluded), interleaved; the ratio is server /
session (1.0: no overhead). Figures: docs/performance.md ("Server overhead").
"""

import argparse
import statistics
import tempfile
import threading
import time

import common  # noqa: F401  pylint: disable=unused-import  (puts the repository and tests/ on sys.path)


def _session_turn(model, prompt, reply, speak):
  from omni_jax.serve.session import OmniSession  # noqa: PLC0415

  t0 = time.perf_counter()
  session = OmniSession(model, max_len=512 + reply + 16)
  session.push_message({"role": "user", "content": prompt})
  first = {}
  for event in session.respond(speak=speak, max_new_tokens=reply, do_sample=False):
    first.setdefault(event.kind, time.perf_counter() - t0)
  session.close()
  return first.get("text"), first.get("audio"), time.perf_counter() - t0


def _server_turn(client, name, prompt, reply, speak):
  extra = dict(modalities=["text", "audio"], audio={"voice": "Chelsie", "format": "pcm16"}) if speak else {}
  t0 = time.perf_counter()
  stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}], stream=True,
                                          max_tokens=reply, temperature=0, **extra)
  first_text = first_audio = None
  for chunk in stream:
    if not chunk.choices:
      continue
    delta = chunk.choices[0].delta
    audio = getattr(delta, "audio", None)
    audio = audio.model_dump() if hasattr(audio, "model_dump") else audio
    if first_text is None and (delta.content or (audio and audio.get("transcript"))):
      first_text = time.perf_counter() - t0
    if first_audio is None and audio and audio.get("data"):
      first_audio = time.perf_counter() - t0
  return first_text, first_audio, time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", default=None)
  parser.add_argument("--reply", type=int, default=16)
  parser.add_argument("--iters", type=int, default=5)
  args = parser.parse_args()

  import openai  # noqa: PLC0415
  import uvicorn  # noqa: PLC0415

  import serve_testlib  # noqa: PLC0415
  from omni_jax import generate  # noqa: PLC0415
  from omni_jax.serve import protocol  # noqa: PLC0415
  from omni_jax.serve import server  # noqa: PLC0415

  path = args.checkpoint or serve_testlib.make_checkpoint(tempfile.mkdtemp())
  model = generate.load(path)
  limits = protocol.Limits(max_prompt_tokens=512, max_new_tokens=args.reply)
  worker = server.Worker(server.engine_for(model, limits), limits)
  app = server.create_app(worker, limits, model_name="bench")
  srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
  thread = threading.Thread(target=srv.run, daemon=True)
  thread.start()
  while not srv.started:
    time.sleep(0.05)
  port = srv.servers[0].sockets[0].getsockname()[1]
  client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)

  prompt = "Hello there, how are you today?"
  for speak in (False, True):
    runs = {"server": [], "session": []}
    for i in range(args.iters + 1):  # the first round compiles
      s = _server_turn(client, "bench", prompt, args.reply, speak)
      o = _session_turn(model, prompt, args.reply, speak)
      if i:
        runs["server"].append(s)
        runs["session"].append(o)
    label = "text+audio" if speak else "text"
    for k, name in enumerate(("first text", "first audio", "end")):
      if k == 1 and not speak:
        continue
      a = statistics.median(r[k] for r in runs["server"])
      b = statistics.median(r[k] for r in runs["session"])
      print(f"{label:10s} {name:11s}: server {a * 1e3:8.1f} ms  session {b * 1e3:8.1f} ms  "
            f"ratio {a / b:5.2f}  (+{(a - b) * 1e3:.1f} ms)")
  srv.should_exit = True
  thread.join(timeout=30)


if __name__ == "__main__":
  main()

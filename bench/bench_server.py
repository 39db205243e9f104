"""What the HTTP server adds to a reply: time to the first streamed text, to the first audio delta and to the
end, through `python -m omni_jax.serve`'s app (uvicorn on localhost, the official openai client, SSE) against
the same turn run by OmniSession in the same process, on the same model.

  .venv/bin/python bench/bench_server.py [--checkpoint PATH] [--reply 16] [--iters 5]

Default model: the tests' tiny speaking checkpoint (tests/serve_testlib.py: tiny Thinker + Talker + Token2Wav,
Griffin-Lim voice). Both sides decode `--reply` tokens greedily for a short text prompt (the server's clock
starts before the request is sent, the session's before push_message); spoken: the same with modalities text +
audio. Medians of --iters runs after a warm-up (compilation excluded), interleaved; the ratio is server /
session (1.0: no overhead). Figures: docs/performance.md ("Server overhead").

Continuous batching (--clients 8): that many streaming clients at once against a server of --clients slots and
against a one-at-a-time server (--max_batch 1), each asking for --long_reply tokens of a different prompt:
aggregate tokens/s of both and their ratio; then a request sent while the others decode, whose time to its first
token is set against one prefill plus a few decode steps; every reply is checked against its solo greedy reply
(OmniChat.chat). Figures: docs/performance.md ("Continuous batching").

Before and after in one run (--baseline REV): the same measurement first runs on the server of git revision REV
(its tree exported to a temporary folder, this script run from its bench/ so that it imports that revision's
omni_jax and tests/, in its own process, with a tiny checkpoint made by that revision's tests/serve_testlib.py
from the same seeds), then on this checkout's:

  .venv/bin/python bench/bench_server.py --only batching --baseline a062887   # the last commit before the engine
"""

import argparse
import concurrent.futures
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
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


PROMPTS = ["Hello there, how are you today?", "Tell me a story about a cat.", "What is two plus two?",
           "Name three colours.", "Describe the sea.", "Why is the sky blue?", "Count to ten.", "Say something kind."]


def _serve(model, limits, max_batch):
  import uvicorn  # noqa: PLC0415

  from omni_jax.serve import server  # noqa: PLC0415

  # Revisions before the conversation engine (--baseline) built the worker's model side with engine_for.
  backend = server.Backend(model, limits) if hasattr(server, "Backend") else server.engine_for(model, limits)
  worker = server.Worker(backend, limits, max_batch=max_batch, max_queue=32)
  app = server.create_app(worker, limits, model_name="bench")
  srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
  thread = threading.Thread(target=srv.run, daemon=True)
  thread.start()
  while not srv.started:
    time.sleep(0.05)
  return srv, thread, srv.servers[0].sockets[0].getsockname()[1]


@functools.lru_cache(maxsize=None)
def _http():
  """One HTTP client for every request (a new httpx client builds an SSL context, ~10 ms of the shared CPU)."""
  import httpx  # noqa: PLC0415 - the openai client's transport

  return httpx.Client(timeout=900, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))


def _stream_text(port, prompt, reply):
  """(text, first-token seconds, end seconds, completion tokens) of one streamed greedy reply, read with a bare
  HTTP client (its parsing costs the server's CPU little: 8 clients share the cores with the server)."""
  body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "stream": True, "max_tokens": reply,
          "temperature": 0, "stream_options": {"include_usage": True}}
  t0 = time.perf_counter()
  text, first, tokens = "", None, 0
  with _http().stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
    for line in r.iter_lines():
      if not line.startswith("data: {"):
        continue
      chunk = json.loads(line[6:])
      if chunk.get("usage"):
        tokens = chunk["usage"]["completion_tokens"]
      for choice in chunk.get("choices", ()):
        if choice["delta"].get("content"):
          first = first if first is not None else time.perf_counter() - t0
          text += choice["delta"]["content"]
  return text, first, time.perf_counter() - t0, tokens


def _concurrency(model, args):
  from omni_jax.serve import protocol  # noqa: PLC0415

  n, reply = args.clients, args.long_reply
  prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
  solo = [model.chat(p, max_new_tokens=reply, do_sample=False) for p in prompts]
  limits = protocol.Limits(max_prompt_tokens=512, max_new_tokens=reply)
  rates = {}
  for slots in (1, n):
    srv, thread, port = _serve(model, limits, slots)
    client = lambda p: pool.submit(_stream_text, port, p, reply)  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(n + 1) as pool:
      [f.result() for f in [client(p) for p in prompts]]  # warm-up: compiles every shape, starts the clients
      walls, equal = [], 0
      for _ in range(args.rounds):
        t0 = time.perf_counter()
        results = [f.result() for f in [client(p) for p in prompts]]
        walls.append(time.perf_counter() - t0)
        equal += sum(r[0] == want for r, want in zip(results, solo))
      tokens, wall = sum(r[3] for r in results), statistics.median(walls)
      rates[slots] = tokens / wall
      print(f"{n} clients, {slots} slot(s): {tokens} tokens in {wall:.2f} s (median of {args.rounds} rounds) = "
            f"{rates[slots]:.1f} tokens/s; replies equal to solo: {equal}/{n * args.rounds}")
      if slots == n:
        # One more request while n - 1 decode: its first token after one prefill and a few steps, not at their end.
        others = [client(p) for p in prompts[:n - 1]]
        time.sleep(0.2)
        late = client("Tell me a story about a cat.").result()
        busy_end = max(f.result()[2] for f in others)
        alone = statistics.median(client("Tell me a story about a cat.").result()[1] for _ in range(3))
        print(f"a request arriving mid-decode: first token {late[1] * 1e3:.0f} ms (alone: {alone * 1e3:.0f} ms; "
              f"the running replies ended {busy_end:.2f} s after they started); equal to solo: "
              f"{late[0] == model.chat('Tell me a story about a cat.', max_new_tokens=reply, do_sample=False)}")
    srv.should_exit = True
    thread.join(timeout=30)
  print(f"aggregate tokens/s, {n} slots / 1 slot: {rates[n] / rates[1]:.2f}x")


def _baseline(args):
  """The batching measurement on revision args.baseline's code, in a child process."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory() as code:
    tree = subprocess.run(["git", "-C", repo, "archive", args.baseline], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", code], input=tree, check=True)
    script = os.path.join(code, "bench", "bench_server_now.py")  # beside that revision's bench/common.py
    shutil.copy(os.path.abspath(__file__), script)
    print(f"== baseline: revision {args.baseline}", flush=True)
    subprocess.run([sys.executable, script, "--only", "batching", "--clients", str(args.clients),
                    "--long_reply", str(args.long_reply), "--rounds", str(args.rounds)], check=True)
  print("== this checkout", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", default=None)
  parser.add_argument("--reply", type=int, default=16)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--clients", type=int, default=8)
  parser.add_argument("--long_reply", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the clients (the median counts)")
  parser.add_argument("--only", choices=("overhead", "batching"), default=None)
  parser.add_argument("--baseline", default=None, metavar="REV",
                      help="first measure continuous batching on the server of git revision REV, in this run")
  args = parser.parse_args()
  if args.baseline and args.only != "overhead":
    _baseline(args)

  import openai  # noqa: PLC0415

  import serve_testlib  # noqa: PLC0415
  from omni_jax import generate  # noqa: PLC0415
  from omni_jax.serve import protocol  # noqa: PLC0415

  path = args.checkpoint or serve_testlib.make_checkpoint(tempfile.mkdtemp())
  model = generate.load(path)
  print(f"omni_jax from {os.path.dirname(os.path.dirname(generate.__file__))}")
  if args.only != "overhead":
    _concurrency(model, args)
  if args.only == "batching":
    return
  limits = protocol.Limits(max_prompt_tokens=512, max_new_tokens=args.reply)
  srv, thread, port = _serve(model, limits, max_batch=1)
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

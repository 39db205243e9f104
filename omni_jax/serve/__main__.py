"""python -m omni_jax.serve --checkpoint PATH: the OpenAI-compatible server (omni_jax/serve/server.py).

  python -m omni_jax.serve --checkpoint workdirs/tiny_demo                      # http://127.0.0.1:8000/v1
  python -m omni_jax.serve --checkpoint ckpt/omni7b --media_root /srv/media --max_queue 16 --port 9000

--checkpoint: anything omni_jax.generate.load reads. --config (optional): runtime, mesh and generation
defaults (config.generate), as generate.py. Binds to 127.0.0.1 unless --host says otherwise; --api_key (or
OMNI_JAX_API_KEY) makes every route ask for `Authorization: Bearer <key>`. Requests must name one of
--allowed_hosts in their Host header, and browsers on other sites are refused unless --cors_origins lists them
(omni_jax/serve/guard.py). Local media paths are off unless --media_root names the one directory clients may
read from. The Realtime WebSocket (/v1/realtime, omni_jax/serve/realtime.py) and the web page that talks
through it (http://127.0.0.1:8000/) come with the same server and the same checks (--realtime_* limits).
docs/serving.md.
"""

import ipaddress
import logging
import os

from absl import flags
from ml_collections import config_flags

from omni_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Optional Python config file (get_config()).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, step directory, converter output or HF directory.")
_ADAPTER = flags.DEFINE_string("adapter", None, "LoRA adapters merged into the checkpoint: a PEFT adapter directory or "
                               "a LoRA run of train.py (docs/training.md).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (default: localhost only).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to bind.")
_MEDIA_ROOT = flags.DEFINE_string("media_root", None, "The only directory whose files requests may name "
                                  "(default: none; media come as data URLs).")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 8, "Requests waiting for the model; more get 429.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 4, "Replies decoded at once (the engine's slots): a request that "
                                  "arrives while others decode joins them at the next step.")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_tokens", None, "Longest rendered prompt (default: the model's "
                                   "max_position_embeddings minus --max_new_tokens, at most 32768).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 1024, "Ceiling (and default) of a request's max_tokens.")
_MAX_MEDIA = flags.DEFINE_integer("max_media_mb", 16, "Largest media part, MiB (decoded).")
_MAX_BODY = flags.DEFINE_integer("max_body_mb", 64, "Largest request body, MiB.")
_NAME = flags.DEFINE_string("model_name", None, "The model id clients send (default: the checkpoint's name).")
_API_KEY = flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer <key>' on every route "
                               "(default: $OMNI_JAX_API_KEY; unset: no key).")
_ALLOWED_HOSTS = flags.DEFINE_list("allowed_hosts", None, "Host header names the server answers to (default: "
                                   "localhost names, plus --host when it is a specific address; '*': any).")
_CORS = flags.DEFINE_list("cors_origins", [], "Web origins whose pages may call the server (e.g. "
                          "https://app.example; '*': any). Default: none (cross-site requests are refused).")
_READ_TIMEOUT = flags.DEFINE_float("read_timeout", 30.0, "Seconds a request's headers, or the next piece of its "
                                   "body, may take before the connection is dropped.")
_DECODE_WORKERS = flags.DEFINE_integer("decode_workers", 2, "Threads decoding requests' media (off the model's).")
_MAX_AUDIO_S = flags.DEFINE_float("max_audio_seconds", None, "Longest audio part (default: what "
                                  "--max_prompt_tokens holds at 25 tokens a second, at most 300).")
_MAX_IMAGE_MP = flags.DEFINE_float("max_image_megapixels", 16.8, "Largest image (width x height, from its header).")
_MAX_VIDEO_S = flags.DEFINE_float("max_video_seconds", 600.0, "Longest video part.")
_RT_SESSIONS = flags.DEFINE_integer("realtime_max_sessions", 4, "Realtime WebSocket sessions open at once (each "
                                    "holds its conversation's caches); more are refused with 429.")
_RT_EVENT_KB = flags.DEFINE_integer("realtime_max_event_kb", 4096, "Largest Realtime event (one WebSocket message).")
_RT_MINUTES = flags.DEFINE_float("realtime_max_session_minutes", 30.0, "A Realtime connection's longest life.")
_RT_FPS = flags.DEFINE_float("realtime_max_frames_per_second", 2.0, "Camera frames a Realtime session may send "
                             "a second (sustained; 10 seconds' worth may come at once, after a stall).")
_RT_BUFFER_S = flags.DEFINE_float("realtime_max_buffer_seconds", 60.0, "Audio a Realtime session may hold "
                                  "uncommitted (without turn detection).")
flags.mark_flags_as_required(["checkpoint"])


def main(argv):
  del argv
  import uvicorn  # noqa: PLC0415 - the serve extra

  from omni_jax.generate import api  # noqa: PLC0415
  from omni_jax.serve import guard  # noqa: PLC0415
  from omni_jax.serve import protocol  # noqa: PLC0415
  from omni_jax.serve import realtime  # noqa: PLC0415
  from omni_jax.serve import server  # noqa: PLC0415

  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  if _MEDIA_ROOT.value is not None and not os.path.isdir(_MEDIA_ROOT.value):
    cli.fail(f"--media_root {_MEDIA_ROOT.value}: no such directory")
  try:
    loopback = ipaddress.ip_address(_HOST.value).is_loopback
  except ValueError:
    loopback = _HOST.value == "localhost"
  api_key = _API_KEY.value if _API_KEY.value is not None else os.environ.get("OMNI_JAX_API_KEY") or None
  if not loopback and api_key is None:
    logging.warning("--host %s: the server is reachable from other machines and has no --api_key", _HOST.value)
  hosts = _ALLOWED_HOSTS.value
  if hosts is None:
    hosts = list(guard.LOCAL_HOSTS) + ([_HOST.value] if _HOST.value not in ("0.0.0.0", "::", "") else [])
  gate = guard.GateConfig(allowed_hosts=tuple(hosts), cors_origins=tuple(_CORS.value), api_key=api_key,
                          read_timeout=_READ_TIMEOUT.value)
  model = api.load(_CHECKPOINT.value, _CONFIG.value, adapter=_ADAPTER.value)
  positions = int(model.config.model.thinker.text.get("max_position_embeddings", 32768))
  max_prompt = _MAX_PROMPT.value or max(1, min(32768, positions - _MAX_NEW.value))
  if max_prompt + _MAX_NEW.value > positions:
    cli.fail(f"--max_prompt_tokens {max_prompt} + --max_new_tokens {_MAX_NEW.value} is over the model's "
             f"{positions} positions")
  limits = protocol.Limits(max_body_bytes=_MAX_BODY.value << 20, max_media_bytes=_MAX_MEDIA.value << 20,
                           max_prompt_tokens=max_prompt, max_new_tokens=_MAX_NEW.value,
                           max_audio_seconds=_MAX_AUDIO_S.value,
                           max_image_pixels=int(_MAX_IMAGE_MP.value * 1e6), max_video_seconds=_MAX_VIDEO_S.value)
  rt = realtime.RealtimeLimits(max_connections=_RT_SESSIONS.value, max_event_bytes=_RT_EVENT_KB.value << 10,
                               max_session_seconds=60 * _RT_MINUTES.value,
                               max_frames_per_second=_RT_FPS.value, max_buffer_seconds=_RT_BUFFER_S.value)
  worker = server.Worker(server.Backend(model, limits), limits, max_queue=_MAX_QUEUE.value,
                         max_batch=_MAX_BATCH.value)
  name = _NAME.value or os.path.basename(os.path.normpath(_CHECKPOINT.value))
  app = server.create_app(worker, limits, model_name=name, media_root=_MEDIA_ROOT.value, gate=gate,
                          decode_workers=_DECODE_WORKERS.value, realtime_limits=rt)
  logging.info("serving %s as %r (%d slots) on http://%s:%d/v1 (realtime: ws://%s:%d/v1/realtime, the web page "
               "at http://%s:%d/)", _CHECKPOINT.value, name, _MAX_BATCH.value, _HOST.value, _PORT.value,
               *(_HOST.value, _PORT.value) * 2)
  # WebSocket messages up to twice the realtime limit reach the session, which answers a too-large one with an
  # error event before closing (uvicorn would close without one).
  uvicorn.run(app, host=_HOST.value, port=_PORT.value, log_level="info", http=guard.timed_h11(_READ_TIMEOUT.value),
              timeout_keep_alive=5, ws_max_size=2 * rt.max_event_bytes)


if __name__ == "__main__":
  cli.run(main, also=(ValueError,))

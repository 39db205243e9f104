"""The OpenAI chat-completions wire format of the server (omni_jax.serve.server): request validation, the
media of content parts (data URLs, files under the operator's media root), response and chunk bodies, errors.

Requests follow OpenAI's chat format with the content parts Qwen-Omni APIs take:
  {"type": "text", "text": ...}
  {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}
  {"type": "input_audio", "input_audio": {"data": "<base64 or data URL>", "format": "wav"}}
  {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}
A url may also name a local file ("file:///srv/media/a.png", "a.png") when the server was started with
--media_root, and then only a file inside that directory (no "..", no symlink out of it). Remote URLs are
never fetched. Every violation is a ServeError: an HTTP status and OpenAI's error body
{"error": {"message", "type", "param", "code"}}.
"""

import base64
import binascii
import dataclasses
import io
import json
import os
import re
import secrets
import time
import wave
from typing import Annotated, Literal, Optional, Union

import numpy as np
import pydantic
from pydantic import BaseModel, ConfigDict, Field

from omni_jax import sizes

AUDIO_IN_FORMATS = ("wav", "mp3", "flac", "ogg")  # what omni_jax.input.media.audio decodes
AUDIO_OUT_FORMATS = ("wav", "pcm16")
OUT_SAMPLE_RATE = 24000  # Token2Wav's rate
AUDIO_TOKENS_PER_SECOND = sizes.audio_token_count(30000) / 300  # the audio tower's tokens per second of audio
MAX_SEED = 2 ** 63 - 1  # seeds are 64-bit signed, as OpenAI's

# OpenAI request fields that change nothing here: accepted and ignored, so stock clients keep working.
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                  "prompt_cache_retention", "prompt_cache_options", "parallel_tool_calls", "verbosity")
# OpenAI request fields this server cannot honour: named in a 400 rather than silently dropped.
UNSUPPORTED_FIELDS = ("tools", "tool_choice", "functions", "function_call", "logit_bias", "prediction",
                      "web_search_options", "moderation", "reasoning_effort")


class ServeError(Exception):
  """A request the server refuses: HTTP `status` and OpenAI's error object."""

  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002 - OpenAI's name
               param: Optional[str] = None, code: Optional[str] = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may ask for (python -m omni_jax.serve --max_* flags)."""
  max_body_bytes: int = 64 << 20  # the whole JSON body
  max_media_bytes: int = 16 << 20  # one decoded media part
  max_media_parts: int = 16  # media parts in one request
  max_prompt_tokens: int = 4096  # the rendered prompt (chat markup and media tokens included)
  max_new_tokens: int = 1024  # max_tokens / max_completion_tokens ceiling (and the default)
  # Media budgets, checked from a file's header before it is decoded (omni_jax.serve.media).
  max_audio_seconds: Optional[float] = None  # None: what max_prompt_tokens can hold (25 tokens a second), <= 300
  max_image_pixels: int = 4096 * 4096  # width * height of an image
  max_video_seconds: float = 600.0
  max_video_frame_pixels: int = 4096 * 2304  # width * height of a video frame

  def audio_seconds(self) -> float:
    if self.max_audio_seconds is not None:
      return float(self.max_audio_seconds)
    return min(300.0, self.max_prompt_tokens / AUDIO_TOKENS_PER_SECOND + 2.0)


# ---------------------------------------------------------------------------------------------------------
# Requests.


class _Strict(BaseModel):
  # strict: JSON types as sent ("8" is not a number, 1 is not a boolean); unknown fields are named in a 400.
  model_config = ConfigDict(extra="forbid", strict=True)


class _URL(_Strict):
  url: str
  detail: Optional[str] = None  # OpenAI's image detail hint: accepted, the processor's pixel budget decides


class TextPart(_Strict):
  type: Literal["text"]
  text: str


class ImagePart(_Strict):
  type: Literal["image_url"]
  image_url: Union[_URL, str]


class InputAudio(_Strict):
  data: str  # base64 (OpenAI) or a data URL / file URL (Qwen-Omni APIs)
  format: Literal[AUDIO_IN_FORMATS]


class AudioPart(_Strict):
  type: Literal["input_audio"]
  input_audio: InputAudio


class VideoPart(_Strict):
  type: Literal["video_url"]
  video_url: Union[_URL, str]


Part = Annotated[Union[TextPart, ImagePart, AudioPart, VideoPart], Field(discriminator="type")]


class AssistantAudio(BaseModel):
  """A previous reply's audio: its id (the server keeps recent transcripts) or the whole object echoed back
  (data, expires_at are ignored; a transcript given stands for the turn)."""
  model_config = ConfigDict(extra="ignore", strict=True)
  id: str
  transcript: Optional[str] = None


class Message(_Strict):
  role: Literal["system", "developer", "user", "assistant"]
  content: Union[str, list[Part], None] = None
  name: Optional[str] = None
  audio: Optional[AssistantAudio] = None
  # What a client echoes when it appends a previous response's message: accepted when empty.
  refusal: Optional[str] = None
  annotations: Optional[list] = None
  tool_calls: Optional[list] = None
  function_call: Optional[dict] = None

  @pydantic.model_validator(mode="after")
  def _check(self):
    if self.tool_calls or self.function_call:
      raise ValueError("tool calls are not supported by this server")
    if self.role != "user" and isinstance(self.content, list):
      if any(p.type != "text" for p in self.content):
        raise ValueError(f"{self.role} messages take text parts only (media go in user messages)")
    if self.audio is not None and self.role != "assistant":
      raise ValueError("only assistant messages carry an audio id")
    if self.content is None and self.audio is None:
      raise ValueError(f"a {self.role} message needs content")
    return self


class AudioOutput(_Strict):
  voice: Optional[str] = None  # a speaker of config.model.talker.speakers (default: default_speaker)
  format: Literal[AUDIO_OUT_FORMATS] = "wav"


class StreamOptions(_Strict):
  include_usage: bool = False
  include_obfuscation: Optional[bool] = None  # newer clients send it: accepted, ignored


class ChatRequest(_Strict):
  model: str
  messages: list[Message] = Field(min_length=1)
  stream: bool = False
  stream_options: Optional[StreamOptions] = None
  modalities: Optional[list[Literal["text", "audio"]]] = None
  audio: Optional[AudioOutput] = None
  max_tokens: Optional[int] = Field(None, ge=1)
  max_completion_tokens: Optional[int] = Field(None, ge=1)
  temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
  top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
  seed: Optional[int] = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)
  n: Optional[int] = Field(None, ge=1, le=1)
  stop: Union[str, list[str], None] = None
  frequency_penalty: Optional[float] = None
  presence_penalty: Optional[float] = None
  logprobs: Optional[bool] = None
  top_logprobs: Optional[int] = Field(None, ge=0, le=20)
  response_format: Optional[dict] = None
  # Beyond OpenAI (extra_body in the openai client), as vLLM / Qwen-Omni servers take them.
  top_k: Optional[int] = Field(None, ge=0, le=2 ** 31 - 1)
  repetition_penalty: Optional[float] = Field(None, gt=0.0)
  use_audio_in_video: bool = False

  def check(self) -> None:
    """What the field types cannot say, as a 400 naming the field."""
    def bad(message, param):
      raise ServeError(400, message, param=param, code="unsupported_value")
    if self.stop:
      bad("stop sequences are not supported (the model stops at its end-of-turn token)", "stop")
    for p in ("frequency_penalty", "presence_penalty"):
      if getattr(self, p):
        bad(f"{p} is not supported; use repetition_penalty", p)
    if self.logprobs:
      bad("logprobs are not supported", "logprobs")
    if self.response_format and self.response_format.get("type") != "text":
      bad("only the text response_format is supported", "response_format")
    if self.speak and self.audio is None:
      bad('modalities ["text", "audio"] need the audio parameter, e.g. {"voice": "Chelsie", "format": "wav"}',
          "audio")

  @property
  def speak(self) -> bool:
    return "audio" in (self.modalities or ())

  def new_tokens(self, limits: Limits) -> int:
    n = self.max_completion_tokens or self.max_tokens or limits.max_new_tokens
    if n > limits.max_new_tokens:
      raise ServeError(400, f"max_tokens {n} exceeds this server's limit of {limits.max_new_tokens}",
                       param="max_tokens")
    return n

  def sampling(self) -> dict:
    """OmniChat / OmniSession sampling keywords (the model's config.generate for what the request leaves).
    As OpenAI's: temperature 0 is greedy, a positive one samples, and without a seed each request draws its
    own (config.generate.seed would give every client the same sample)."""
    out = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty")
           if getattr(self, k) is not None}
    if self.temperature is not None:
      out["do_sample"] = self.temperature > 0.0
      if not out["do_sample"]:
        out.pop("temperature")
    out["seed"] = self.seed if self.seed is not None else secrets.randbits(31)
    return out


_PART_TAGS = ("text", "image_url", "input_audio", "video_url")


def _field_path(loc) -> list:
  """pydantic's error location without its union-branch labels ('str', 'list[...]', a part's tag)."""
  out = []
  for i, x in enumerate(loc):
    if isinstance(x, str) and (x in ("str", "none") or "[" in x or x.startswith("function-")):
      continue
    if x in _PART_TAGS and i and isinstance(loc[i - 1], int):  # the discriminated union's branch label
      continue
    out.append(x)
  return out


def _loc(loc) -> str:
  return ".".join(str(x) for x in loc)


def parse_request(body: bytes, limits: Limits) -> ChatRequest:
  """The validated request of a raw body, or a ServeError (413 too large, 400 malformed or invalid)."""
  if len(body) > limits.max_body_bytes:
    raise ServeError(413, f"the request body is {len(body)} bytes; this server takes at most "
                     f"{limits.max_body_bytes}", code="request_too_large")
  try:
    data = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ServeError(400, f"We could not parse the JSON body of your request ({e})", code="invalid_json") from None
  if not isinstance(data, dict):
    raise ServeError(400, "the request body must be a JSON object", code="invalid_json")
  for name in UNSUPPORTED_FIELDS:
    if data.get(name) not in (None, [], {}):
      raise ServeError(400, f"{name!r} is not supported by this server", param=name, code="unsupported_parameter")
  data = {k: v for k, v in data.items() if k not in IGNORED_FIELDS + UNSUPPORTED_FIELDS}
  try:
    request = ChatRequest.model_validate(data)
  except pydantic.ValidationError as e:
    err = max(e.errors(include_url=False), key=lambda x: len(x["loc"]))  # the deepest: the union branch meant
    loc = _loc(_field_path(err["loc"]))
    if err["type"] == "extra_forbidden":
      raise ServeError(400, f"Unrecognized request argument supplied: {loc}", param=loc,
                       code="unknown_parameter") from None
    msg = err["msg"].removeprefix("Value error, ")
    raise ServeError(400, f"{loc}: {msg}" if loc else msg, param=loc or None, code="invalid_value") from None
  request.check()
  return request


# ---------------------------------------------------------------------------------------------------------
# Media: data URLs and files under the media root -> local files the preprocessor reads.

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]*/?[\w.+-]*)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)
_EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp",
               "image/gif": ".gif", "image/bmp": ".bmp", "video/mp4": ".mp4", "video/webm": ".webm",
               "video/quicktime": ".mov", "video/x-matroska": ".mkv", "audio/wav": ".wav", "audio/x-wav": ".wav",
               "audio/mpeg": ".mp3", "audio/mp3": ".mp3", "audio/flac": ".flac", "audio/ogg": ".ogg"}


def _decode_base64(data: str, limit: int, param: str) -> bytes:
  if len(data) * 3 // 4 > limit + 3:  # before decoding: never allocate an oversized part
    raise ServeError(413, f"{param}: the media part is about {len(data) * 3 // 4} bytes; this server takes at "
                     f"most {limit} per part", param=param, code="media_too_large")
  try:
    out = base64.b64decode(data, validate=True)
  except (binascii.Error, ValueError):
    raise ServeError(400, f"{param}: the data is not valid base64", param=param, code="invalid_media") from None
  if not out:
    raise ServeError(400, f"{param}: the media part is empty", param=param, code="invalid_media")
  return out


def _local_file(url: str, root: Optional[str], param: str) -> str:
  """The real path of a file url / path inside the media root, or a 403 saying why not."""
  if root is None:
    raise ServeError(403, f"{param}: local file paths are off (the server was started without --media_root); "
                     "send the media as a data URL", type="permission_error", param=param, code="media_root_off")
  path = url[len("file://"):] if url.startswith("file://") else url
  if ".." in path.replace("\\", "/").split("/"):
    raise ServeError(403, f"{param}: '..' is not allowed in media paths", type="permission_error", param=param,
                     code="outside_media_root")
  real_root = os.path.realpath(root)
  real = os.path.realpath(path if os.path.isabs(path) else os.path.join(real_root, path))
  if os.path.commonpath([real, real_root]) != real_root:  # an absolute path elsewhere, or a symlink out of it
    raise ServeError(403, f"{param}: {url} is outside the media root", type="permission_error", param=param,
                     code="outside_media_root")
  if not os.path.isfile(real):
    raise ServeError(400, f"{param}: {url} is not a file under the media root", param=param, code="missing_media")
  return real


class MediaWriter:
  """Turns content-part urls into files the preprocessor reads: data URLs are written under `workdir` (one
  per request, removed with it), local files are checked against the media root and read in place."""

  def __init__(self, workdir: str, limits: Limits, media_root: Optional[str]):
    self.workdir, self.limits, self.root, self.count = workdir, limits, media_root, 0

  def _write(self, data: bytes, extension: str) -> str:
    path = os.path.join(self.workdir, f"part{self.count}{extension}")
    with open(path, "wb") as f:
      f.write(data)
    return path

  def url(self, url: str, kind: str, param: str) -> str:
    if "\x00" in url:
      raise ServeError(400, f"{param}: the url holds a NUL character", param=param, code="invalid_media")
    self.count += 1
    if self.count > self.limits.max_media_parts:
      raise ServeError(400, f"more than {self.limits.max_media_parts} media parts in one request", param=param,
                       code="too_many_media")
    m = _DATA_URL.match(url)
    if m:
      if not m.group("b64"):
        raise ServeError(400, f"{param}: data URLs must be base64-encoded (';base64,')", param=param,
                         code="invalid_media")
      mime = (m.group("mime") or "").lower()
      if mime and "/" in mime and mime.split("/")[0] != kind:
        raise ServeError(400, f"{param}: a {mime} data URL in a {kind} part", param=param, code="invalid_media")
      return self._write(_decode_base64(url[m.end():], self.limits.max_media_bytes, param),
                         _EXTENSIONS.get(mime, ""))
    if re.match(r"^[a-z][a-z0-9+.-]*://", url, re.IGNORECASE) and not url.startswith("file://"):
      raise ServeError(400, f"{param}: remote URLs are not fetched; send a data URL"
                       + (" or a path under the media root" if self.root else ""), param=param,
                       code="unsupported_url")
    path = _local_file(url, self.root, param)
    size = os.path.getsize(path)
    if size > self.limits.max_media_bytes:
      raise ServeError(413, f"{param}: {url} is {size} bytes; this server takes at most "
                       f"{self.limits.max_media_bytes} per part", param=param, code="media_too_large")
    return path

  def audio(self, part: InputAudio, param: str) -> str:
    if re.match(r"^(data:|[a-z][a-z0-9+.-]*://)", part.data, re.IGNORECASE):  # a URL, as Qwen-Omni APIs take
      return self.url(part.data, "audio", param)
    self.count += 1
    if self.count > self.limits.max_media_parts:
      raise ServeError(400, f"more than {self.limits.max_media_parts} media parts in one request", param=param,
                       code="too_many_media")
    return self._write(_decode_base64(part.data, self.limits.max_media_bytes, param), "." + part.format)


def conversation(request: ChatRequest, media: MediaWriter, transcripts: Optional[dict] = None) -> list[dict]:
  """The request's messages as a project conversation (omni_jax.generate.prompts: parts with local paths; media
  parts also carry "param", the request field they came from, for error messages). transcripts: audio id ->
  text of earlier spoken replies (an assistant turn given only by its audio id)."""
  out = []
  for i, m in enumerate(request.messages):
    role = "system" if m.role == "developer" else m.role
    if m.content is None:  # an assistant turn given by its audio (id, or the echoed object)
      text = m.audio.transcript if m.audio.transcript is not None else (transcripts or {}).get(m.audio.id)
      if text is None:
        raise ServeError(400, f"messages.{i}.audio.id: unknown or expired audio id {m.audio.id!r}; send the "
                         "transcript as content", param=f"messages.{i}.audio.id", code="unknown_audio_id")
      out.append({"role": role, "content": text})
      continue
    if isinstance(m.content, str):
      out.append({"role": role, "content": m.content})
      continue
    parts = []
    for j, p in enumerate(m.content):
      param = f"messages.{i}.content.{j}"
      if p.type == "text":
        parts.append({"type": "text", "text": p.text})
      elif p.type == "image_url":
        url = p.image_url if isinstance(p.image_url, str) else p.image_url.url
        parts.append({"type": "image", "path": media.url(url, "image", param + ".image_url"),
                      "param": param + ".image_url"})
      elif p.type == "input_audio":
        parts.append({"type": "audio", "path": media.audio(p.input_audio, param + ".input_audio"),
                      "param": param + ".input_audio"})
      else:
        url = p.video_url if isinstance(p.video_url, str) else p.video_url.url
        parts.append({"type": "video", "path": media.url(url, "video", param + ".video_url"),
                      "use_audio_in_video": request.use_audio_in_video, "param": param + ".video_url"})
    if role != "user":  # system / assistant text parts: one string
      out.append({"role": role, "content": "".join(p["text"] for p in parts)})
      continue
    joined = []  # consecutive text parts as one (chat.render joins them; a session tokenises each push alone)
    for p in parts:
      if p["type"] == "text" and joined and joined[-1]["type"] == "text":
        joined[-1] = {"type": "text", "text": joined[-1]["text"] + p["text"]}
      else:
        joined.append(p)
    out.append({"role": role, "content": joined})
  return out


# ---------------------------------------------------------------------------------------------------------
# Responses.


def pcm16(wave_f32: np.ndarray) -> bytes:
  """float32 [-1, 1] samples -> little-endian 16-bit PCM."""
  return (np.clip(np.asarray(wave_f32, np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def wav_bytes(pcm: bytes, sample_rate: int = OUT_SAMPLE_RATE) -> bytes:
  """A complete mono 16-bit WAV file of PCM bytes."""
  buf = io.BytesIO()
  with wave.open(buf, "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(sample_rate)
    w.writeframes(pcm)
  return buf.getvalue()


def streaming_wav_header(sample_rate: int = OUT_SAMPLE_RATE) -> bytes:
  """The 44-byte header of a mono 16-bit WAV whose length is not known yet (RIFF and data sizes 0xFFFFFFFF, as
  streaming encoders write them); the PCM deltas that follow complete the file."""
  header = bytearray(wav_bytes(b"", sample_rate))
  header[4:8] = header[40:44] = b"\xff\xff\xff\xff"
  return bytes(header)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, created: int, text: str, finish_reason: str, usage_: dict,
               audio: Optional[dict] = None) -> dict:
  """A chat.completion object; with audio, the text is the audio's transcript and content is null (as
  OpenAI's audio models answer)."""
  message = {"role": "assistant", "content": None if audio else text, "refusal": None}
  if audio:
    message["audio"] = audio
  return {"id": rid, "object": "chat.completion", "created": created, "model": model,
          "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
          "usage": usage_}


def chunk(rid: str, model: str, created: int, delta: dict, finish_reason: Optional[str] = None,
          usage_: Optional[dict] = None, choices: bool = True) -> dict:
  """A chat.completion.chunk object (choices=False: the final usage-only chunk of include_usage)."""
  return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
          "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}] if choices
          else [], "usage": usage_}


def now() -> int:
  return int(time.time())

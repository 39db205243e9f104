"""ChatML rendering of a conversation into token ids and loss labels (the released chat template).

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n...

A system turn is injected when the conversation has none: the default assistant prompt, or the fixed prompt
the Talker was trained with when the sample wants a spoken reply. Content parts are concatenated without
separators; each media part becomes bos + N placeholders + eos, N from the preprocessed media (image / video
grid, audio mel length); a video with its audio track uses the interleaved audio-in-video layout of
omni_jax.positions, so the pipeline and the position ids can never disagree.

Labels (aligned with input_ids, IGNORE elsewhere) cover each assistant turn's content and its <|im_end|>.

Tokenisation: the role header ("assistant\\n") and the text runs of a message are encoded separately, so the
ids of an answer never depend on the header before it. This equals tokenising the whole rendered string
(what transformers' processor does) unless a message's text starts with whitespace that would merge with the
header's newline.
"""

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from omni_jax.batch import IGNORE
from omni_jax.input.media import audio as audio_media

SYSTEM_DEFAULT = "You are a helpful assistant."
SYSTEM_SPEECH = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
                 "auditory and visual inputs, as well as generating text and speech.")
ROLES = ("system", "user", "assistant")


class ChatError(ValueError):
  """A conversation that cannot be rendered (unknown role or part type, media count mismatch)."""


@dataclasses.dataclass(frozen=True)
class ImageItem:
  grid_thw: tuple[int, int, int]  # patch grid (1, h, w)


@dataclasses.dataclass(frozen=True)
class AudioItem:
  num_frames: int  # mel frames the encoder reads


@dataclasses.dataclass(frozen=True)
class VideoItem:
  grid_thw: tuple[int, int, int]
  second_per_grid: float
  audio_frames: Optional[int] = None  # mel frames of the video's own audio track: audio-in-video when set


MediaItem = Union[ImageItem, AudioItem, VideoItem]


@dataclasses.dataclass(frozen=True)
class ChatFormat:
  """Everything rendering needs besides the tokenizer (ids are the released ones)."""
  special: Mapping[str, int]
  spatial_merge_size: int = 2
  position_id_per_seconds: int = 25
  seconds_per_chunk: int = 2
  add_vision_id: bool = False  # "Picture k: " / "Video k: " before each image / video
  add_audio_id: bool = False  # "Audio k: " before each audio

  def id(self, name: str) -> int:
    return self.special[name]


def media_token_count(item: MediaItem, merge_size: int = 2) -> int:
  """Placeholder tokens of one item (markers excluded; for audio-in-video, VIDEO + AUDIO tokens)."""
  if isinstance(item, AudioItem):
    return int(audio_media.num_tokens(item.num_frames))
  t, h, w = (int(v) for v in item.grid_thw)
  n = t * h * w // (merge_size * merge_size)
  if isinstance(item, VideoItem) and item.audio_frames is not None:
    n += int(audio_media.num_tokens(item.audio_frames))
  return n


def _audio_in_video_ids(item: VideoItem, fmt: ChatFormat) -> list[int]:
  # positions imports jax; only audio-in-video samples pay for that import (in the worker that renders them).
  from omni_jax.config import TokenIds  # pylint: disable=import-outside-toplevel
  from omni_jax.positions import audio_in_video_layout  # pylint: disable=import-outside-toplevel

  ids = TokenIds(audio_token_id=fmt.id("<|AUDIO|>"), image_token_id=fmt.id("<|IMAGE|>"),
                 video_token_id=fmt.id("<|VIDEO|>"), audio_start_token_id=fmt.id("<|audio_bos|>"),
                 audio_end_token_id=fmt.id("<|audio_eos|>"), vision_start_token_id=fmt.id("<|vision_bos|>"),
                 vision_end_token_id=fmt.id("<|vision_eos|>"), position_id_per_seconds=fmt.position_id_per_seconds,
                 seconds_per_chunk=fmt.seconds_per_chunk, spatial_merge_size=fmt.spatial_merge_size)
  n_audio = int(audio_media.num_tokens(item.audio_frames))
  return [int(i) for i in audio_in_video_layout(item.grid_thw, item.second_per_grid, n_audio, ids,
                                                with_markers=True)]


def media_ids(item: MediaItem, fmt: ChatFormat) -> list[int]:
  """bos + placeholders + eos of one media item."""
  n = media_token_count(item, fmt.spatial_merge_size)
  if isinstance(item, ImageItem):
    return [fmt.id("<|vision_bos|>")] + [fmt.id("<|IMAGE|>")] * n + [fmt.id("<|vision_eos|>")]
  if isinstance(item, AudioItem):
    return [fmt.id("<|audio_bos|>")] + [fmt.id("<|AUDIO|>")] * n + [fmt.id("<|audio_eos|>")]
  if item.audio_frames is not None:
    return _audio_in_video_ids(item, fmt)
  return [fmt.id("<|vision_bos|>")] + [fmt.id("<|VIDEO|>")] * n + [fmt.id("<|vision_eos|>")]


def media_label(fmt: ChatFormat, kind: str, number: int) -> str:
  """"Picture k: " / "Video k: " / "Audio k: " before the conversation's number-th media part of its kind, when
  the format numbers media (add_vision_id / add_audio_id); "" otherwise."""
  if (kind == "audio" and fmt.add_audio_id) or (kind != "audio" and fmt.add_vision_id):
    return f"{_LABELS[kind]} {number}: "
  return ""


_LABELS = {"image": "Picture", "audio": "Audio", "video": "Video"}


def _media_text(kind: str) -> str:
  """The template's unexpanded placeholder (what apply_chat_template prints)."""
  return {"image": "<|vision_bos|><|IMAGE|><|vision_eos|>", "audio": "<|audio_bos|><|AUDIO|><|audio_eos|>",
          "video": "<|vision_bos|><|VIDEO|><|vision_eos|>"}[kind]


def content_parts(content: Any) -> list[dict]:
  if isinstance(content, str):
    return [{"type": "text", "text": content}]
  if not isinstance(content, (list, tuple)):
    raise ChatError(f"message content must be a string or a list of parts, got {type(content).__name__}")
  return list(content)


def with_system(messages: Sequence[Mapping], speech_output: bool = False,
                system_prompt: Optional[str] = None) -> list[Mapping]:
  """The conversation with a system turn first (kept if present; else system_prompt or the default)."""
  messages = list(messages)
  if not messages:
    raise ChatError("empty conversation")
  if messages[0].get("role") == "system":
    return messages
  prompt = system_prompt if system_prompt is not None else (SYSTEM_SPEECH if speech_output else SYSTEM_DEFAULT)
  return [{"role": "system", "content": prompt}] + messages


def _walk(messages: Sequence[Mapping], add_generation_prompt: bool, fmt: ChatFormat):
  """Yield (kind, value, role, is_content) pieces: ('special', name), ('text', str), ('media', kind)."""
  counts = {"image": 0, "audio": 0, "video": 0}
  for i, m in enumerate(messages):
    role = m.get("role")
    if role not in ROLES:
      raise ChatError(f"message {i}: unknown role {role!r}; expected one of {ROLES}")
    yield "special", "<|im_start|>", role, False
    yield "text", f"{role}\n", role, False
    for part in content_parts(m.get("content")):
      kind = part.get("type") if isinstance(part, Mapping) else None
      if kind == "text":
        if not isinstance(part.get("text"), str):
          raise ChatError(f"message {i}: text part without a string 'text'")
        yield "text", part["text"], role, True
      elif kind in counts:
        counts[kind] += 1
        label = media_label(fmt, kind, counts[kind])
        if label:
          yield "text", label, role, True
        yield "media", kind, role, True
      else:
        raise ChatError(f"message {i}: unknown content part type {kind!r}")
    yield "special", "<|im_end|>", role, True
    yield "text", "\n", role, False
  if add_generation_prompt:
    yield "special", "<|im_start|>", "assistant", False
    yield "text", "assistant\n", "assistant", False


def render_text(messages: Sequence[Mapping], fmt: Optional[ChatFormat] = None, *,
                add_generation_prompt: bool = False) -> str:
  """The ChatML string with unexpanded media placeholders, as the released template prints it."""
  fmt = fmt or ChatFormat(special={})
  out = []
  for kind, value, _, _ in _walk(messages, add_generation_prompt, fmt):
    out.append(_media_text(value) if kind == "media" else value)
  return "".join(out)


@dataclasses.dataclass
class Rendered:
  input_ids: np.ndarray  # [n] int32
  labels: np.ndarray  # [n] int32, IGNORE where there is no loss
  media_kinds: list[str]  # kind of each media part in order of appearance
  # [start, end) of each assistant message's tokens: its content and its <|im_end|> (the Talker's reply tokens)
  assistant_spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)


class ChatWriter:
  """ChatML written piece by piece: each call appends its ids (and loss labels) and returns the ids it added.
  render() is a loop of these calls over a whole conversation; a real-time session makes them as input
  arrives (omni_jax.serve.session), so both write the same markup.

    open(role)      <|im_start|> + "role\n" (encoded on its own)
    text(s)         content text (encoded as one run: join a message's consecutive text parts first)
    media_label(k)  the "Picture k: " / "Audio k: " text before a media part, when the format numbers media
                    ("" otherwise); call it once per media part, it counts them
    media(k, item)  bos + placeholders + eos of one preprocessed item
    close()         <|im_end|> (content) + "\n"
  train_on: roles whose content (+ <|im_end|>) carries labels.
  """

  def __init__(self, tokenizer, fmt: ChatFormat, train_on: Sequence[str] = ("assistant",)):
    self.tokenizer, self.fmt, self.train_on = tokenizer, fmt, tuple(train_on)
    self.ids: list[int] = []
    self.labels: list[int] = []
    self.kinds: list[str] = []
    self.spans: list[list[int]] = []
    self.role: Optional[str] = None
    self._counts = {"image": 0, "audio": 0, "video": 0}
    self._span_open = False

  def _add(self, ids: Sequence[int], content: bool) -> list[int]:
    ids = [int(i) for i in ids]
    if content and self.role == "assistant" and not self._span_open:
      self.spans.append([len(self.ids), len(self.ids)])
      self._span_open = True
    self.ids.extend(ids)
    self.labels.extend(ids if content and self.role in self.train_on else [IGNORE] * len(ids))
    return ids

  def open(self, role: str) -> list[int]:
    if role not in ROLES:
      raise ChatError(f"unknown role {role!r}; expected one of {ROLES}")
    self.role, self._span_open = role, False
    return self._add([self.fmt.id("<|im_start|>")], False) + self._add(self.tokenizer.encode(f"{role}\n"), False)

  def text(self, text: str) -> list[int]:
    return self._add(self.tokenizer.encode(text) if text else [], True)

  def media_label(self, kind: str) -> str:
    self._counts[kind] += 1
    return media_label(self.fmt, kind, self._counts[kind])

  def media(self, kind: str, item: MediaItem) -> list[int]:
    expected = {"image": ImageItem, "audio": AudioItem, "video": VideoItem}[kind]
    if not isinstance(item, expected):
      raise ChatError(f"media part {len(self.kinds)} is {kind!r} but its item is {type(item).__name__}")
    self.kinds.append(kind)
    return self._add(media_ids(item, self.fmt), False)

  def close(self) -> list[int]:
    out = self._add([self.fmt.id("<|im_end|>")], True)
    if self.role == "assistant":
      self.spans[-1][1] = len(self.ids)
    out += self._add(self.tokenizer.encode("\n"), False)
    self.role = None
    return out

  def rendered(self) -> Rendered:
    return Rendered(np.asarray(self.ids, np.int32), np.asarray(self.labels, np.int32), list(self.kinds),
                    [tuple(x) for x in self.spans])


def render(messages: Sequence[Mapping], media: Sequence[MediaItem], tokenizer, fmt: ChatFormat, *,
           add_generation_prompt: bool = False, train_on: Sequence[str] = ("assistant",)) -> Rendered:
  """Token ids and labels of a conversation (system turn already settled: see with_system).

  media: one preprocessed item per media part, in order of appearance; a part's kind must match its item.
  train_on: roles whose content (+ <|im_end|>) carries labels.
  """
  writer = ChatWriter(tokenizer, fmt, train_on)
  media = list(media)
  run: list[str] = []  # consecutive content text of one message, encoded as one string

  def flush():
    if run:
      writer.text("".join(run))
      run.clear()

  for i, m in enumerate(messages):
    role = m.get("role")
    if role not in ROLES:
      raise ChatError(f"message {i}: unknown role {role!r}; expected one of {ROLES}")
    writer.open(role)
    for part in content_parts(m.get("content")):
      kind = part.get("type") if isinstance(part, Mapping) else None
      if kind == "text":
        if not isinstance(part.get("text"), str):
          raise ChatError(f"message {i}: text part without a string 'text'")
        run.append(part["text"])
      elif kind in ("image", "audio", "video"):
        run.append(writer.media_label(kind))
        flush()
        if len(writer.kinds) >= len(media):
          raise ChatError(f"the conversation has more media parts than the {len(media)} items given")
        writer.media(kind, media[len(writer.kinds)])
      else:
        raise ChatError(f"message {i}: unknown content part type {kind!r}")
    flush()
    writer.close()
  if add_generation_prompt:
    writer.open("assistant")
  if len(writer.kinds) != len(media):
    raise ChatError(f"{len(media)} media items given for {len(writer.kinds)} media parts")
  return writer.rendered()

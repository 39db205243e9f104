"""OmniSession: one real-time conversation with an OmniChat model, its KV caches kept across turns.

    session = OmniSession(model, speaker="Chelsie")
    session.push_audio(chunk, 16000)          # as the user speaks: every 2 s are encoded and prefilled at once
    session.push_image("frame.jpg")           # media parts are encoded and prefilled when pushed
    session.push_text("What do you hear?")
    for event in session.respond(speak=True, max_new_tokens=128):
      ...                                     # Event("text" | "codes" | "audio" | "done", payload, t, ...)
    session.push_text("And now?")             # turn 2 appends to the same cache
    for event in session.respond(): ...

What is prefilled when (the cache grows left to right; each append is one jitted call):
  first push of a turn   `<|im_start|>user\\n` (the first turn also prefills the system turn first)
  push_text(s)           the tokens of s (each push is tokenised on its own; chat.render joins consecutive
                         text parts of a message into one string, so push a message's text in one piece)
  push_image / _video    bos + encoded placeholders + eos, in one call (a video is not split in time)
  push_audio(wave)       `<|audio_bos|>` at the first chunk, then every complete encoder chunk group (2 s at
                         n_window=100) as soon as its samples (+ 40 samples of STFT lookahead) are in; the
                         rest and `<|audio_eos|>` when the audio ends (final=True, another part, respond())
  respond()              `<|im_end|>\\n<|im_start|>assistant\\n`, whose last logits choose the first token;
                         then the reply in the conversation engine (omni_jax.generate.engine) on the same caches
So when the user stops, only the last audio chunk (< 2 s) and the turn's closing markup are left to prefill.

Limits: a push is counted whole before any of it is prefilled (a message with all its parts, the turn's
header and the closing markup respond() adds), as is a reply (the conversation + max_new_tokens); one that
would exceed the session's context_limit (its max_len cache, or the model's positions where fewer) raises
SessionContextLengthError (a SessionError and an omni_jax.generate.limits.ContextLengthError) whose
prompt_tokens is that whole count. With truncation (a retention ratio) the session first drops its oldest whole
turns (a user turn and its reply; never the system turn nor the turn in progress) until the conversation
fits and what follows the system turn holds at most that fraction of the context, and prefills what is kept
again in one call: the caches then equal a fresh session's given the kept turns. Each prefill pads its chunk
to chunk_multiple slots, so a conversation of many small chunks also runs out of cache slots before it runs
out of positions: that too is met by prefilling the conversation again in one chunk (and, with truncation,
dropping turns). Replies never hold the LM head's padding rows (ids the tokenizer lacks)
nor codes the Token2Wav cannot embed (omni_jax.generate.limits).

Exactness (tests/test_session.py): the chunks' positions are the whole-input TMRoPE ids. Chunk boundaries
sit on group boundaries (or inside an audio run, whose ids are consecutive), so each chunk's ids are its own
rope_index offset by where the previous chunk's last token left off (the audio-in-video "last block" rule never
crosses a chunk). The audio encoder attends within 2 s chunks and pools pairs inside them (n_window even), so
encoding 2 s at a time gives the whole audio's tokens. Log-mel features are the whole-utterance ones, frame
for frame, except the processor's dynamic-range floor (max - 8 in log10 units): here it is the max over the
audio seen so far, so frames more than 80 dB below a later, louder frame come out different.

Speech (speak=True): the Talker speaks while the Thinker writes (omni_jax.generate.engine): every prefill also
appends the Talker's prompt rows (H + E of each token) to a Talker cache with the same slots, so a reply starts
with the Talker's speaker and first-token rows after the Thinker's first step, and each loop iteration runs one
Thinker step and one Talker step (the Talker one text token behind). Codes stream out as decoded; audio chunks
come from the synthesizer (default_synthesizer: omni_jax.token2wav.streaming with BigVGAN, the whole reply at
its end with Griffin-Lim). respond_together(sessions) decodes several conversations in one loop (batched
sessions; docs/serving.md).
"""

import dataclasses
import logging
import os
import time
import uuid
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np

from omni_jax import errors
from omni_jax.generate import engine as engine_lib
from omni_jax.generate import limits
from omni_jax.generate import prompts
from omni_jax.generate.settings import reply_settings
from omni_jax.generate.text_stream import TextStream
from omni_jax.input import chat
from omni_jax.input import preprocess
from omni_jax.input.media import audio as audio_media
from omni_jax.input.media import audio_stream
from omni_jax.input.media import MediaError
from omni_jax.serve.events import Done, Event

log = logging.getLogger(__name__)



class SessionError(ValueError):
  """A request the session cannot serve (full cache, nothing to respond to, a model without a Talker...)."""


class SessionContextLengthError(SessionError, limits.ContextLengthError):
  """Input or a reply that would not fit the session: its cache (max_len) or the model's positions. Raised
  before anything of the push (or reply) is prefilled; prompt_tokens counts the whole conversation as it
  would stand, the pushed message whole and the markup respond() adds included."""


MEDIA_KINDS = ("images", "videos", "audios")


@dataclasses.dataclass(frozen=True)
class _TurnStart:
  """Where a user turn starts: its first token in the history, and the media parts before it (per MEDIA_KINDS)."""
  token: int
  media: tuple

  def shifted(self, tokens: int, media: tuple) -> "_TurnStart":
    return _TurnStart(self.token - tokens, tuple(a - b for a, b in zip(self.media, media)))


def check_truncation(ratio: Optional[float]) -> Optional[float]:
  """A truncation retention ratio in (0, 1], or None (no truncation)."""
  if ratio is None:
    return None
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
    raise SessionError(f"truncation must be a retention ratio in (0, 1] or None, got {ratio!r}")
  return float(ratio)


class _Audio(audio_stream.StreamingLogMel):
  """An audio part being streamed: its features (StreamingLogMel) and what of them is prefilled."""

  def __init__(self, num_mel_bins: int, chunk_samples: Optional[int]):
    super().__init__(num_mel_bins, chunk_samples)
    self.sent = 0  # blocks prefilled (a block of no token is not)
    self.tokens = 0  # AUDIO tokens prefilled


class OmniSession:
  """A real-time conversation with an OmniChat model (see the module doc): push input, respond() streams."""

  def __init__(self, model, *, speaker: Optional[str] = None, max_len: Optional[int] = None,
               system: Optional[str] = None, session_id: Optional[str] = None, chunk_multiple: int = 16,
               synthesizer: Optional[Callable[[], Any]] = None, speech: Optional[bool] = None,
               max_codes: Optional[int] = None, truncation: Optional[float] = None):
    """model: an OmniChat (omni_jax.generate.load). speaker: the Talker's voice (default_speaker if None).
    max_len: cache slots for the whole conversation (default config.generate.max_cache_len, else 4096).
    system: the system turn (default: config.data.system_prompt, else chat's default). chunk_multiple: chunk
    lengths are rounded up to it (padding slots are invalid in the cache; bounds compilations).
    synthesizer: () -> an object with push(codes) -> [audio chunks] and finish() -> [audio chunks] (the
    StreamingSynthesizer interface) for the audio events; default: default_synthesizer(model, speaker).
    speech: keep the Talker's prompt prefix as input arrives, so respond(speak=True) can start speaking with the
    reply's first tokens (default: the model has a Talker; False saves that compute for text-only use).
    max_codes: the most speech codes of one reply (default config.generate.talker.max_new_tokens, else 4096);
    the Talker's cache has max_len + 2 + max_codes slots. truncation: a conversation that would not fit drops
    its oldest whole turns and keeps at most this fraction (0 < r <= 1) of the context after the system turn
    (see the module doc); None raises SessionContextLengthError instead."""
    self.model, self.speaker, self.id = model, speaker, session_id or uuid.uuid4().hex
    g = model.generator
    self._g = g
    self.ids = g.ids
    generate_cfg = g.defaults
    self.max_len = int(max_len or generate_cfg.get("max_cache_len") or 4096)
    # Prompt + reply: the cache, and the model's positions where they are fewer.
    self.context_limit = limits.context_limit(model.config, cache_len=self.max_len)
    self.chunk_multiple = int(chunk_multiple)
    self.truncation = check_truncation(truncation)
    self.dropped_turns = 0  # turns truncation dropped so far
    pre = model.preprocessor
    self._pre, self._tok, self._fmt = pre, model.tokenizer, pre.fmt
    self.system = system if system is not None else (pre.system_prompt or chat.SYSTEM_DEFAULT)
    # The conversation's markup, written by the ChatML writer that renders whole conversations.
    w = chat.ChatWriter(self._tok, self._fmt)
    self._system_ids = w.open("system") + w.text(self.system) + w.close()
    self._user_header = w.open("user")
    self._close_ids = w.close() + w.open("assistant")  # what end_turn() prefills
    self._reply_end = w.close()  # what a reply owes the cache after its content
    self._projected = 0  # the conversation's tokens as the push being prefilled leaves it (with the close)
    self._synthesizer = synthesizer
    audio_cfg = model.config.model.thinker.get("audio")
    n_window = int(audio_cfg.n_window) if audio_cfg is not None else 100
    chunk_frames = 2 * n_window
    # Samples per streamed audio chunk: whole encoder chunks, about 2 s. An odd n_window pools pairs across
    # chunks, so such audio is only encoded when it ends.
    self._chunk_samples = (chunk_frames * max(1, 200 // chunk_frames) * audio_media.HOP_LENGTH
                           if n_window % 2 == 0 else None)
    has_talker = model.config.model.get("talker") is not None
    if speech and not has_talker:
      raise SessionError("OmniSession(speech=True): this model has no Talker (config.model.talker)")
    self.speech = has_talker if speech is None else bool(speech)
    if self.speech:
      speech_gen = model.speech
      self._talker_cfg = speech_gen.cfg
      self.max_codes = int(max_codes or speech_gen.defaults["max_new_tokens"])
    else:
      self._talker_cfg, self.max_codes = None, 0
    self._media = {"images": [], "videos": [], "audios": []}  # the conversation's media (for the Talker)
    self._aiv = False
    self.turn = 0
    self.input_closed_at: Optional[float] = None  # perf_counter() when the last respond() closed the input
    self.closed = False
    self.reset()

  # ------------------------------------------------------------------------------------------------ state

  def reset(self) -> None:
    """Forget the conversation (a fresh cache; compiled programs are kept)."""
    self._conv = self._engine().conversation()
    self._media, self._aiv = {"images": [], "videos": [], "audios": []}, False
    self._kinds: list[str] = []  # the conversation's media parts, in order ("Picture k" numbering)
    self._turns: list[_TurnStart] = []  # the user turns opened since the system turn (what truncation drops)
    self._in_turn = False
    self._awaiting = False  # the turn is closed (end_turn) and its reply not yet decoded
    self._audio: Optional[_Audio] = None
    self._pending: list[int] = []  # tokens owed to the cache before the next user turn (the reply's end)
    self.turn = 0

  def _engine(self, slots: int = 1, max_new_tokens: int = 1):
    """The model's conversation engine for this session's cache shapes (shared by its sessions)."""
    return self.model.engine(speech=self.speech, max_len=self.max_len, slots=slots,
                             max_new_tokens=engine_lib.bucket(max_new_tokens, 64), max_codes=self.max_codes)

  @property
  def _history(self) -> list[int]:
    return self._conv.history

  @property
  def _slots(self) -> int:
    return self._conv.slots

  @property
  def num_tokens(self) -> int:
    """Real tokens in the cache (the conversation so far)."""
    return len(self._history)

  @property
  def free_slots(self) -> int:
    return self.max_len - self._slots

  def close(self) -> None:
    """Release the cache (the session cannot be used afterwards)."""
    self._conv, self.closed = None, True

  def _check_open(self):
    if self.closed:
      raise SessionError(f"session {self.id} is closed")

  # ------------------------------------------------------------------------------------------------ prefill

  def _append(self, ids, media: Optional[Mapping] = None, aiv: bool = False) -> None:
    """Prefill `ids` (with the media they hold, preprocess.Sample lists) into the cache, one jitted call."""
    ids = [int(i) for i in ids]
    if not ids:
      return
    length = prompts.round_up(len(ids), self.chunk_multiple)  # prompt_batch's row length, known before any array
    if self._slots + length > self.max_len:
      # The tokens fit (checked when the input was pushed) but the chunks' padding does not.
      self._make_room(slots=length)
    if self._slots + length > self.max_len:
      raise SessionContextLengthError(
          max(self._projected, self.num_tokens + len(ids)), 0, self.context_limit, subject=f"session {self.id}",
          hint=f"the conversation needs {self._slots + length} cache slots (chunk padding included), more than "
               f"max_len={self.max_len} (OmniSession(max_len=...) or config.generate.max_cache_len)")
    self._prefill(ids, media, aiv)

  def _prefill(self, ids: list[int], media: Optional[Mapping], aiv: bool) -> None:
    media = media or {}
    sample = preprocess.Sample("session", 0, np.asarray(ids, np.int32), np.zeros(len(ids), np.int32),
                               list(media.get("images", ())), list(media.get("videos", ())),
                               list(media.get("audios", ())), aiv)
    batch = prompts.prompt_batch([sample], pad_id=self.ids.pad_token_id, length_multiple=self.chunk_multiple,
                                 num_mel_bins=self.model.num_mel_bins)
    batch = {k: v for k, v in batch.items() if k not in ("labels", "kind")}
    if not aiv:
      batch.pop("use_audio_in_video", None)
    self._engine().prefill(self._conv, batch, ids)
    for k in MEDIA_KINDS:
      self._media[k].extend(media.get(k, ()))
    self._aiv |= aiv

  # ------------------------------------------------------------------------------------------------ truncation

  def _make_room(self, tokens: int = 0, slots: int = 0) -> bool:
    """Prefill the conversation again in one chunk, without its oldest whole turns where truncation allows,
    so that it holds `tokens` fewer tokens and leaves `slots` cache slots free. Drops the fewest turns that
    also leave at most the truncation ratio of the context after the system turn (so that the next turns do
    not truncate again at once), else the fewest that fit. Returns False (nothing changed) when no choice fits.
    """
    if self._conv is None or self._conv.in_reply:
      return False
    h, turns = self._history, self._turns
    prefix = turns[0].token if turns else len(h)  # the system turn (or a pushed conversation) is always kept
    in_progress = 1 if (self._in_turn or self._awaiting) else 0
    droppable = max(0, len(turns) - in_progress) if self.truncation is not None else 0
    room = (self.context_limit or self.max_len) - prefix
    fits, chosen = None, None
    for drop in range(droppable + 1):
      dropped = (turns[drop].token if drop < len(turns) else len(h)) - prefix if drop else 0
      freed = dropped + (len(self._pending) if drop and drop == len(turns) else 0)
      kept = len(h) - dropped
      if freed < tokens or prompts.round_up(kept, self.chunk_multiple) + slots > self.max_len:
        continue
      fits = drop if fits is None else fits
      if self.truncation is None or kept - prefix <= self.truncation * room:
        chosen = drop
        break
    chosen = fits if chosen is None else chosen
    if chosen is None:
      return False
    self._rebuild(chosen)
    return True

  def _here(self) -> _TurnStart:
    """The end of the conversation so far: its tokens and media parts."""
    return _TurnStart(self.num_tokens, tuple(len(self._media[k]) for k in MEDIA_KINDS))

  def _rebuild(self, drop: int) -> None:
    """A fresh cache holding the conversation without its `drop` oldest turns, prefilled in one call (the
    engine computes its positions afresh: the kept turns sit where a fresh session would put them)."""
    h, turns = self._history, self._turns
    now = self._here()
    first = turns[0] if turns else now
    cut = (turns[drop] if drop < len(turns) else now) if drop else first
    ids = h[:first.token] + h[cut.token:]
    media = {k: self._media[k][:first.media[i]] + self._media[k][cut.media[i]:] for i, k in enumerate(MEDIA_KINDS)}
    gone = (cut.token - first.token, tuple(c - f for c, f in zip(cut.media, first.media)))
    log.info("session %s: prefilled again in one chunk of %d tokens (it took %d cache slots); its %d oldest "
             "turns (%d tokens) dropped", self.id, len(ids), self._slots, drop, gone[0])
    self._conv = self._engine().conversation()
    self._media = {k: [] for k in MEDIA_KINDS}
    self._prefill(ids, media, self._aiv)
    self._turns = [t.shifted(*gone) for t in turns[drop:]] if drop else turns
    if drop and drop == len(turns):  # the last reply is gone too: its end is owed to nothing
      self._pending = []
    self.dropped_turns += drop

  def _text_ids(self, text: str) -> list[int]:
    return [int(i) for i in self._tok.encode(text)] if text else []

  # ------------------------------------------------------------------------------------------------ limits

  def _turn_header(self) -> list[int]:
    """What opening the user's turn prefills (nothing inside a turn): the last reply's end, the system turn at
    the start, `<|im_start|>user\\n`."""
    if self._in_turn:
      return []
    ids = list(self._pending) + (list(self._system_ids) if not self._history else [])
    return ids + self._user_header

  def _audio_owed(self, more_samples: int = 0) -> int:
    """Tokens the open audio part still adds (its remaining AUDIO tokens and `<|audio_eos|>`) once
    more_samples more arrive; 0 when none is open. The chunks' tokens add up to the whole audio's count."""
    a = self._audio
    if a is None:
      return 0
    whole = int(audio_media.num_tokens(audio_media.num_frames(a.samples.shape[0] + more_samples)))
    return max(0, whole - a.tokens) + 1

  def _label_ids(self, kind: str, number: int) -> list[int]:
    """"Picture k: " / "Audio k: " when the chat format numbers media (add_vision_id / add_audio_id)."""
    return self._text_ids(chat.media_label(self._fmt, kind, number))

  def _check_fits(self, tokens: int, more_samples: int = 0) -> None:
    """SessionContextLengthError unless the conversation still fits once `tokens` more of this turn are in:
    with the turn's header, what an open audio part owes (more_samples: samples this push adds to it) and the
    markup end_turn() adds. Nothing is prefilled before this check."""
    total = self._projected_tokens(tokens, more_samples)
    limit = self.context_limit
    if limit is not None and total > limit and self._make_room(tokens=total - limit):
      total = self._projected_tokens(tokens, more_samples)
    self._projected = total
    limits.check_context(total, 0, limit=self.context_limit, subject=f"session {self.id}", hint=self._limit_hint(),
                         error=SessionContextLengthError)

  def _projected_tokens(self, tokens: int, more_samples: int = 0) -> int:
    return (self.num_tokens + len(self._turn_header()) + self._audio_owed(more_samples) + int(tokens)
            + len(self._close_ids))

  def _limit_hint(self) -> str:
    return (f"max_len={self.max_len} (OmniSession(max_len=...) or config.generate.max_cache_len), or the model's "
            "positions (config.model.thinker.text.max_position_embeddings) where fewer"
            + ("; OmniSession(truncation=...) drops the oldest turns instead" if self.truncation is None else
               "; dropping the older turns was not enough"))

  # ------------------------------------------------------------------------------------------------ prefill

  def _open_turn(self) -> None:
    """The user turn's header (after what the last reply owes, and the system turn at the start)."""
    if self._in_turn:
      return
    length = prompts.round_up(len(self._turn_header()), self.chunk_multiple)
    if self._slots + length > self.max_len:  # room first: dropping the last reply also drops what it owes
      self._make_room(slots=length)
    ids = self._turn_header()
    self._pending = []
    self._append(ids)
    self._turns.append(dataclasses.replace(self._here(), token=self.num_tokens - len(self._user_header)))
    self._in_turn = True

  def push_text(self, text: str) -> None:
    """Append text to the user's turn (prefilled now)."""
    self._check_open()
    if not isinstance(text, str):
      raise TypeError(f"push_text takes a str, got {type(text).__name__}")
    ids = self._text_ids(text)
    self._check_fits(len(ids))
    self._prefill_text(ids)

  def _prefill_text(self, ids: list[int]) -> None:
    self._end_audio()
    self._open_turn()
    self._append(ids)

  def _label(self, kind: str) -> None:
    self._kinds.append(kind)
    self._append(self._label_ids(kind, self._kinds.count(kind)))

  def _load_part(self, part: Mapping) -> tuple[list[int], dict, bool]:
    """An image / video part ({"type", "path"[, "use_audio_in_video"]}) preprocessed: (its ids without the
    label, its media lists, use_audio_in_video)."""
    media = {"images": [], "videos": [], "audios": []}
    aiv = bool(part.get("use_audio_in_video", False)) and part["type"] == "video"
    try:
      item = self._pre.load_part(part, aiv, f"session {self.id}", media)
    except preprocess.SampleError as e:
      raise SessionError(str(e)) from None
    return chat.media_ids(item, self._fmt), media, aiv

  def _push_media(self, kind: str, ids: list[int], media: Mapping, aiv: bool = False, checked: bool = False) -> None:
    """A preprocessed media part, labelled, prefilled whole (checked: its fit was counted with a message)."""
    if not checked:
      self._check_fits(len(self._label_ids(kind, self._kinds.count(kind) + 1)) + len(ids))
    self._end_audio()
    self._open_turn()
    self._label(kind)
    self._append(ids, media, aiv)

  def _push_part(self, part: Mapping) -> None:
    """An image / video part ({"type", "path"[, "use_audio_in_video"]}): preprocessed, prefilled whole."""
    self._push_media(part["type"], *self._load_part(part))

  def push_image(self, image: Any) -> None:
    """An image: a path, or an array / PIL image / encoded bytes (omni_jax.input.media.image.load_image)."""
    self._check_open()
    if isinstance(image, (str, os.PathLike)):
      return self._push_part({"type": "image", "path": image})
    from omni_jax.input.media import image as image_media  # noqa: PLC0415

    m = self._pre.options
    try:
      rows, grid = image_media.preprocess_image(image, min_pixels=m.image_min_pixels, max_pixels=m.image_max_pixels,
                                                merge_size=self._fmt.spatial_merge_size, budget=m.budget)
    except MediaError as e:
      raise SessionError(f"session {self.id}: {e}") from None
    item = chat.ImageItem(tuple(int(g) for g in grid))
    self._push_media("image", chat.media_ids(item, self._fmt), {"images": [(rows, grid)]})

  def push_video(self, video: Any, *, fps: Optional[float] = None, use_audio_in_video: bool = False) -> None:
    """A video: a file (frames sampled by config.data.media; use_audio_in_video interleaves its audio track),
    or decoded uint8 frames [F, H, W, 3] recorded at `fps` (a plain video: no audio track)."""
    self._check_open()
    if isinstance(video, (str, os.PathLike)):
      return self._push_part({"type": "video", "path": video, "use_audio_in_video": use_audio_in_video})
    if use_audio_in_video:
      raise SessionError("push_video: use_audio_in_video needs a file with an audio track, not decoded frames")
    if not fps or fps <= 0:
      raise SessionError(f"push_video: decoded frames need their recording rate fps > 0, got {fps!r}")
    from omni_jax.input.media import video as video_media  # noqa: PLC0415

    m = self._pre.options
    try:
      clip = video_media.preprocess_frames(video, float(fps), fps=m.video_fps, min_frames=m.video_min_frames,
                                           max_frames=m.video_max_frames, min_pixels=m.video_min_pixels,
                                           max_pixels=m.video_max_pixels, max_total_pixels=m.video_max_total_pixels,
                                           merge_size=self._fmt.spatial_merge_size)
    except MediaError as e:
      raise SessionError(f"session {self.id}: {e}") from None
    item = chat.VideoItem(tuple(int(g) for g in clip.grid_thw), float(clip.second_per_grid))
    self._push_media("video", chat.media_ids(item, self._fmt),
                     {"videos": [(clip.pixel_values, clip.grid_thw, float(clip.second_per_grid))]})

  def _wave(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono float32 samples at 16 kHz."""
    wave = np.asarray(wave, np.float32)
    if wave.ndim == 2:
      wave = wave.mean(axis=1)
    if wave.ndim != 1:
      raise SessionError(f"push_audio takes samples [n] or [n, channels], got shape {wave.shape}")
    if sample_rate != audio_media.SAMPLE_RATE:
      # Resampling per push is exact only at whole-period boundaries; resample whole audios for exactness.
      wave = audio_media.resample(wave, int(sample_rate))
    return wave

  def _audio_tokens(self, num_samples: int, number: int) -> int:
    """The tokens of a whole new audio part, the conversation's number-th: its label, `<|audio_bos|>`, AUDIO
    tokens, `<|audio_eos|>`."""
    label = self._label_ids("audio", number)
    return len(label) + 2 + int(audio_media.num_tokens(audio_media.num_frames(num_samples)))

  def push_audio(self, wave: np.ndarray, sample_rate: int = audio_media.SAMPLE_RATE, *, final: bool = False) -> None:
    """Samples of the user's audio (mono or [n, channels]); consecutive pushes continue one audio part until
    final=True, another part or respond(). Each complete 2 s is encoded and prefilled at once."""
    self._check_open()
    wave = self._wave(wave, sample_rate)
    if self._audio is None:
      self._check_fits(self._audio_tokens(wave.shape[0], self._kinds.count("audio") + 1))
    else:
      self._check_fits(0, more_samples=wave.shape[0])
    self._prefill_audio(wave, final)

  def _prefill_audio(self, wave: np.ndarray, final: bool) -> None:
    if self._audio is None:
      self._open_turn()
      self._label("audio")
      self._audio = _Audio(self.model.num_mel_bins, self._chunk_samples)
      self._append([self._fmt.id("<|audio_bos|>")])
    for block in self._audio.push(wave):
      self._prefill_block(block)
    if final:
      self._end_audio()

  def _prefill_block(self, block: np.ndarray) -> None:
    """Prefill the AUDIO tokens of a feature block. Frames already in the cache keep their floor, so the
    Talker's prompt sees what the Thinker saw."""
    a = self._audio
    n = int(audio_media.num_tokens(block.shape[1]))
    if n:  # a last piece of 1-2 frames yields no token (the whole audio's count agrees)
      self._append([self.ids.audio_token_id] * n, {"audios": [block]})
      a.sent += 1
      a.tokens += n

  def _end_audio(self) -> None:
    a = self._audio
    if a is None:
      return
    block = a.finish()
    if block is not None:
      self._prefill_block(block)
    self._audio = None
    frames = a.features()
    if frames.shape[1] == 0:
      raise SessionError(f"session {self.id}: the pushed audio is empty")
    # The Talker's prompt (and history bookkeeping) sees one audio item: drop the per-chunk blocks.
    self._media["audios"] = self._media["audios"][:len(self._media["audios"]) - a.sent] + [frames]
    self._append([self._fmt.id("<|audio_eos|>")])

  def end_audio(self) -> None:
    """End the audio part being streamed now (its last chunk and `<|audio_eos|>` are prefilled), as the next
    part or respond() would; nothing happens without one."""
    self._check_open()
    self._end_audio()

  def push_message(self, message: Mapping) -> None:
    """A user message in OmniChat's content-part format: {"role": "user", "content": str | [parts]}; parts
    {"type": "text", "text"}, {"type": "image" | "audio" | "video", "path"} (video: "use_audio_in_video"),
    or {"type": "audio", "array": samples, "sample_rate": sr}. Every part is read and counted first: a message
    that would not fit raises SessionContextLengthError with nothing of it prefilled."""
    self._check_open()
    role = message.get("role", "user")
    if role != "user":
      raise SessionError(f"push_message: only user messages are pushed (got role {role!r}); the session writes the "
                         "assistant's turns itself")
    steps, tokens = [], 0
    numbers = {k: self._kinds.count(k) for k in ("image", "audio", "video")}
    for part in chat.content_parts(message.get("content")):
      kind = part.get("type") if isinstance(part, Mapping) else None
      if kind == "text":
        ids = self._text_ids(part["text"])
        tokens += len(ids)
        steps.append(lambda ids=ids: self._prefill_text(ids))
        continue
      if kind not in ("image", "audio", "video"):
        raise SessionError(f"push_message: unknown content part type {kind!r}")
      numbers[kind] += 1
      if kind == "audio":
        if "array" in part:
          wave = self._wave(part["array"], int(part.get("sample_rate", audio_media.SAMPLE_RATE)))
        else:
          try:
            wave = audio_media.load_audio(part["path"], budget=self._pre.options.budget)
            wave = self._wave(wave, audio_media.SAMPLE_RATE)
          except (MediaError, OSError) as e:
            raise SessionError(f"session {self.id}: {e}") from None
        tokens += self._audio_tokens(wave.shape[0], numbers[kind])
        # Its own part: an audio streamed before the message ends first.
        steps.append(lambda wave=wave: (self._end_audio(), self._prefill_audio(wave, final=True)))
      else:
        ids, media, aiv = self._load_part(part)
        tokens += len(self._label_ids(kind, numbers[kind])) + len(ids)
        steps.append(lambda kind=kind, ids=ids, media=media, aiv=aiv: self._push_media(kind, ids, media, aiv, True))
    self._check_fits(tokens)
    for step in steps:
      step()

  def push_conversation(self, messages) -> None:
    """A whole conversation so far (system, user and assistant turns, rendered as OmniChat renders them, its
    assistant header included) prefilled in one call on a fresh session; respond() answers its last turn."""
    self._check_open()
    if self._history:
      raise SessionError(f"session {self.id}: push_conversation needs a fresh session")
    try:
      sample = prompts.prompt_sample(list(messages), self._pre, name=f"session {self.id}")
    except preprocess.SampleError as e:
      raise SessionError(str(e)) from None
    self._projected = sample.num_tokens
    limits.check_context(sample.num_tokens, 0, limit=self.context_limit, subject=f"session {self.id}",
                         hint=self._limit_hint(), error=SessionContextLengthError)
    self._append(sample.input_ids, {"images": sample.images, "videos": sample.videos, "audios": sample.audios},
                 bool(sample.use_audio_in_video))
    self._awaiting = True
    self.input_closed_at = time.perf_counter()

  # ------------------------------------------------------------------------------------------------ respond

  def end_turn(self) -> np.ndarray:
    """Close the user's turn: prefill what is left and the assistant header. Returns the first token's
    logits [V] (float32). respond() calls it (or, called first, decodes from where it left off)."""
    self._check_open()
    if not self._in_turn:
      raise SessionError(f"session {self.id}: nothing to respond to (push the user's input first)")
    self._end_audio()
    self._append(self._close_ids)
    self._in_turn = False
    self._awaiting = True  # respond() decodes from here
    self.input_closed_at = time.perf_counter()
    return np.asarray(self._conv.logits)[0]

  def prompt_sample(self) -> preprocess.Sample:
    """The conversation so far as one prompt (what OmniChat would render for it; the Talker's prompt)."""
    m = self._media
    kinds = {"audio" if self._media["audios"] else None, "image" if m["images"] else None,
             "video" if m["videos"] else None} - {None}
    kind = preprocess.sample_kind([{"content": [{"type": k} for k in kinds]}])
    ids = np.asarray(self._history, np.int32)
    return preprocess.Sample(f"session {self.id}", kind, ids, np.zeros_like(ids), list(m["images"]),
                             list(m["videos"]), list(m["audios"]), self._aiv)

  def respond(self, *, speak: bool = False, max_new_tokens: Optional[int] = None, seed: Optional[int] = None,
              speaker: Optional[str] = None, talker: Optional[Mapping] = None, **sampling) -> Iterator[Event]:
    """Close the user's turn and stream the reply: "text" events as the Thinker decodes; with speak (a model
    with a Talker) "codes" events as the Talker decodes, from the reply's first token on, and "audio" events
    from the synthesizer; "done" last.

    max_new_tokens, seed and the sampling keys (do_sample, temperature, top_k, top_p, repetition_penalty)
    default to config.generate, as OmniChat.chat; talker: the same keys for the codes (config.generate.talker),
    and max_new_tokens (at most the session's max_codes), seed, stop_ids (() runs to max_new_tokens: benchmarks).
    """
    for _, event in respond_together([self], speak=speak, max_new_tokens=max_new_tokens, seed=seed,
                                     speakers=[speaker], talker=talker, **sampling):
      yield event

  def _reply_needs(self) -> Optional[tuple[int, int]]:
    """(the prompt's tokens once the turn is closed, the cache slots closing it still takes: the open audio's
    last chunk and end, the assistant header); None when there is nothing to respond to."""
    if self._in_turn:
      owed = self._audio_owed()
      padded = lambda n: prompts.round_up(n, self.chunk_multiple) if n > 0 else 0  # noqa: E731
      slots = (padded(owed - 1) + padded(1) if owed else 0) + padded(len(self._close_ids))
      return self.num_tokens + owed + len(self._close_ids), slots
    if self._awaiting:
      return self.num_tokens, 0
    return None

  def _check_reply(self, max_new_tokens: int) -> None:
    """SessionContextLengthError unless the conversation, its turn closed, and max_new_tokens fit, in tokens
    and in cache slots (truncation makes room first; a session with nothing to respond to is left to
    end_turn's error). A reply whose tokens do not fit leaves the turn open; one whose tokens fit but whose
    chunks' padding does not has its turn closed first, and the conversation prefilled again in one chunk."""
    needs = self._reply_needs()
    if needs is None:
      return
    prompt, slots = needs
    over = prompt + max_new_tokens - self.context_limit if self.context_limit is not None else 0
    if over > 0 and self._make_room(tokens=over, slots=slots + max_new_tokens):
      prompt, slots = self._reply_needs()
    limits.check_context(prompt, max_new_tokens, limit=self.context_limit, subject=f"session {self.id}",
                         hint=self._limit_hint(), error=SessionContextLengthError)
    if self._slots + slots + max_new_tokens <= self.max_len:
      return
    if self._in_turn:
      self.end_turn()
    if self._slots + max_new_tokens > self.max_len:
      self._make_room(slots=max_new_tokens)
    if self._slots + max_new_tokens > self.max_len:
      raise SessionContextLengthError(
          prompt, max_new_tokens, self.context_limit, subject=f"session {self.id}",
          hint=f"the reply needs {self._slots + max_new_tokens} cache slots (chunk padding included), more than "
               f"max_len={self.max_len}")

  def _after_reply(self, reply) -> tuple[np.ndarray, bool]:
    """The session's bookkeeping once the engine released its reply (caches, history and positions are the
    engine's): (the reply's ids, whether it ended with a stop id). The reply's end is owed to the cache."""
    tokens = np.asarray(reply.tokens, np.int32)
    stop = len(tokens) > 0 and int(tokens[-1]) in self.model.stop_ids
    self._pending = ([] if stop else [int(tokens[-1])]) + self._reply_end
    self.turn += 1
    return tokens, stop

  def _text(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids if int(i) not in self.model.stop_ids])

  def _make_synthesizer(self, speaker):
    if self._synthesizer is not None:
      return self._synthesizer()
    return default_synthesizer(self.model, speaker)


class _Row:
  """One session's reply while the engine decodes it: its text stream, its codes, its synthesizer, its timings."""

  def __init__(self, session: OmniSession, synth, stop_ids: frozenset):
    self.session, self.synth, self.stop_ids = session, synth, stop_ids
    self.turn, self.t0 = session.turn, session.input_closed_at
    self.prompt_tokens = session.num_tokens
    self.stream = TextStream(session._tok.decode, session.model.stop_ids)
    self.codes_done = False
    self.timings: dict = {}

  def event(self, kind, payload) -> Event:
    e = Event.now(kind, payload, session=self.session.id, turn=self.turn)
    if kind != "done":
      self.timings.setdefault("first_" + kind, e.t - self.t0)
    return e

  def add_token(self, token: int) -> list[Event]:
    piece = self.stream.add(token)
    return [self.event("text", piece)] if piece else []

  def add_code(self, code: int) -> list[Event]:
    if self.codes_done:
      return []
    self.codes_done = code in self.stop_ids
    if code in self.stop_ids:
      return []
    chunk = np.asarray([code], np.int32)
    out = [self.event("codes", chunk)]
    if self.synth is not None:
      out += [self.audio(a) for a in self.synth.push(chunk)]
    return out

  def audio(self, audio) -> Event:
    audio = np.asarray(audio, np.float32).reshape(-1)
    self.timings["audio_seconds"] = self.timings.get("audio_seconds", 0.0) + audio.shape[0] / 24000
    return self.event("audio", audio)


def respond_together(sessions, *, speak: bool = False, max_new_tokens: Optional[int] = None,
                     seed: Optional[int] = None, speakers=None, talker: Optional[Mapping] = None,
                     **sampling) -> Iterator[tuple[int, Event]]:
  """Batched sessions: the replies of several conversations with one model, decoded together in the engine's
  slots (omni_jax.generate.engine). Yields (index into sessions, Event) as any row produces it; each session's
  events, and its state after the reply, are what its own respond() gives (same arguments; speakers: one
  voice per session, None for the session's own): every row keeps its own cache index, positions and keys.
  A consumer that stops early ends the replies where they are (the caches keep what was decoded)."""
  sessions = list(sessions)
  if not sessions:
    raise ValueError("respond_together: no sessions")
  replies = start_replies(sessions, speak=speak, max_new_tokens=max_new_tokens, seed=seed, speakers=speakers,
                          talker=talker, **sampling)
  engine = replies[0].engine
  index = {id(r.reply): i for i, r in enumerate(replies)}
  ended = False
  try:
    for reply, kind, value in engine.run([r.reply for r in replies]):
      i = index.get(id(reply))
      if i is not None:
        for e in replies[i].on(kind, value):
          yield i, e
    ended = True
  finally:
    if not ended:  # a consumer that stopped early (a dropped client), or a failed call
      for r in replies:
        r.abort()
  ends = [r.end() for r in replies]  # the sessions' bookkeeping before any yield: a consumer may stop
  for i, (r, end) in enumerate(zip(replies, ends)):
    for e in r.final_events(*end):
      yield i, e


class SessionReply:
  """One session's reply in an engine: its engine.Reply, and the events it makes as the engine decodes it."""

  def __init__(self, session: OmniSession, reply: engine_lib.Reply, engine: engine_lib.Engine, synth,
               stop_ids: tuple):
    self.session, self.reply, self.engine, self.stop_ids = session, reply, engine, stop_ids
    self.row = _Row(session, synth, frozenset(stop_ids))
    self.ended = False  # the session's bookkeeping is done

  def on(self, kind: str, value: int) -> list[Event]:
    """The events of one decoded token or code."""
    return self.row.add_token(value) if kind == "token" else self.row.add_code(value)

  def abort(self, keep_tokens: Optional[int] = None) -> None:
    """End the reply where it is (a dropped client, barge-in): the cache keeps what was decoded, or its first
    keep_tokens tokens (what the listener was sent), and the session goes on; a reply whose caches went down
    with a failed call closes its session."""
    s = self.session
    self.engine.cancel(self.reply, keep_tokens)
    if s._conv.cache is None:
      s.close()
    elif self.reply.tokens:
      s._after_reply(self.reply)
      self.ended = True
    else:  # cancelled before its first token: the assistant's turn closes empty
      s._pending = list(s._reply_end)

  def end(self) -> tuple[np.ndarray, bool]:
    """The session's bookkeeping once the engine released the reply: (its ids, whether a stop id ended it)."""
    if self.ended:
      tokens = np.asarray(self.reply.tokens, np.int32)
      return tokens, len(tokens) > 0 and int(tokens[-1]) in self.session.model.stop_ids
    self.ended = True
    return self.session._after_reply(self.reply)

  def final_events(self, tokens: np.ndarray, stop: bool) -> Iterator[Event]:
    """What is left once the reply ended: the held-back text, the synthesizer's last audio, "done"."""
    row, reply = self.row, self.reply
    piece = row.stream.finish()
    if piece:
      yield row.event("text", piece)
    codes = None
    if reply.settings.speak:
      codes = np.asarray(reply.codes, np.int32)
      if len(codes) and int(codes[-1]) in self.stop_ids:
        codes = codes[:-1]
      if row.synth is not None:
        for a in row.synth.finish():
          yield row.audio(a)
    row.timings["end"] = time.perf_counter() - row.t0
    yield row.event("done", Done(row.stream.text, tokens, "stop" if stop else "length", row.prompt_tokens, codes,
                                 row.timings))


def start_replies(sessions, engine=None, *, speak: bool = False, max_new_tokens: Optional[int] = None,
                  seed: Optional[int] = None, speakers=None, talker: Optional[Mapping] = None,
                  **sampling) -> list[SessionReply]:
  """Close the sessions' turns and submit their replies to `engine` (default: the model's engine with a slot
  per session; respond_together's arguments); the caller drives the engine (SessionReply.engine) and routes
  its events to SessionReply.on."""
  first = sessions[0]
  g = first._g
  if any(s.model is not first.model for s in sessions):
    raise SessionError("respond_together: the sessions belong to different models")
  if len({(s.max_len, s.speech, s.max_codes) for s in sessions}) > 1:
    raise SessionError("respond_together: the sessions differ in max_len, speech or max_codes (cache shapes)")
  if speak and not first.speech:
    why = "this model has no Talker (config.model.talker)" if first.model.config.model.get("talker") is None \
        else "the session was opened with speech=False"
    raise SessionError(f"respond(speak=True): {why}")
  speakers = list(speakers) if speakers is not None else [None] * len(sessions)
  if len(speakers) != len(sessions):
    raise ValueError(f"{len(speakers)} speakers for {len(sessions)} sessions")
  talker_settings = first.model.speech if speak else None
  options = dict(sampling, max_new_tokens=max_new_tokens, seed=seed)
  try:
    settings = reply_settings(g, options, talker=talker_settings, talker_options=talker or {},
                              max_codes=first.max_codes if speak else None)
    speaker_ids = (talker_settings.speaker_tokens([name or s.speaker for name, s in zip(speakers, sessions)],
                                                  len(sessions)) if speak else [0] * len(sessions))
  except (ValueError, errors.ConfigError) as e:
    raise SessionError(str(e)) from None
  n_new = settings.max_new_tokens
  engine = engine or first._engine(slots=engine_lib.bucket(len(sessions), 1), max_new_tokens=n_new)
  if n_new > engine.max_new_tokens:
    raise SessionError(f"max_new_tokens must be at most {engine.max_new_tokens} here, got {n_new}")
  for s in sessions:
    s._check_open()
  for s in sessions:  # before the turns are closed: nothing is prefilled for a reply that cannot fit
    s._check_reply(n_new)
  for s in sessions:
    if not s._awaiting or s._in_turn:
      s.end_turn()
    s._awaiting = False
  out = []
  for s, name, token in zip(sessions, speakers, speaker_ids):
    reply = engine_lib.Reply(s._conv, dataclasses.replace(settings, speaker=int(token)))
    out.append(SessionReply(s, engine.submit(reply), engine,
                            s._make_synthesizer(name or s.speaker) if speak else None, settings.stop))
  return out


def default_synthesizer(model, speaker: Optional[str]):
  """How a reply's codes become audio events, for a model with Token2Wav (else None: codes only): the synthesizer
  of omni_jax.token2wav.synthesis for the model's vocoder. A model that cannot voice the speaker (no cond /
  ref_mel) logs why and streams codes only."""
  if not model.has_token2wav:
    return None
  from omni_jax.token2wav import synthesis  # noqa: PLC0415
  from omni_jax.token2wav import voice as voice_lib  # noqa: PLC0415

  try:
    return synthesis.synthesizer_for(model.voicer, speaker)
  except voice_lib.VoiceError as e:
    log.warning("speech codes only, no audio: %s", e)
    return None

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
                         then the reply loop (omni_jax.generate.duplex) on the same caches
So when the user stops, only the last audio chunk (< 2 s) and the turn's closing markup are left to prefill.

Limits: a push is counted whole before any of it is prefilled (a message with all its parts, the turn's
header and the closing markup respond() adds), as is a reply (the conversation + max_new_tokens); one that
would exceed the session's context_limit (its max_len cache, or the model's positions where fewer) raises
SessionContextLengthError (a SessionError and an omni_jax.generate.limits.ContextLengthError) whose
prompt_tokens is that whole count. Replies never hold the LM head's padding rows (ids the tokenizer lacks)
nor codes the Token2Wav cannot embed (omni_jax.generate.limits).

Exactness (tests/test_session.py): the chunks' positions are the whole-input TMRoPE ids. Chunk boundaries
sit on group boundaries (or inside an audio run, whose ids are consecutive), so each chunk's ids are its own
rope_index offset by where the previous chunk's last token left off (pitfall 2's "last block" rule never
crosses a chunk). The audio encoder attends within 2 s chunks and pools pairs inside them (n_window even), so
encoding 2 s at a time gives the whole audio's tokens. Log-mel features are the whole-utterance ones, frame
for frame, except the processor's dynamic-range floor (max - 8 in log10 units): here it is the max over the
audio seen so far, so frames more than 80 dB below a later, louder frame come out different.

Speech (speak=True): the Talker speaks while the Thinker writes (omni_jax.generate.duplex): every prefill also
appends the Talker's prompt rows (H + E of each token) to a Talker cache with the same slots, so a reply starts
with the Talker's speaker and first-token rows after the Thinker's first step, and each loop iteration runs one
Thinker step and one Talker step (the Talker one text token behind). Codes stream out as decoded; audio chunks
come from the synthesizer (default_synthesizer: omni_jax.token2wav.streaming with BigVGAN, the whole reply at
its end with Griffin-Lim). respond_together(sessions) decodes several conversations in one loop (batched
sessions; docs/serving.md).
"""

import logging
import os
import queue
import threading
import time
import uuid
import weakref
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni_jax import config as config_lib
from omni_jax import sharding
from omni_jax.generate import decode
from omni_jax.generate import duplex
from omni_jax.generate import limits
from omni_jax.generate import prompts
from omni_jax.generate.sampling import SamplingParams
from omni_jax.input import chat
from omni_jax.input import preprocess
from omni_jax.input.media import audio as audio_media
from omni_jax.input.media import MediaError
from omni_jax.serve.events import Done, Event
from omni_jax.train import step as step_lib

log = logging.getLogger(__name__)

_SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
_LOOKAHEAD = 40  # samples past a 2 s chunk its last STFT frame (centred, 400 wide) reads
_CONTEXT = 2 * audio_media.HOP_LENGTH  # samples before a chunk: its first frame's left half, hop-aligned


_PROGRAMS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # Generator -> {key: jitted program}


class SessionError(ValueError):
  """A request the session cannot serve (full cache, nothing to respond to, a model without a Talker...)."""


class SessionContextLengthError(SessionError, limits.ContextLengthError):
  """Input or a reply that would not fit the session: its cache (max_len) or the model's positions. Raised
  before anything of the push (or reply) is prefilled; prompt_tokens counts the whole conversation as it
  would stand, the pushed message whole and the markup respond() adds included."""


def _chunk_prefill(graphdef: nnx.GraphDef, ids: config_lib.TokenIds, mesh, rules, talker: bool):
  """jit: (params, cache, talker cache, chunk batch, offset, last, top) -> (cache, talker cache, logits [1, V]
  of token `last`, next offset, top).

  positions: the chunk's own TMRoPE ids + offset (where the previous chunk's last token left off); next
  offset = the chunk's last real position + 1; top = its largest position (any row): decode starts at top + 1.
  talker: also append the chunk's Talker prompt rows (H + E, omni_jax.generate.duplex) to the Talker's cache.
  """

  def fn(params, cache, talker_cache, batch, offset, last, top):
    model = nnx.merge(graphdef, params)
    thinker = model.thinker
    with sharding.activate(mesh, rules):
      positions, media = step_lib.model_inputs(batch, ids)
      positions = positions + offset
      valid = batch["segment_ids"] > 0
      embeds = thinker.embed_inputs(batch["input_ids"], **media)
      hidden, cache = thinker.model(embeds, positions, batch["segment_ids"], cache)
      logits = thinker.logits(hidden[:, last][:, None])[:, 0].astype(jnp.float32)
      top = jnp.maximum(top, jnp.where(valid[None], positions, -1).max())
      if talker:
        rows = duplex.talker_rows(model, batch["input_ids"], embeds, hidden)
        talker_cache = duplex.talker_prefill(model, rows, positions, batch["segment_ids"], talker_cache)
    return cache, talker_cache, logits, positions[0, 0, last] + 1, top

  return jax.jit(fn, donate_argnums=(1, 2))


class _Audio:
  """An audio part being streamed: its 16 kHz samples and the feature frames already encoded."""

  def __init__(self):
    self.samples = np.zeros((0,), np.float32)
    self.frames: list[np.ndarray] = []  # [mels, n] blocks, in order
    self.encoded = 0  # samples covered by the encoded frames
    self.sent = 0  # blocks prefilled (a block of no token is not)
    self.tokens = 0  # AUDIO tokens prefilled
    self.floor = audio_media.LOG_FLOOR  # the running max of the raw log10 features (the processor's floor - 8)

  @property
  def num_frames(self) -> int:
    return sum(f.shape[1] for f in self.frames)


class OmniSession:
  """A real-time conversation with an OmniChat model (see the module doc): push input, respond() streams."""

  def __init__(self, model, *, speaker: Optional[str] = None, max_len: Optional[int] = None,
               system: Optional[str] = None, session_id: Optional[str] = None, chunk_multiple: int = 16,
               synthesizer: Optional[Callable[[], Any]] = None, speech: Optional[bool] = None,
               max_codes: Optional[int] = None):
    """model: an OmniChat (omni_jax.generate.load). speaker: the Talker's voice (default_speaker if None).
    max_len: cache slots for the whole conversation (default config.generate.max_cache_len, else 4096).
    system: the system turn (default: config.data.system_prompt, else chat's default). chunk_multiple: chunk
    lengths are rounded up to it (padding slots are invalid in the cache; bounds compilations).
    synthesizer: () -> an object with push(codes) -> [audio chunks] and finish() -> [audio chunks] (the
    StreamingSynthesizer interface) for the audio events; default: default_synthesizer(model, speaker).
    speech: keep the Talker's prompt prefix as input arrives, so respond(speak=True) can start speaking with the
    reply's first tokens (default: the model has a Talker; False saves that compute for text-only use).
    max_codes: the most speech codes of one reply (default config.generate.talker.max_new_tokens, else 4096);
    the Talker's cache has max_len + 2 + max_codes slots."""
    self.model, self.speaker, self.id = model, speaker, session_id or uuid.uuid4().hex
    g = model.generator
    self._g = g
    self.ids = g.ids
    generate_cfg = g.defaults
    self.max_len = int(max_len or generate_cfg.get("max_cache_len") or 4096)
    # Prompt + reply: the cache, and the model's positions where they are fewer.
    self.context_limit = limits.context_limit(model.config, cache_len=self.max_len)
    self.chunk_multiple = int(chunk_multiple)
    pre = model.preprocessor
    self._pre, self._tok, self._fmt = pre, model.tokenizer, pre.fmt
    self.system = system if system is not None else (pre.system_prompt or chat.SYSTEM_DEFAULT)
    self._system_ids = chat.render([{"role": "system", "content": self.system}], [], self._tok,
                                   self._fmt).input_ids.tolist()
    # What end_turn() prefills: the user's turn closed, the assistant's opened.
    self._close_ids = ([self._fmt.id("<|im_end|>")] + self._text_ids("\n") + [self._fmt.id("<|im_start|>")]
                       + self._text_ids("assistant\n"))
    self._projected = 0  # the conversation's tokens as the push being prefilled leaves it (with the close)
    self._synthesizer = synthesizer
    audio_cfg = model.config.model.thinker.get("audio")
    n_window = int(audio_cfg.n_window) if audio_cfg is not None else 100
    chunk_frames = 2 * n_window
    # Samples per streamed audio chunk: whole encoder chunks, about 2 s. An odd n_window pools pairs across
    # chunks, so such audio is only encoded when it ends.
    self._chunk_samples = (chunk_frames * max(1, 200 // chunk_frames) * audio_media.HOP_LENGTH
                           if n_window % 2 == 0 else None)
    cache_dtype = generate_cfg.get("cache_dtype")
    cache_dtype = config_lib.dtype_of(cache_dtype, "generate.cache_dtype") if cache_dtype else None
    self._cache_dtype = cache_dtype
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
    # Compiled programs are the model's, shared by all its sessions (a server opens one per conversation).
    self._programs = _PROGRAMS.setdefault(g, {})
    self._history: list[int] = []  # every real token in the cache, in order
    self._media = {"images": [], "videos": [], "audios": []}  # the conversation's media (for the Talker)
    self._aiv = False
    self.turn = 0
    self.input_closed_at: Optional[float] = None  # perf_counter() when the last respond() closed the input
    self.closed = False
    self.reset()

  # ------------------------------------------------------------------------------------------------ state

  def reset(self) -> None:
    """Forget the conversation (a fresh cache; compiled programs are kept)."""
    self._cache = self._empty_cache(1, self.max_len)
    self._talker_cache = self._empty_cache(2, self.max_len + 2 + self.max_codes) if self.speech else None
    self._offset = jnp.zeros((), jnp.int32)  # where the next chunk's positions start
    self._top = jnp.full((), -1, jnp.int32)  # the largest position so far
    self._logits = None
    self._history, self._media, self._aiv = [], {"images": [], "videos": [], "audios": []}, False
    self._kinds: list[str] = []  # the conversation's media parts, in order ("Picture k" numbering)
    self._slots = 0  # cache slots used (padding included)
    self._in_turn = False
    self._awaiting = False  # the turn is closed (end_turn) and its reply not yet decoded
    self._audio: Optional[_Audio] = None
    self._pending: list[int] = []  # tokens owed to the cache before the next user turn (the reply's end)
    self.turn = 0

  def _empty_cache(self, which: int, length: int):
    """An empty cache of the Thinker (which=1) or the Talker (2) decoder, [1, length] slots."""
    key = ("cache", which, length, str(self._cache_dtype))
    if key not in self._programs:
      g = self._g
      model = nnx.merge(g.graphdef, g.params)  # its sizes only: no parameter enters the program
      decoder = model.thinker.model if which == 1 else model.talker.model

      def make():
        with sharding.activate(g.mesh, g.rules):
          return decode.sharded_cache(decoder, 1, length, self._cache_dtype)

      self._programs[key] = jax.jit(make)
    return self._programs[key]()

  @property
  def num_tokens(self) -> int:
    """Real tokens in the cache (the conversation so far)."""
    return len(self._history)

  @property
  def free_slots(self) -> int:
    return self.max_len - self._slots

  def close(self) -> None:
    """Release the cache (the session cannot be used afterwards)."""
    self._cache, self._talker_cache, self._logits, self.closed = None, None, None, True

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
      raise SessionContextLengthError(
          max(self._projected, self.num_tokens + len(ids)), 0, self.context_limit, subject=f"session {self.id}",
          hint=f"the conversation needs {self._slots + length} cache slots (chunk padding included), more than "
               f"max_len={self.max_len} (OmniSession(max_len=...) or config.generate.max_cache_len)")
    media = media or {}
    sample = preprocess.Sample("session", 0, np.asarray(ids, np.int32), np.zeros(len(ids), np.int32),
                               list(media.get("images", ())), list(media.get("videos", ())),
                               list(media.get("audios", ())), aiv)
    batch = prompts.prompt_batch([sample], pad_id=self.ids.pad_token_id, length_multiple=self.chunk_multiple,
                                 num_mel_bins=self.model.num_mel_bins)
    batch = {k: v for k, v in batch.items() if k not in ("labels", "kind")}
    if not aiv:
      batch.pop("use_audio_in_video", None)
    length = batch["input_ids"].shape[1]
    key = ("prefill", self.speech, tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items())))
    if key not in self._programs:
      g = self._g
      self._programs[key] = _chunk_prefill(g.graphdef, self.ids, g.mesh, g.rules, self.speech)
    g = self._g
    self._cache, self._talker_cache, self._logits, self._offset, self._top = self._programs[key](
        g.params, self._cache, self._talker_cache, batch, self._offset, np.int32(length - 1), self._top)
    self._slots += length
    self._history.extend(ids)
    for k in ("images", "videos", "audios"):
      self._media[k].extend(media.get(k, ()))
    self._aiv |= aiv

  def _text_ids(self, text: str) -> list[int]:
    return [int(i) for i in self._tok.encode(text)] if text else []

  # ------------------------------------------------------------------------------------------------ limits

  def _turn_header(self) -> list[int]:
    """What opening the user's turn prefills (nothing inside a turn): the last reply's end, the system turn at
    the start, `<|im_start|>user\\n`."""
    if self._in_turn:
      return []
    ids = list(self._pending) + (list(self._system_ids) if not self._history else [])
    return ids + [self._fmt.id("<|im_start|>")] + self._text_ids("user\n")

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
    fmt = self._fmt
    if (kind == "audio" and fmt.add_audio_id) or (kind != "audio" and fmt.add_vision_id):
      label = {"image": "Picture", "audio": "Audio", "video": "Video"}[kind]
      return self._text_ids(f"{label} {number}: ")
    return []

  def _check_fits(self, tokens: int, more_samples: int = 0) -> None:
    """SessionContextLengthError unless the conversation still fits once `tokens` more of this turn are in:
    with the turn's header, what an open audio part owes (more_samples: samples this push adds to it) and the
    markup end_turn() adds. Nothing is prefilled before this check."""
    total = (self.num_tokens + len(self._turn_header()) + self._audio_owed(more_samples) + int(tokens)
             + len(self._close_ids))
    self._projected = total
    limits.check_context(total, 0, limit=self.context_limit, subject=f"session {self.id}", hint=self._limit_hint(),
                         error=SessionContextLengthError)

  def _limit_hint(self) -> str:
    return (f"max_len={self.max_len} (OmniSession(max_len=...) or config.generate.max_cache_len), or the model's "
            "positions (config.model.thinker.text.max_position_embeddings) where fewer")

  # ------------------------------------------------------------------------------------------------ prefill

  def _open_turn(self) -> None:
    """The user turn's header (after what the last reply owes, and the system turn at the start)."""
    if self._in_turn:
      return
    ids = self._turn_header()
    self._pending = []
    self._append(ids)
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
      self._audio = _Audio()
      self._append([self._fmt.id("<|audio_bos|>")])
    a = self._audio
    a.samples = np.concatenate([a.samples, wave])
    step = self._chunk_samples
    while step is not None and a.samples.shape[0] >= a.encoded + step + _LOOKAHEAD:
      self._encode_audio(a, a.encoded + step)
    if final:
      self._end_audio()

  def _encode_audio(self, a: _Audio, end: Optional[int]) -> None:
    """Encode samples [a.encoded, end) (None: to the audio's end) and prefill their AUDIO tokens."""
    start = a.encoded
    total = a.samples.shape[0]
    last = end is None
    stop = total if last else end + _LOOKAHEAD
    lo = max(0, start - _CONTEXT)
    feats = audio_media.log_mel(a.samples[lo:stop], self.model.num_mel_bins)  # floored at this window's max
    skip = (start - lo) // audio_media.HOP_LENGTH
    keep = (audio_media.num_frames(total) - a.num_frames) if last else (end - start) // audio_media.HOP_LENGTH
    block = feats[:, skip:skip + keep]
    if block.shape[1] == 0:
      return
    # The window floored its frames at its own max - 8; raise that to the audio's running max (max(max(x, f1),
    # f2) = max(x, f2) for f2 >= f1), the whole utterance's floor unless a later frame is louder. Frames already
    # in the cache keep theirs, so the Talker's prompt sees what the Thinker saw.
    a.floor = max(a.floor, float(block.max()) * 4.0 - 4.0)
    block = np.maximum(block, (a.floor - 8.0 + 4.0) / 4.0).astype(np.float32)
    a.frames.append(block)
    a.encoded = total if last else end
    n = int(audio_media.num_tokens(block.shape[1]))
    if n:  # a last piece of 1-2 frames yields no token (the whole audio's count agrees)
      self._append([self.ids.audio_token_id] * n, {"audios": [block]})
      a.sent += 1
      a.tokens += n

  def _end_audio(self) -> None:
    a = self._audio
    if a is None:
      return
    if a.encoded < a.samples.shape[0]:
      self._encode_audio(a, None)
    self._audio = None
    frames = np.concatenate(a.frames, axis=1) if a.frames else None
    if frames is None or frames.shape[1] == 0:
      raise SessionError(f"session {self.id}: the pushed audio is empty")
    # The Talker's prompt (and history bookkeeping) sees one audio item: drop the per-chunk blocks.
    self._media["audios"] = self._media["audios"][:len(self._media["audios"]) - a.sent] + [frames]
    self._append([self._fmt.id("<|audio_eos|>")])

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
    return np.asarray(self._logits)[0]

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

  def _check_reply(self, max_new_tokens: int) -> None:
    """SessionContextLengthError unless the conversation, its turn closed, and max_new_tokens fit (a session
    with nothing to respond to is left to end_turn's error)."""
    if self._in_turn:
      prompt = self.num_tokens + self._audio_owed() + len(self._close_ids)
    elif self._awaiting:
      prompt = self.num_tokens
    else:
      return
    limits.check_context(prompt, max_new_tokens, limit=self.context_limit, subject=f"session {self.id}",
                         hint=self._limit_hint(), error=SessionContextLengthError)

  def _commit_reply(self, cache, talker_cache, tokens, length: int, eos) -> tuple[np.ndarray, bool]:
    """Adopt the reply loop's caches; returns (the reply's ids, whether it ended with a stop id)."""
    self._cache, self._talker_cache = cache, talker_cache
    n = int(length)
    tokens = np.asarray(tokens)[:n]
    stop = n > 0 and int(tokens[-1]) in eos
    # The loop fed every token but the last (positions top+1 .. top+n-1), and wrote one slot per step of the
    # batch (a row's slots past its own reply are invalid). The reply's end is owed to the cache.
    self._slots = int(cache.index)
    self._history.extend(int(t) for t in tokens[:n - 1])
    self._top = self._top + (n - 1)
    self._offset = self._top + 1
    self._pending = ([] if stop else [int(tokens[-1])]) + [self._fmt.id("<|im_end|>")] + self._text_ids("\n")
    self.turn += 1
    return tokens, stop

  def _text(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids if int(i) not in self.model.stop_ids])

  def _make_synthesizer(self, speaker):
    if self._synthesizer is not None:
      return self._synthesizer()
    return default_synthesizer(self.model, speaker)


class _Streams:
  """Runs `work(put)` on a thread and iterates (kind, value) as it puts them, each kind in step order (a decode
  loop's host callbacks, put(kind, step, value), may arrive out of order). An exception in `work` lands in
  result["error"] (re-raised by the consumer after join())."""

  def __init__(self, work, result: dict):
    self._queue: queue.Queue = queue.Queue()

    def run():
      try:
        work(lambda kind, step, value: self._queue.put((kind, step, value)))
      except BaseException as e:  # noqa: BLE001 - handed to the consumer's thread
        result["error"] = e
      self._queue.put(None)

    self._thread = threading.Thread(target=run, daemon=True)
    self._thread.start()

  def __iter__(self):
    pending, expected = {}, {}
    while (item := self._queue.get()) is not None:
      kind, step, value = item
      pending[kind, step] = value
      while (kind, expected.get(kind, 0)) in pending:
        yield kind, pending.pop((kind, expected.get(kind, 0)))
        expected[kind] = expected.get(kind, 0) + 1

  def join(self) -> None:
    self._thread.join()


class _Row:
  """One session's reply while the loop runs: its text so far, its codes, its synthesizer, its timings."""

  def __init__(self, session: OmniSession, synth, stop_ids: frozenset):
    self.session, self.synth, self.stop_ids = session, synth, stop_ids
    self.turn, self.t0 = session.turn, session.input_closed_at
    self.prompt_tokens = session.num_tokens
    self.tokens: list[int] = []
    self.shown = ""
    self.text_done = self.codes_done = False
    self.timings: dict = {}

  def event(self, kind, payload) -> Event:
    e = Event.now(kind, payload, session=self.session.id, turn=self.turn)
    if kind != "done":
      self.timings.setdefault("first_" + kind, e.t - self.t0)
    return e

  def text(self, final: bool = False) -> list[Event]:
    text = self.session._text(self.tokens)
    if (final or not text.endswith("\ufffd")) and len(text) > len(self.shown):
      piece, self.shown = text[len(self.shown):], text
      return [self.event("text", piece)]
    return []

  def add_token(self, token: int, stopped: bool) -> list[Event]:
    if self.text_done:
      return []
    self.tokens.append(token)
    self.text_done = stopped
    return self.text()

  def add_code(self, code: int, stopped: bool) -> list[Event]:
    if self.codes_done:
      return []
    self.codes_done = stopped or code in self.stop_ids
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
  """Batched sessions: the replies of several conversations with one model, decoded in one loop (one row
  each). Yields (index into sessions, Event) as any row produces it; each session's events, and its state
  after the reply, are what its own respond() gives with greedy decoding (same arguments; speakers: one voice
  per session, None for the session's own). Rows share the sampling settings and the seed; a sampled row's
  draws depend on the batch (one draw per step for all rows), so only greedy replies equal the solo ones.
  The sessions' caches are stacked for the call; each gets back the batch's cache index, so a session decoded
  beside a longer conversation uses as many slots as that one (max_len bounds the longest)."""
  sessions = list(sessions)
  if not sessions:
    raise ValueError("respond_together: no sessions")
  first = sessions[0]
  g = first._g
  if any(s._g is not g for s in sessions):
    raise SessionError("respond_together: the sessions belong to different models")
  if len({(s.max_len, s.speech, s.max_codes) for s in sessions}) > 1:
    raise SessionError("respond_together: the sessions differ in max_len, speech or max_codes (cache shapes)")
  unknown = set(sampling) - set(_SAMPLING_KEYS)
  if unknown:
    raise TypeError(f"unknown generation arguments {sorted(unknown)}")
  if speak and not first.speech:
    why = "this model has no Talker (config.model.talker)" if first.model.config.model.get("talker") is None \
        else "the session was opened with speech=False"
    raise SessionError(f"respond(speak=True): {why}")
  d = g.defaults
  n_new = int(d.get("max_new_tokens", 256) if max_new_tokens is None else max_new_tokens)
  if n_new < 1:
    raise SessionError(f"max_new_tokens must be >= 1, got {n_new}")
  params = g.sampling(**sampling)
  seed = int(d.get("seed", 0) if seed is None else seed)
  speakers = list(speakers) if speakers is not None else [None] * len(sessions)
  if len(speakers) != len(sessions):
    raise ValueError(f"{len(speakers)} speakers for {len(sessions)} sessions")
  settings, talker_seed, stop_ids, speaker_ids = None, 0, frozenset(), np.zeros((len(sessions),), np.int32)
  if first.speech:
    speech = first.model.speech
    if speak:
      talker = dict(talker or {})
      t_sampling = speech.sampling(**{k: talker.pop(k) for k in _SAMPLING_KEYS if k in talker})
      unknown = set(talker) - {"max_new_tokens", "seed", "stop_ids"}
      if unknown:
        raise TypeError(f"unknown talker generation arguments {sorted(unknown)}")
      m = int(talker.get("max_new_tokens", first.max_codes))
      if not 1 <= m <= first.max_codes:
        raise SessionError(f"talker max_new_tokens must be in [1, {first.max_codes}] (OmniSession(max_codes=...)), "
                           f"got {m}")
      stop_ids = tuple(int(i) for i in talker.get("stop_ids", speech.stop_ids))
      settings = duplex.TalkerSettings(t_sampling, m, stop_ids, True, speech.code_limit)
      talker_seed = int(speech.defaults.get("seed", 0) if talker.get("seed") is None else talker["seed"])
      names = [name or s.speaker for name, s in zip(speakers, sessions)]
      try:
        speaker_ids = np.asarray(speech.speaker_tokens(names, len(names)), np.int32)
      except config_lib.ConfigError as e:
        raise SessionError(str(e)) from None
    else:  # a text reply: the Talker's prefix still takes the reply's rows
      settings = duplex.TalkerSettings(SamplingParams(), 0, (), False)
  for s in sessions:
    s._check_open()
  for s in sessions:  # before the turns are closed: nothing is prefilled for a reply that cannot fit
    s._check_reply(n_new)
  for s in sessions:
    if not s._awaiting or s._in_turn:
      s.end_turn()
    s._awaiting = False
  used = max(s._slots for s in sessions)  # the batch writes from its largest index
  if used + n_new > first.max_len:
    worst = max(sessions, key=lambda s: s._slots)
    raise SessionContextLengthError(
        worst.num_tokens, n_new, worst.context_limit,
        subject=f"session {worst.id if len(sessions) == 1 else '(batch)'}",
        hint=f"{used} cache slots used (chunk padding included) + max_new_tokens {n_new} exceed "
             f"max_len={first.max_len}")
  eos = tuple(int(i) for i in first.ids.eos_token_ids)
  key = ("reply", n_new, params, eos, settings, g.vocab_limit)
  if key not in first._programs:
    fn = duplex.make_reply_fn(g.graphdef, first._talker_cfg, max_new_tokens=n_new, sampling=params, eos=eos,
                              pad_token_id=int(first.ids.pad_token_id), talker=settings, vocab_limit=g.vocab_limit,
                              mesh=g.mesh, rules=g.rules, replicated=_replicated(g.mesh))
    first._programs[key] = jax.jit(fn, donate_argnums=(1, 5))
  program = first._programs[key]
  b = len(sessions)
  vocab = first._logits.shape[-1]
  seen = np.zeros((b, vocab if params.penalises else 0), bool)
  if params.penalises:
    for r, s in enumerate(sessions):
      seen[r, np.asarray(s._history, np.int64)] = True
  start = np.asarray([int(s._top) + 1 for s in sessions], np.int32)
  cache = duplex.stack_caches([s._cache for s in sessions])
  talker_cache = duplex.stack_caches([s._talker_cache for s in sessions]) if first.speech else None
  logits = jnp.concatenate([s._logits for s in sessions], axis=0) if b > 1 else first._logits
  keys = [jax.random.key_data(jax.random.key(x)) for x in (seed, talker_seed)]
  rows = [_Row(s, s._make_synthesizer(name or s.speaker) if speak else None, frozenset(stop_ids))
          for s, name in zip(sessions, speakers)]
  result: dict = {}

  def run(put):
    with decode.listening(lambda step, t, done: put("text", step, (t, done))) as text_listener, \
        decode.listening(lambda step, c, done: put("codes", step, (c, done))) as code_listener:
      result["out"] = program(g.params, cache, logits, seen, start, talker_cache, speaker_ids, *keys, text_listener,
                              code_listener)
      jax.block_until_ready(result["out"])

  streams = _Streams(run, result)
  try:
    for kind, (values, stopped) in streams:
      for r, row in enumerate(rows):
        add = row.add_token if kind == "text" else row.add_code
        for e in add(int(values[r]), bool(stopped[r])):
          yield r, e
  finally:  # also when the consumer stops early (a dropped client): the loop runs on, its caches are kept
    streams.join()
    if "error" in result:
      for s in sessions:
        s.close()  # the caches were donated to the failed call
    else:
      out = result["out"]
      caches = duplex.split_cache(out.cache, b)
      talker_caches = duplex.split_cache(out.talker_cache, b) if first.speech else [None] * b
      tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
      codes, code_lengths = np.asarray(out.codes), np.asarray(out.code_lengths)
      replies = [s._commit_reply(caches[r], talker_caches[r], tokens[r], lengths[r], eos)
                 for r, s in enumerate(sessions)]
  if "error" in result:
    raise result["error"]
  for r, (row, (reply, stop)) in enumerate(zip(rows, replies)):
    row.tokens = [int(t) for t in reply]
    for e in row.text(final=True):
      yield r, e
    row_codes = None
    if speak:
      row_codes = codes[r, :code_lengths[r]]
      if len(row_codes) and int(row_codes[-1]) in stop_ids:
        row_codes = row_codes[:-1]
      if row.synth is not None:
        for a in row.synth.finish():
          yield r, row.audio(a)
    row.timings["end"] = time.perf_counter() - row.t0
    text = row.session._text(reply.tolist())
    yield r, row.event("done", Done(text, reply, "stop" if stop else "length", row.prompt_tokens, row_codes,
                                    row.timings))


def _replicated(mesh):
  return None if mesh is None or mesh.size == 1 else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


class WholeUtterance:
  """The synthesizer for a vocoder that cannot stream (Griffin-Lim): the reply is voiced when its codes end."""

  def __init__(self, voicer, speaker: Optional[str]):
    self.voicer, self.speaker, self.codes = voicer, speaker, []

  def push(self, codes) -> list:
    self.codes.extend(int(c) for c in np.asarray(codes).reshape(-1))
    return []

  def finish(self) -> list:
    return [self.voicer(np.asarray(self.codes, np.int32), self.speaker).audio] if self.codes else []


def default_synthesizer(model, speaker: Optional[str]):
  """How a reply's codes become audio events, for a model with Token2Wav (else None: codes only): with BigVGAN,
  omni_jax.token2wav.streaming.StreamingSynthesizer (config.generate.token2wav[.streaming], the voice's seed);
  with Griffin-Lim (a model whose BigVGAN was never converted: token2wav/voice.py "auto") the whole reply at
  its end. A model that cannot voice the speaker (no cond / ref_mel) logs why and streams codes only."""
  if not model.has_token2wav:
    return None
  from omni_jax.token2wav import voice as voice_lib  # noqa: PLC0415

  try:
    voicer = model.voicer
    voice = voicer.voice(speaker)
  except voice_lib.VoiceError as e:
    log.warning("speech codes only, no audio: %s", e)
    return None
  if voicer.vocoder != "bigvgan":
    return WholeUtterance(voicer, speaker)
  from omni_jax.token2wav import streaming  # noqa: PLC0415

  _, settings = streaming.from_config(model.config)
  return streaming.StreamingSynthesizer(voicer.token2wav, voice.cond, voice.ref_mel, sampler=voicer.sampler,
                                        streaming=settings, seed=voicer.settings.seed)

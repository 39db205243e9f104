"""The Python front door: load any checkpoint (omni_jax.loader), chat with it.

    from omni_jax import generate
    model = generate.load("workdirs/tiny_demo")     # training workdir, step directory, converter output or HF dir
    print(model.chat("Describe the picture.", image="photo.jpg", max_new_tokens=64))
    for piece in model.stream_chat("Transcribe this.", audio="clip.wav"):
      print(piece, end="", flush=True)
    replies = model.chat_batch([conversation_a, conversation_b])   # decoded together in the engine
    speech = model.speak("Say hello.", speaker="Ethan")   # a model with a Talker: text + speech codes
    speech.text, speech.codes                               # codes: int32 [M], cut at the first stop id
    speech.audio, speech.sample_rate                        # with a Token2Wav: float32 [M * 480] at 24 kHz
    model.voice(codes, speaker="Ethan")                     # any codes -> token2wav.voice.Voiced (audio, mel)

Conversations are lists of {"role", "content"} messages whose content is a string or a list of parts
({"type": "text", "text"}, {"type": "image" | "audio" | "video", "path"}, video parts may set
"use_audio_in_video"), rendered with the project's ChatML template and tokenizer. A rendered prompt whose
tokens plus max_new_tokens exceed the model's positions raises limits.ContextLengthError before anything is
prefilled; replies hold only ids the tokenizer knows (the LM head's padding rows are never generated).
"""

import dataclasses
import logging
import os
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import ml_collections
import numpy as np
from flax import nnx

from omni_jax import config as config_lib
from omni_jax import loader
from omni_jax.generate import engine as engine_lib
from omni_jax.generate import prompts
from omni_jax.generate.settings import reply_settings
from omni_jax.generate.model import Generator
from omni_jax.generate.talker import TalkerSettings
from omni_jax.generate.text_stream import TextStream
from omni_jax.input import pipeline
from omni_jax.input import preprocess
from omni_jax.input.tokenizer import Tokenizer
from omni_jax.token2wav import voice as voice_lib

log = logging.getLogger(__name__)

_TALKER_PREFIX = "talker_"  # speak(): talker_top_k=..., as transformers' generate(talker_top_k=...)


class Speech(NamedTuple):
  """A spoken reply: its text and its speech codes (int32 [M], before the first stop id); with a Token2Wav also
  its audio (float32 [M * 480] in [-1, 1] at sample_rate 24000), the DiT's mel [M * 2, 80], the vocoder that
  made it ("bigvgan" or "griffin_lim") and the speaker (token2wav/voice.py). Without one, audio is None."""
  text: str
  codes: Any
  audio: Optional[np.ndarray] = None
  sample_rate: int = voice_lib.SAMPLE_RATE
  mel: Optional[np.ndarray] = None
  vocoder: Optional[str] = None
  speaker: Optional[str] = None


class OmniChat:
  """A loaded model with its tokenizer and chat format: chat(), stream_chat(), chat_batch()."""

  def __init__(self, generator: Generator, tokenizer: Tokenizer, config: ml_collections.ConfigDict,
               checkpoint_path: Optional[str] = None):
    """checkpoint_path: where the parameters came from; the voices (speakers.safetensors, spk_dict.pt) and the
    vocoder's provenance are read from there (token2wav/voice.py). The generator's vocab_limit, unless set
    already, becomes the tokenizer's size: no reply holds an id it cannot decode."""
    self.generator, self.tokenizer, self.config = generator, tokenizer, config
    if generator.vocab_limit is None:
      generator.vocab_limit = tokenizer.vocab_size
    self.checkpoint_path = checkpoint_path
    data = config.get("data", ml_collections.ConfigDict())
    thinker = {k: v for k, v in config.model.thinker.items() if not isinstance(v, (dict, ml_collections.ConfigDict))}
    self.preprocessor = preprocess.Preprocessor(
        tokenizer, pipeline.chat_format(tokenizer, thinker, data.to_dict() if data else {}),
        preprocess.MediaOptions.from_config(data.get("media") if data else None),
        data.get("system_prompt") if data else None)
    self.stop_ids = set(generator.ids.eos_token_ids)
    audio = config.model.thinker.get("audio")
    self.num_mel_bins = int(audio.num_mel_bins) if audio is not None else 128
    self._speech = None
    self._voicer, self._voice_overrides = None, {}
    self._engines: dict = {}

  @property
  def speech(self) -> TalkerSettings:
    """The Talker's settings (ValueError for a model without a Talker; built on first use)."""
    if self._speech is None:
      self._speech = TalkerSettings(self.config)
    return self._speech

  @property
  def has_token2wav(self) -> bool:
    return self.config.model.get("token2wav", None) is not None

  @property
  def voicer(self) -> voice_lib.Voicer:
    """The model's Token2Wav with the checkpoint's voices and config.generate.voice (built on first use)."""
    if self._voicer is None:
      if not self.has_token2wav:
        raise voice_lib.VoiceError("this model has no Token2Wav (config.model.token2wav): it makes speech codes "
                                   "only; convert a full Qwen2.5-Omni checkpoint or train one (docs/token2wav.md)")
      g = self.generator
      token2wav = nnx.merge(g.graphdef, g.params).token2wav
      self._voicer = voice_lib.Voicer.from_model(token2wav, self.config, self.checkpoint_path,
                                                 **self._voice_overrides)
    return self._voicer

  def set_voice_options(self, *, vocoder: Optional[str] = None, dtype: Optional[str] = None) -> None:
    """Override config.generate.voice's vocoder ("auto" | "bigvgan" | "griffin_lim") and Token2Wav dtype."""
    self._voice_overrides = {k: v for k, v in dict(vocoder=vocoder, dtype=dtype).items() if v is not None}
    self._voicer = None

  def voice(self, codes, speaker: Optional[str] = None, *, seed: Optional[int] = None) -> voice_lib.Voiced:
    """Speech codes [M] -> a 24 kHz waveform in a voice (default: config.model.talker.default_speaker)."""
    return self.voicer(codes, speaker, seed=seed)

  def batch(self, conversations: Sequence[Sequence[dict]], max_new_tokens: Optional[int] = None) -> dict:
    """The left-padded prompt batch of several conversations (media decoded and preprocessed). With
    max_new_tokens, the longest rendered prompt is checked first: limits.ContextLengthError when it and the
    reply exceed the model's positions (before any array is sized by the prompts)."""
    samples = self._samples(conversations, max_new_tokens)
    return prompts.prompt_batch(samples, pad_id=self.generator.ids.pad_token_id, num_mel_bins=self.num_mel_bins)

  def _samples(self, conversations, max_new_tokens: Optional[int]) -> list[preprocess.Sample]:
    samples = [prompts.prompt_sample(c, self.preprocessor, name=f"prompt{i}") for i, c in enumerate(conversations)]
    if max_new_tokens is not None and samples:
      self.generator.check_context(max(s.num_tokens for s in samples), max_new_tokens)
    return samples

  # ------------------------------------------------------------------------------------------------ the engine

  def engine(self, *, speech: bool = False, max_len: int = 4096, slots: int = 1, max_new_tokens: int = 256,
             max_codes: int = 0) -> engine_lib.Engine:
    """The conversation engine of this model for these shapes (built once; its programs are kept)."""
    key = (bool(speech), int(max_len), int(slots), int(max_new_tokens), int(max_codes))
    if key not in self._engines:
      g = self.generator
      cache_dtype = g.defaults.get("cache_dtype")
      self._engines[key] = engine_lib.Engine(
          g.graphdef, g.params, self.config, g.mesh, num_slots=slots, max_len=max_len, max_new_tokens=max_new_tokens,
          speech=speech, max_codes=max_codes, vocab_limit=g.vocab_limit, ids=g.ids,
          cache_dtype=config_lib.dtype_of(cache_dtype, "generate.cache_dtype") if cache_dtype else None)
    engine = self._engines[key]
    engine.params = self.generator.params  # evaluation swaps the parameters between calls
    return engine

  def drop_params(self) -> None:
    """Forget the parameters (the generator's and its engines'): evaluation sets them again before its next
    replies, and between evaluations a trainer should not keep a copy of them (per-layer buffers on GPUs)."""
    self.generator.params = None
    for engine in self._engines.values():
      engine.params = None

  def prefilled(self, engine: engine_lib.Engine, sample: preprocess.Sample) -> engine_lib.Conversation:
    """A new conversation of `engine` holding a whole rendered prompt (one prefill call)."""
    conv = engine.conversation()
    batch = prompts.prompt_batch([sample], pad_id=self.generator.ids.pad_token_id, num_mel_bins=self.num_mel_bins)
    batch = {k: v for k, v in batch.items() if k not in ("labels", "kind")}
    if not sample.use_audio_in_video:
      batch.pop("use_audio_in_video", None)
    engine.prefill(conv, batch, sample.input_ids)
    return conv

  def _replies(self, conversations, options: dict, talker_options: Optional[dict] = None, speakers=None,
               slots: Optional[int] = None):
    """Decode the replies of several conversations in one engine (slots: as many as the conversations, up to
    config.generate.max_batch, 8 by default; talker_options: spoken replies with these Talker settings): yields
    (row, reply, kind, id) as decoded; the replies end as engine.Reply."""
    g = self.generator
    talker = self.speech if talker_options is not None else None
    settings = reply_settings(g, options, talker=talker, talker_options=talker_options, prefix=_TALKER_PREFIX)
    samples = self._samples(conversations, settings.max_new_tokens)
    per_row = [settings] * len(samples)
    if talker is not None:
      names = list(speakers) if isinstance(speakers, (list, tuple)) else [speakers] * len(samples)
      per_row = [dataclasses.replace(settings, speaker=t) for t in talker.speaker_tokens(names, len(samples))]
    longest = max(prompts.round_up(s.num_tokens, 32) for s in samples)
    slots = min(len(samples), int(slots or g.defaults.get("max_batch", 8)))
    bucket = engine_lib.bucket
    engine = self.engine(speech=talker is not None, max_len=bucket(longest + settings.max_new_tokens, 256),
                         slots=bucket(slots, 1), max_new_tokens=bucket(settings.max_new_tokens, 64),
                         max_codes=bucket(settings.max_codes, 64) if talker is not None else 0)
    replies = [engine_lib.Reply(self.prefilled(engine, s), row, keep=False) for s, row in zip(samples, per_row)]
    index = {id(r): i for i, r in enumerate(replies)}
    for reply, kind, value in engine.run(replies):
      if id(reply) in index:
        yield index[id(reply)], reply, kind, value

  def _text(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode([int(i) for i in ids if int(i) not in self.stop_ids])

  def _decode_all(self, conversations, options, talker_options=None, speakers=None,
                  slots=None) -> list[engine_lib.Reply]:
    replies = {}
    for row, reply, _, _ in self._replies(conversations, options, talker_options, speakers, slots):
      replies[row] = reply
    return [replies[i] for i in range(len(conversations))]

  def chat_batch(self, conversations: Sequence[Sequence[dict]], *, slots: Optional[int] = None, **kw) -> list[str]:
    """Replies to several conversations, decoded together in the engine's slots (slots: how many at once,
    default config.generate.max_batch or 8; more conversations take slots as earlier replies end)."""
    return [self._text(r.tokens) for r in self._decode_all(conversations, kw, slots=slots)]

  def _messages(self, prompt, messages, image, audio, video, use_audio_in_video, system) -> list:
    if messages is not None:
      return list(messages)
    if prompt is None:
      raise ValueError("give a prompt or messages")
    as_list = lambda x: [x] if isinstance(x, (str, os.PathLike)) else list(x)  # noqa: E731
    return prompts.conversation(prompt, system=system, images=as_list(image), audios=as_list(audio),
                                videos=as_list(video), use_audio_in_video=use_audio_in_video)

  def chat(self, prompt: Optional[str] = None, *, messages: Optional[Sequence[dict]] = None,
           image: Any = (), audio: Any = (), video: Any = (), use_audio_in_video: bool = False,
           system: Optional[str] = None, **kw) -> str:
    """The reply to a prompt (with media files) or to a whole conversation (`messages`).

    Keyword arguments: max_new_tokens, seed, do_sample, temperature, top_k, top_p, repetition_penalty
    (defaults: config.generate).
    """
    conversation = self._messages(prompt, messages, image, audio, video, use_audio_in_video, system)
    return self.chat_batch([conversation], **kw)[0]

  def speak_batch(self, conversations: Sequence[Sequence[dict]], *, speaker=None, voice: Optional[bool] = None,
                  **kw) -> list[Speech]:
    """Spoken replies to several conversations: the Thinker writes and the Talker speaks in one loop (the
    engine), then each row's codes are voiced (Token2Wav, one utterance at a time).
    speaker: a voice of config.model.talker.speakers (or one per conversation). voice: None voices the codes
    when the model has a Token2Wav and the speaker's cond / ref_mel (else says why, once, and returns codes
    only); True requires the audio (VoiceError otherwise); False: codes only.
    Keyword arguments: chat()'s for the text, and talker_max_new_tokens, talker_seed, talker_do_sample,
    talker_temperature, talker_top_k, talker_top_p, talker_repetition_penalty for the codes (defaults:
    config.generate.talker, the released decoding)."""
    talker = {k[len(_TALKER_PREFIX):]: kw.pop(k) for k in list(kw) if k.startswith(_TALKER_PREFIX)}
    replies = self._decode_all(conversations, kw, talker, speaker)
    speech = self.speech
    names = list(speaker) if isinstance(speaker, (list, tuple)) else [speaker] * len(replies)
    names = [n or speech.cfg.default_speaker for n in names]
    stop = set(speech.stop_ids)
    out = []
    for r, name in zip(replies, names):
      codes = r.codes
      cut = next((i for i, c in enumerate(codes) if c in stop), len(codes))
      out.append(Speech(self._text(r.tokens), np.asarray(codes[:cut], np.int32), speaker=name))
    if not self._can_voice(sorted(set(names)), voice):
      return out
    voiced = [self.voicer(r.codes, r.speaker) for r in out]
    return [r._replace(audio=v.audio, sample_rate=v.sample_rate, mel=v.mel, vocoder=v.vocoder)
            for r, v in zip(out, voiced)]

  def speak(self, prompt: Optional[str] = None, *, messages: Optional[Sequence[dict]] = None,
            image: Any = (), audio: Any = (), video: Any = (), use_audio_in_video: bool = False,
            system: Optional[str] = None, speaker: Optional[str] = None, voice: Optional[bool] = None,
            **kw) -> Speech:
    """chat(), spoken: the reply's text, its speech codes and, with a Token2Wav, its audio (see speak_batch for
    `voice` and the talker_* arguments)."""
    conversation = self._messages(prompt, messages, image, audio, video, use_audio_in_video, system)
    return self.speak_batch([conversation], speaker=speaker, voice=voice, **kw)[0]

  def _can_voice(self, speakers: Sequence[str], voice: Optional[bool]) -> bool:
    if voice is False:
      return False
    try:
      for name in speakers:
        self.voicer.voice(name)
    except voice_lib.VoiceError as e:
      if voice:
        raise
      log.warning("speech codes only, no audio: %s", e)
      return False
    return True

  def stream_chat(self, prompt: Optional[str] = None, *, messages: Optional[Sequence[dict]] = None,
                  image: Any = (), audio: Any = (), video: Any = (), use_audio_in_video: bool = False,
                  system: Optional[str] = None, **kw) -> Iterator[str]:
    """chat(), yielding the reply's text as the tokens are decoded (a piece that ends inside a multi-byte
    character is held back until the character is complete)."""
    conversation = self._messages(prompt, messages, image, audio, video, use_audio_in_video, system)
    stream = TextStream(self.tokenizer.decode, self.stop_ids)
    for _, _, kind, token in self._replies([conversation], kw):
      if kind == "token" and (piece := stream.add(token)):
        yield piece
    if piece := stream.finish():
      yield piece


def speak_to_file(model: OmniChat, prompt: str, path: str, *, speaker: Optional[str] = None,
                  wav_out: Optional[str] = None, mel_png: Optional[str] = None, require_wav: bool = False,
                  **kw) -> Speech:
  """generate.py --speak: the spoken reply, printed; {"text", "speaker", "codes"} written to `path` as JSON and,
  when the model can voice it, the audio to `wav_out` (24 kHz mono 16-bit WAV) and its DiT mel to `mel_png`.
  A model without a Token2Wav (or without the speaker's voice) writes the JSON only and says why, unless
  require_wav (the user asked for the WAV): then VoiceError."""
  import json  # noqa: PLC0415

  kw = {k: v for k, v in kw.items() if v is not None}
  want = wav_out is not None or mel_png is not None
  speech = model.speak(prompt, speaker=speaker, voice=True if (want and require_wav) else (None if want else False),
                       **kw)
  record = {"text": speech.text, "speaker": speech.speaker, "codes": [int(c) for c in speech.codes]}
  print(speech.text)
  if speech.audio is not None:
    record.update(sample_rate=speech.sample_rate, vocoder=speech.vocoder)
    if wav_out is not None:
      record["wav"] = voice_lib.write_wav(wav_out, speech.audio, speech.sample_rate)
      print(f"{len(speech.audio) / speech.sample_rate:.2f} s of speech ({speech.vocoder}) -> {wav_out}")
    if mel_png is not None and len(speech.mel):
      title = f"{speech.speaker}, {len(speech.codes)} codes ({speech.vocoder})"
      record["mel_png"] = voice_lib.save_mel_png(mel_png, speech.mel, title=title)
      print(f"mel spectrogram -> {mel_png}")
  elif want:
    print("no audio: " + ("this model has no Token2Wav" if not model.has_token2wav
                          else f"no voice for {speech.speaker!r}") + " (see the warning above); codes only")
  with open(path, "w") as f:
    json.dump(record, f)
  print(f"{len(speech.codes)} speech codes ({speech.speaker}) -> {path}")
  return speech


def load(path: str, config: Optional[ml_collections.ConfigDict] = None, *, mesh_shape=None,
         tokenizer: Optional[str] = None, adapter: Optional[str] = None) -> OmniChat:
  """Load a checkpoint for chatting. tokenizer: a tokenizer directory or .tiktoken file (default: the one
  carried with the checkpoint, else config.data.tokenizer, else the bundled Qwen BPE ranks). adapter: LoRA
  adapters merged in (see omni_jax.loader.restore)."""
  config, graphdef, params, shardings, mesh, tokenizer_dir = loader.restore(path, config, mesh_shape, adapter)
  if tokenizer is None:
    tokenizer = tokenizer_dir or (config.get("data", {}) or {}).get("tokenizer")
  return OmniChat(Generator(graphdef, params, config, mesh, shardings), Tokenizer(tokenizer), config,
                  checkpoint_path=os.path.abspath(os.path.expanduser(path)))

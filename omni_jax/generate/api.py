"""The Python front door: load any checkpoint, chat with it.

    from omni_jax import generate
    model = generate.load("workdirs/tiny_demo")     # training workdir, step directory, converter output or HF dir
    print(model.chat("Describe the picture.", image="photo.jpg", max_new_tokens=64))
    for piece in model.stream_chat("Transcribe this.", audio="clip.wav"):
      print(piece, end="", flush=True)
    replies = model.chat_batch([conversation_a, conversation_b])   # one padded batch, one decode loop
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

import logging
import os
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from omni_jax import adapters
from omni_jax import checkpoint
from omni_jax import defaults
from omni_jax import sharding
from omni_jax import towers
from omni_jax.config import ConfigError
from omni_jax.convert import export
from omni_jax.convert import hf
from omni_jax.convert import peft
from omni_jax.convert import speakers
from omni_jax.generate import prompts
from omni_jax.generate.decode import Generator
from omni_jax.generate.talker import SpeechGenerator
from omni_jax.input import pipeline
from omni_jax.input import preprocess
from omni_jax.input.tokenizer import Tokenizer
from omni_jax.models import omni
from omni_jax.token2wav import voice as voice_lib

log = logging.getLogger(__name__)

_SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
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


def _is_hf_dir(path: str) -> bool:
  # By config.json's content: a workdir's speakers.safetensors beside its own config.json is no transformers dir.
  return checkpoint.is_transformers_dir(path)


def _has_tokenizer(d: Optional[str]) -> bool:
  return d is not None and (os.path.isfile(os.path.join(d, "tokenizer.json"))
                            or all(os.path.isfile(os.path.join(d, f)) for f in ("vocab.json", "merges.txt")))


def restore(path: str, config: Optional[ml_collections.ConfigDict] = None, mesh_shape=None,
            adapter: Optional[str] = None):
  """(config, graphdef, params, param_shardings, mesh, tokenizer directory or None) for any checkpoint.

  path: a transformers directory (config.json + *.safetensors), a converter output, a training step
  directory or a training workdir (its latest step). config: runtime, mesh and generation settings (default:
  the config saved with a training run, else the defaults); the model architecture always comes from the
  checkpoint. Parameters are placed directly in their sharded layout on the mesh.

  A LoRA run's checkpoint loads with its base (the one it recorded) and the adapters merged in. adapter: LoRA
  adapters to merge into the model at `path`: a PEFT adapter directory (adapter_config.json) or a LoRA run of
  this project (its workdir or step; `path` then replaces the base it recorded).
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such checkpoint")
  merged = None  # the parameters of a LoRA checkpoint, merged on the host
  if _is_hf_dir(path):
    if adapter is not None and not peft.is_adapter_dir(adapter):
      raise ConfigError(f"--adapter {adapter}: a LoRA run of train.py merges into the orbax checkpoint it trained "
                        f"over (its own --checkpoint); over a transformers directory give its PEFT export "
                        f"(python -m omni_jax.convert --orbax_dir RUN --peft_out DIR)")
    config = hf.config_from_hf(hf.read_config(path), base=config)
    speakers.import_from(path, config)  # the voices' bos ids (spk_dict.pt) when the model has a Talker
    generation = export.read_generation(path)
    if generation is not None:
      export.adopt_generation(config, generation)
    tokenizer_dir = path if _has_tokenizer(path) else None
  else:
    params_path = checkpoint.params_dir(path)
    saved = checkpoint.find_config(params_path)
    if config is None:
      config = checkpoint.load_config(saved) if saved else defaults.base_config()
      config = ml_collections.ConfigDict(checkpoint.tuples(config.to_dict()))
      for key, fill in (("generate", defaults.generation), ("train", defaults.training)):
        if key not in config:
          fill(config)
      config.mesh = defaults.base_config().mesh  # the training mesh need not fit the devices present
    # A LoRA run's step holds adapters only (`path` itself, or --adapter over the base at `path`): its base and
    # adapters, merged. The run's own config says so, whatever runtime config was given.
    run = checkpoint.params_dir(adapter) if adapter is not None and not peft.is_adapter_dir(adapter) else params_path
    run_saved = checkpoint.find_config(run)
    run_config = checkpoint.load_config(run_saved) if run_saved else None
    if run_config is not None and adapters.is_lora(run_config):
      _, merged = adapters.restore_merged(run, run_config, base=None if run == params_path else params_path)
      config = adapters.without_lora(config) if adapters.is_lora(config) else config
    elif run != params_path:
      raise ConfigError(f"--adapter {adapter}: neither a PEFT adapter directory (adapter_config.json) nor a LoRA "
                        f"run (its config has no lora section)")
    config = export.complete_token_ids(checkpoint.adopt_model_config(config, params_path))
    assets = export.assets_of(params_path)
    tokenizer_dir = assets if _has_tokenizer(assets) else None
  if mesh_shape is not None:
    config.mesh = ml_collections.ConfigDict(dict(mesh_shape))
  towers.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  graphdef, abstract = omni.abstract_model(config)
  shardings = sharding.state_shardings(abstract, mesh, config.sharding_rules)
  if adapter is not None and peft.is_adapter_dir(adapter):
    base = hf.load_state(path, abstract) if _is_hf_dir(path) else checkpoint.restore_params(params_path, abstract)
    merged = peft.merged(adapter, config, jax.device_get(nnx.to_pure_dict(base)))
  if merged is not None:
    params = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(params, merged)
    params = jax.device_put(params, shardings)
  elif _is_hf_dir(path):
    params = jax.device_put(hf.load_state(path, abstract), shardings)
  else:
    params = checkpoint.restore_params(params_path, abstract, shardings)
  return config, graphdef, params, shardings, mesh, tokenizer_dir


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

  @property
  def speech(self) -> SpeechGenerator:
    """The Talker's code generation on the same parameters (built on first use)."""
    if self._speech is None:
      g = self.generator
      self._speech = SpeechGenerator(g.graphdef, g.params, self.config, g.mesh, g.param_shardings)
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
    samples = [prompts.prompt_sample(c, self.preprocessor, name=f"prompt{i}") for i, c in enumerate(conversations)]
    if max_new_tokens is not None and samples:
      self.generator.check_context(max(s.num_tokens for s in samples), max_new_tokens)
    return prompts.prompt_batch(samples, pad_id=self.generator.ids.pad_token_id, num_mel_bins=self.num_mel_bins)

  def _checked_batch(self, conversations: Sequence[Sequence[dict]], settings: dict) -> dict:
    """batch(), checked against the reply's budget of generate() settings (its default when unset)."""
    return self.batch(conversations, self.generator.new_tokens(settings.get("max_new_tokens")))

  def _settings(self, kw: dict) -> dict:
    sampling = self.generator.sampling(**{k: kw.pop(k) for k in _SAMPLING_KEYS if k in kw})
    unknown = set(kw) - {"max_new_tokens", "seed"}
    if unknown:
      raise TypeError(f"unknown generation arguments {sorted(unknown)}")
    return dict(kw, sampling=sampling)

  def _text(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode([int(i) for i in ids if int(i) not in self.stop_ids])

  def chat_batch(self, conversations: Sequence[Sequence[dict]], **kw) -> list[str]:
    """Replies to several conversations, generated together (one padded batch)."""
    settings = self._settings(kw)
    out = self.generator.generate(self._checked_batch(conversations, settings), **settings)
    return [self._text(row[:n]) for row, n in zip(out.tokens, out.lengths)]

  def _request(self, prompt, messages, image, audio, video, use_audio_in_video, system, kw) -> tuple[dict, dict]:
    """(prompt batch, generate() settings) of one chat call."""
    if messages is None:
      if prompt is None:
        raise ValueError("give a prompt or messages")
      as_list = lambda x: [x] if isinstance(x, (str, os.PathLike)) else list(x)  # noqa: E731
      messages = prompts.conversation(prompt, system=system, images=as_list(image), audios=as_list(audio),
                                      videos=as_list(video), use_audio_in_video=use_audio_in_video)
    settings = self._settings(kw)
    return self._checked_batch([messages], settings), settings

  def chat(self, prompt: Optional[str] = None, *, messages: Optional[Sequence[dict]] = None,
           image: Any = (), audio: Any = (), video: Any = (), use_audio_in_video: bool = False,
           system: Optional[str] = None, **kw) -> str:
    """The reply to a prompt (with media files) or to a whole conversation (`messages`).

    Keyword arguments: max_new_tokens, seed, do_sample, temperature, top_k, top_p, repetition_penalty
    (defaults: config.generate).
    """
    batch, settings = self._request(prompt, messages, image, audio, video, use_audio_in_video, system, kw)
    out = self.generator.generate(batch, **settings)
    return self._text(out.tokens[0, :out.lengths[0]])

  def speak_batch(self, conversations: Sequence[Sequence[dict]], *, speaker=None, voice: Optional[bool] = None,
                  **kw) -> list[Speech]:
    """Spoken replies to several conversations: the Thinker's replies (one padded batch), then their speech
    codes (one Talker batch), then each row's audio (Token2Wav, one utterance at a time).
    speaker: a voice of config.model.talker.speakers (or one per conversation). voice: None voices the codes
    when the model has a Token2Wav and the speaker's cond / ref_mel (else says why, once, and returns codes
    only); True requires the audio (VoiceError otherwise); False: codes only.
    Keyword arguments: chat()'s for the text, and talker_max_new_tokens, talker_seed, talker_do_sample,
    talker_temperature, talker_top_k, talker_top_p, talker_repetition_penalty for the codes (defaults:
    config.generate.talker, the released decoding)."""
    talker = {k[len(_TALKER_PREFIX):]: kw.pop(k) for k in list(kw) if k.startswith(_TALKER_PREFIX)}
    settings = self._settings(kw)
    return self._speak(self._checked_batch(conversations, settings), settings, speaker, talker, voice)

  def speak(self, prompt: Optional[str] = None, *, messages: Optional[Sequence[dict]] = None,
            image: Any = (), audio: Any = (), video: Any = (), use_audio_in_video: bool = False,
            system: Optional[str] = None, speaker: Optional[str] = None, voice: Optional[bool] = None,
            **kw) -> Speech:
    """chat(), spoken: the reply's text, its speech codes and, with a Token2Wav, its audio (see speak_batch for
    `voice` and the talker_* arguments)."""
    talker = {k[len(_TALKER_PREFIX):]: kw.pop(k) for k in list(kw) if k.startswith(_TALKER_PREFIX)}
    batch, settings = self._request(prompt, messages, image, audio, video, use_audio_in_video, system, kw)
    return self._speak(batch, settings, speaker, talker, voice)[0]

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

  def _speak(self, batch: dict, settings: dict, speaker, talker: dict, voice: Optional[bool] = None) -> list[Speech]:
    speech = self.speech
    sampling = speech.sampling(**{k: talker.pop(k) for k in _SAMPLING_KEYS if k in talker})
    unknown = set(talker) - {"max_new_tokens", "seed"}
    if unknown:
      raise TypeError(f"unknown talker generation arguments {sorted(_TALKER_PREFIX + k for k in unknown)}")
    out = self.generator.generate(batch, **settings)
    codes = speech.generate(batch, out.tokens, speaker=speaker, sampling=sampling, **talker)
    rows = len(out.lengths)
    names = list(speaker) if isinstance(speaker, (list, tuple)) else [speaker or speech.cfg.default_speaker] * rows
    replies = [Speech(self._text(row[:n]), codes.row(i), speaker=names[i])
               for i, (row, n) in enumerate(zip(out.tokens, out.lengths))]
    if not self._can_voice(sorted(set(names)), voice):
      return replies
    voiced = [self.voicer(r.codes, r.speaker) for r in replies]
    return [r._replace(audio=v.audio, sample_rate=v.sample_rate, mel=v.mel, vocoder=v.vocoder)
            for r, v in zip(replies, voiced)]

  def stream_chat(self, prompt: Optional[str] = None, *, messages: Optional[Sequence[dict]] = None,
                  image: Any = (), audio: Any = (), video: Any = (), use_audio_in_video: bool = False,
                  system: Optional[str] = None, **kw) -> Iterator[str]:
    """chat(), yielding the reply's text as the tokens are generated (a piece that ends inside a multi-byte
    character is held back until the character is complete)."""
    batch, settings = self._request(prompt, messages, image, audio, video, use_audio_in_video, system, kw)
    ids, shown = [], ""
    for tokens, _ in self.generator.stream(batch, **settings):
      ids.append(int(tokens[0]))
      text = self._text(ids)
      if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
        continue
      if len(text) > len(shown):
        yield text[len(shown):]
      shown = text


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
  adapters merged in (see restore)."""
  config, graphdef, params, shardings, mesh, tokenizer_dir = restore(path, config, mesh_shape, adapter)
  if tokenizer is None:
    tokenizer = tokenizer_dir or (config.get("data", {}) or {}).get("tokenizer")
  return OmniChat(Generator(graphdef, params, config, mesh, shardings), Tokenizer(tokenizer), config,
                  checkpoint_path=os.path.abspath(os.path.expanduser(path)))

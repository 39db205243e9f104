"""The Python front door: load any checkpoint, chat with it.

    from omni_jax import generate
    model = generate.load("workdirs/tiny_demo")     # training workdir, step directory, converter output or HF dir
    print(model.chat("Describe the picture.", image="photo.jpg", max_new_tokens=64))
    for piece in model.stream_chat("Transcribe this.", audio="clip.wav"):
      print(piece, end="", flush=True)
    replies = model.chat_batch([conversation_a, conversation_b])   # one padded batch, one decode loop
    speech = model.speak("Say hello.", speaker="Ethan")   # a model with a Talker: text + speech codes
    speech.text, speech.codes                               # codes: int32 [M], cut at the first stop id

Conversations are lists of {"role", "content"} messages whose content is a string or a list of parts
({"type": "text", "text"}, {"type": "image" | "audio" | "video", "path"}, video parts may set
"use_audio_in_video"), rendered with the project's ChatML template and tokenizer.
"""

import os
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import jax
import ml_collections

from omni_jax import checkpoint
from omni_jax import defaults
from omni_jax import sharding
from omni_jax import towers
from omni_jax.convert import export
from omni_jax.convert import hf
from omni_jax.convert import speakers
from omni_jax.generate import prompts
from omni_jax.generate.decode import Generator
from omni_jax.generate.talker import SpeechGenerator
from omni_jax.input import pipeline
from omni_jax.input import preprocess
from omni_jax.input.tokenizer import Tokenizer
from omni_jax.models import omni

_SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
_TALKER_PREFIX = "talker_"  # speak(): talker_top_k=..., as transformers' generate(talker_top_k=...)


class Speech(NamedTuple):
  """A spoken reply: its text and its speech codes (int32 [M], before the first stop id; Token2Wav voices them)."""
  text: str
  codes: Any


def _is_hf_dir(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, "config.json")) and not os.path.isdir(os.path.join(path, "params"))
          and any(f.endswith(".safetensors") for f in os.listdir(path)))


def _has_tokenizer(d: Optional[str]) -> bool:
  return d is not None and (os.path.isfile(os.path.join(d, "tokenizer.json"))
                            or all(os.path.isfile(os.path.join(d, f)) for f in ("vocab.json", "merges.txt")))


def restore(path: str, config: Optional[ml_collections.ConfigDict] = None, mesh_shape=None):
  """(config, graphdef, params, param_shardings, mesh, tokenizer directory or None) for any checkpoint.

  path: a transformers directory (config.json + *.safetensors), a converter output, a training step
  directory or a training workdir (its latest step). config: runtime, mesh and generation settings (default:
  the config saved with a training run, else the defaults); the model architecture always comes from the
  checkpoint. Parameters are placed directly in their sharded layout on the mesh.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such checkpoint")
  if _is_hf_dir(path):
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
    config = export.complete_token_ids(checkpoint.adopt_model_config(config, params_path))
    assets = export.assets_of(params_path)
    tokenizer_dir = assets if _has_tokenizer(assets) else None
  if mesh_shape is not None:
    config.mesh = ml_collections.ConfigDict(dict(mesh_shape))
  towers.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  graphdef, abstract = omni.abstract_model(config)
  shardings = sharding.state_shardings(abstract, mesh, config.sharding_rules)
  if _is_hf_dir(path):
    params = jax.device_put(hf.load_state(path, abstract), shardings)
  else:
    params = checkpoint.restore_params(params_path, abstract, shardings)
  return config, graphdef, params, shardings, mesh, tokenizer_dir


class OmniChat:
  """A loaded model with its tokenizer and chat format: chat(), stream_chat(), chat_batch()."""

  def __init__(self, generator: Generator, tokenizer: Tokenizer, config: ml_collections.ConfigDict):
    self.generator, self.tokenizer, self.config = generator, tokenizer, config
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

  @property
  def speech(self) -> SpeechGenerator:
    """The Talker's code generation on the same parameters (built on first use)."""
    if self._speech is None:
      g = self.generator
      self._speech = SpeechGenerator(g.graphdef, g.params, self.config, g.mesh, g.param_shardings)
    return self._speech

  def batch(self, conversations: Sequence[Sequence[dict]]) -> dict:
    """The left-padded prompt batch of several conversations (media decoded and preprocessed)."""
    samples = [prompts.prompt_sample(c, self.preprocessor, name=f"prompt{i}") for i, c in enumerate(conversations)]
    return prompts.prompt_batch(samples, pad_id=self.generator.ids.pad_token_id, num_mel_bins=self.num_mel_bins)

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
    out = self.generator.generate(self.batch(conversations), **self._settings(kw))
    return [self._text(row[:n]) for row, n in zip(out.tokens, out.lengths)]

  def _request(self, prompt, messages, image, audio, video, use_audio_in_video, system, kw) -> tuple[dict, dict]:
    """(prompt batch, generate() settings) of one chat call."""
    if messages is None:
      if prompt is None:
        raise ValueError("give a prompt or messages")
      as_list = lambda x: [x] if isinstance(x, (str, os.PathLike)) else list(x)  # noqa: E731
      messages = prompts.conversation(prompt, system=system, images=as_list(image), audios=as_list(audio),
                                      videos=as_list(video), use_audio_in_video=use_audio_in_video)
    return self.batch([messages]), self._settings(kw)

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

  def speak_batch(self, conversations: Sequence[Sequence[dict]], *, speaker=None, **kw) -> list[Speech]:
    """Spoken replies to several conversations: the Thinker's replies (one padded batch), then their speech
    codes (one Talker batch). speaker: a voice of config.model.talker.speakers (or one per conversation).
    Keyword arguments: chat()'s for the text, and talker_max_new_tokens, talker_seed, talker_do_sample,
    talker_temperature, talker_top_k, talker_top_p, talker_repetition_penalty for the codes (defaults:
    config.generate.talker, the released decoding)."""
    talker = {k[len(_TALKER_PREFIX):]: kw.pop(k) for k in list(kw) if k.startswith(_TALKER_PREFIX)}
    return self._speak(self.batch(conversations), self._settings(kw), speaker, talker)

  def speak(self, prompt: Optional[str] = None, *, messages: Optional[Sequence[dict]] = None,
            image: Any = (), audio: Any = (), video: Any = (), use_audio_in_video: bool = False,
            system: Optional[str] = None, speaker: Optional[str] = None, **kw) -> Speech:
    """chat(), spoken: the reply's text and its speech codes (see speak_batch for the talker_* arguments)."""
    talker = {k[len(_TALKER_PREFIX):]: kw.pop(k) for k in list(kw) if k.startswith(_TALKER_PREFIX)}
    batch, settings = self._request(prompt, messages, image, audio, video, use_audio_in_video, system, kw)
    return self._speak(batch, settings, speaker, talker)[0]

  def _speak(self, batch: dict, settings: dict, speaker, talker: dict) -> list[Speech]:
    speech = self.speech
    sampling = speech.sampling(**{k: talker.pop(k) for k in _SAMPLING_KEYS if k in talker})
    unknown = set(talker) - {"max_new_tokens", "seed"}
    if unknown:
      raise TypeError(f"unknown talker generation arguments {sorted(_TALKER_PREFIX + k for k in unknown)}")
    out = self.generator.generate(batch, **settings)
    codes = speech.generate(batch, out.tokens, speaker=speaker, sampling=sampling, **talker)
    return [Speech(self._text(row[:n]), codes.row(i)) for i, (row, n) in enumerate(zip(out.tokens, out.lengths))]

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


def speak_to_file(model: OmniChat, prompt: str, path: str, *, speaker: Optional[str] = None, **kw) -> Speech:
  """generate.py --speak: the spoken reply, printed, and {"text", "speaker", "codes"} written to `path` as JSON."""
  import json  # noqa: PLC0415

  kw = {k: v for k, v in kw.items() if v is not None}
  speech = model.speak(prompt, speaker=speaker, **kw)
  name = speaker or model.speech.cfg.default_speaker
  with open(path, "w") as f:
    json.dump({"text": speech.text, "speaker": name, "codes": [int(c) for c in speech.codes]}, f)
  print(speech.text)
  print(f"{len(speech.codes)} speech codes ({name}) -> {path}")
  return speech


def load(path: str, config: Optional[ml_collections.ConfigDict] = None, *, mesh_shape=None,
         tokenizer: Optional[str] = None) -> OmniChat:
  """Load a checkpoint for chatting. tokenizer: a tokenizer directory or .tiktoken file (default: the one
  carried with the checkpoint, else config.data.tokenizer, else the bundled Qwen BPE ranks)."""
  config, graphdef, params, shardings, mesh, tokenizer_dir = restore(path, config, mesh_shape)
  if tokenizer is None:
    tokenizer = tokenizer_dir or (config.get("data", {}) or {}).get("tokenizer")
  return OmniChat(Generator(graphdef, params, config, mesh, shardings), Tokenizer(tokenizer), config)

"""Voicing a reply: speech codes + a voice -> a 24 kHz waveform with the model's Token2Wav.

  voicer = voice.Voicer.from_model(model.token2wav, config, checkpoint_path)   # or OmniChat.voicer
  out = voicer(codes, speaker="Chelsie")       # Voiced(audio [S] float32 in [-1, 1], mel [T, 80], 24000, vocoder)
  voice.write_wav("reply.wav", out.audio); voice.save_mel_png("reply.png", out.mel)

Steps (token2wav.synthesis.synthesize): the DiT samples a mel from seeded noise (token2wav.sampling: RK4 or
Euler, guidance; config.generate.token2wav), then the vocoder turns it into audio. S = len(codes) * repeats (2)
* 240 samples (480 per code, 20 ms at 24 kHz) with either vocoder. A reply voiced while its codes arrive:
token2wav.synthesis.synthesizer_for(voicer, speaker).

Which vocoder (config.generate.voice.vocoder):
  "bigvgan"      the model's BigVGAN (omni_jax/models/bigvgan.py);
  "griffin_lim"  the documented fallback on the DiT's mel (token2wav/griffin_lim.py: band-limited to 8 kHz,
                 phasey, intelligible);
  "auto"         (default) BigVGAN when its weights came from a transformers checkpoint, else Griffin-Lim.
                 Nothing here trains a vocoder, so BigVGAN weights are real only when converted: the checkpoint
                 is a transformers directory, or carries the converter's hf_assets/token2wav_config.json, or its
                 training run started (config.init_from, followed through) from such a checkpoint.
                 A tiny or from-scratch model's BigVGAN is random: it would only make noise.

Voices: each needs `cond` [enc_emb_dim] (the speaker vector) and `ref_mel` [T_ref, 80] (a reference mel of the
voice, fed to the DiT's ECAPA encoder). Looked up, in order:
  1. speakers.safetensors stored with the checkpoint: the released speakers (Chelsie, Ethan; the converter
     writes it from spk_dict.pt), and voices trained here (the new-voice recipe writes it, docs/new_voice.md);
  2. spk_dict.pt of a transformers directory (read without torch: omni_jax.convert.speakers);
  3. a DiT trained here (omni_jax.token2wav.targets): its cond is zero and the voice comes through ECAPA over a
     reference clip, so config.train.token2wav.references[name] (the first clip), or any clip given as
     `reference_audio` (voice_from_clip; generate.py --reference_audio), voices it as training did: the clip's
     mel (token2wav.mel) tiled / cut to config.train.token2wav.ref_frames frames.
     Zero cond is NOT how the released DiT was trained: a clip voice on released weights is an approximation.

Precision: Token2Wav computes in config.model.token2wav.dtype (float32, as the reference); `dtype="bfloat16"`
here rebuilds it in bfloat16 for synthesis without touching the checkpoint.
"""

import dataclasses
import logging
import os
from typing import NamedTuple, Optional

import jax
import ml_collections
import numpy as np
from flax import nnx

from omni_jax import config as config_lib
from omni_jax.errors import ConfigError
from omni_jax.models import scan
from omni_jax.token2wav import griffin_lim
from omni_jax.token2wav import sampling
from omni_jax.token2wav import streaming as streaming_lib
from omni_jax.token2wav import synthesis
from omni_jax.token2wav import vocoding
from omni_jax.token2wav.vocoding import SAMPLE_RATE

log = logging.getLogger(__name__)

VOCODERS = ("auto", "bigvgan", "griffin_lim")
SPEAKERS_FILE = "speakers.safetensors"  # = omni_jax.convert.speakers.TENSORS_FILE (the converter's side)
SPK_DICT = "spk_dict.pt"
_T2W_ASSET = os.path.join("hf_assets", "token2wav_config.json")  # the converter's record of a released Token2Wav


class VoiceError(ValueError):
  """A voice or vocoder that cannot be used; the message names the speaker, file or config key."""


@dataclasses.dataclass(frozen=True)
class Voice:
  """One speaker as Token2Wav conditions on it: cond [enc_emb_dim] float32, ref_mel [T_ref, mel] float32."""
  name: str
  cond: np.ndarray
  ref_mel: np.ndarray


@dataclasses.dataclass(frozen=True)
class VoiceSettings:
  """config.generate.voice: the vocoder choice, the DiT noise seed, Griffin-Lim iterations, synthesis dtype."""
  vocoder: str = "auto"
  seed: int = 0
  griffin_lim_iters: int = griffin_lim.N_ITER
  dtype: Optional[str] = None  # None: config.model.token2wav.dtype (float32 unless the checkpoint says otherwise)

  @classmethod
  def from_config(cls, cfg, key: str = "generate.voice") -> "VoiceSettings":
    return cls() if cfg is None else config_lib.from_config_dict(cls, cfg, key)

  def validate(self, key: str):
    if self.vocoder not in VOCODERS:
      raise ConfigError(f"config.{key}.vocoder: {self.vocoder!r} is not one of {VOCODERS}")
    if not isinstance(self.griffin_lim_iters, int) or self.griffin_lim_iters < 1:
      raise ConfigError(f"config.{key}.griffin_lim_iters: must be an integer >= 1, got {self.griffin_lim_iters!r}")
    if self.dtype is not None:
      config_lib.dtype_of(self.dtype, f"{key}.dtype")


class Voiced(NamedTuple):
  """A voiced reply: audio [S] float32 in [-1, 1] at sample_rate, the DiT's log mel [T, mel] (100 frames/s),
  and the vocoder that made the audio ("bigvgan" or "griffin_lim")."""
  audio: np.ndarray
  mel: np.ndarray
  sample_rate: int
  vocoder: str


# --------------------------------------------------------------------------------------- provenance


def _saved_config(path: str) -> Optional[ml_collections.ConfigDict]:
  from omni_jax import checkpoint  # pylint: disable=import-outside-toplevel

  where = checkpoint.find_config(path)
  return checkpoint.load_config(where) if where else None


def converted_vocoder(path: Optional[str], _depth: int = 0) -> bool:
  """Whether the checkpoint at `path` holds a BigVGAN converted from transformers (see the module doc)."""
  if path is None or _depth > 8 or not os.path.exists(path):
    return False
  path = os.path.abspath(os.path.expanduser(path))
  from omni_jax import checkpoint  # pylint: disable=import-outside-toplevel

  if checkpoint.is_transformers_dir(path):
    import json  # noqa: PLC0415

    with open(os.path.join(path, "config.json")) as f:
      return json.load(f).get("token2wav_config") is not None
  try:
    params_path = checkpoint.params_dir(path)
  except FileNotFoundError:  # CheckpointError is one
    return False
  for d in (params_path, checkpoint.find_config(params_path)):
    if d is not None and os.path.isfile(os.path.join(d, _T2W_ASSET)):
      return True
  saved = _saved_config(params_path)
  init_from = saved.get("init_from", None) if saved is not None else None
  return bool(init_from) and converted_vocoder(init_from, _depth + 1)


def choose_vocoder(setting: str, path: Optional[str]) -> str:
  """"bigvgan" or "griffin_lim" for a config.generate.voice.vocoder setting and a checkpoint path."""
  if setting not in VOCODERS:
    raise VoiceError(f"config.generate.voice.vocoder: {setting!r} is not one of {VOCODERS}")
  if setting != "auto":
    return setting
  return "bigvgan" if converted_vocoder(path) else "griffin_lim"


# --------------------------------------------------------------------------------------- voices


def _voice(name: str, cond, ref_mel, where: str) -> Voice:
  cond = np.asarray(cond, np.float32).reshape(-1)  # spk_dict.pt stores [1, 192] and [1, T, 80]
  ref_mel = np.asarray(ref_mel, np.float32)
  ref_mel = ref_mel.reshape(ref_mel.shape[-2:]) if ref_mel.ndim == 3 and ref_mel.shape[0] == 1 else ref_mel
  if ref_mel.ndim != 2:
    raise VoiceError(f"{where}: speaker {name!r}: ref_mel must be [frames, mel], got shape {ref_mel.shape}")
  return Voice(name, cond, ref_mel)


def read_voices(path: str) -> dict[str, Voice]:
  """{name: Voice} from a speakers.safetensors file (keys "<name>.cond", "<name>.ref_mel"); speakers with only
  one of the two are left out with a warning."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel

  tensors = {}
  with safe_open(path, framework="flax") as f:  # flax: bfloat16 tensors load too
    for key in f.keys():
      tensors[key] = np.asarray(f.get_tensor(key), np.float32)
  names = sorted({k.rsplit(".", 1)[0] for k in tensors})
  out = {}
  for name in names:
    if f"{name}.cond" in tensors and f"{name}.ref_mel" in tensors:
      out[name] = _voice(name, tensors[f"{name}.cond"], tensors[f"{name}.ref_mel"], path)
    else:
      log.warning("%s: speaker %r lacks cond or ref_mel; it cannot be voiced", path, name)
  return out


def write_voices(path: str, voices: dict) -> str:
  """{name: Voice or (cond, ref_mel)} -> a speakers.safetensors file (float32), merged into an existing one."""
  from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel

  tensors = {}
  if os.path.isfile(path):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel

    with safe_open(path, framework="flax") as f:
      tensors = {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
  for name, v in voices.items():
    cond, ref_mel = (v.cond, v.ref_mel) if isinstance(v, Voice) else v
    tensors[f"{name}.cond"] = np.ascontiguousarray(np.asarray(cond, np.float32).reshape(1, -1))
    tensors[f"{name}.ref_mel"] = np.ascontiguousarray(np.asarray(ref_mel, np.float32)[None])
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  names = sorted({k.rsplit(".", 1)[0] for k in tensors})
  st_numpy.save_file(tensors, path, metadata={"speakers": ",".join(names)})
  return path


def voice_from_clip(path: str, *, enc_emb_dim: int, ref_frames: Optional[int] = None,
                    name: Optional[str] = None) -> Voice:
  """A voice from one recording, as a DiT trained here conditions (targets.FlowTargets.reference): zero cond,
  the clip's mel tiled / cut to ref_frames (None: the clip's own length)."""
  from omni_jax.token2wav import mel as mel_lib  # pylint: disable=import-outside-toplevel

  try:
    ref = mel_lib.log_mel_file(path)
  except Exception as e:  # noqa: BLE001 - any decode / analysis failure: one error naming the file
    raise VoiceError(f"reference clip {path}: cannot be analysed ({type(e).__name__}: {e})") from None
  if ref_frames:
    ref = ref[np.arange(int(ref_frames)) % ref.shape[0]]
  return Voice(name or os.path.splitext(os.path.basename(path))[0], np.zeros(int(enc_emb_dim), np.float32), ref)


def _train_references(config: ml_collections.ConfigDict) -> tuple[dict, Optional[int]]:
  """({speaker: first clip} of config.train.token2wav.references, ref_frames) of the run that trained the DiT."""
  section = (config.get("train", None) or {}).get("token2wav", None)
  if section is None:
    return {}, None
  refs = section.get("references", None) or {}
  first = {str(k): (v if isinstance(v, str) else list(v)[0]) for k, v in dict(refs).items() if v}
  return first, section.get("ref_frames", None)


def voices_of(path: Optional[str]) -> tuple[dict[str, Voice], Optional[str]]:
  """The voices stored with a checkpoint and the file they came from: speakers.safetensors beside params/ or
  its config.json (converter, new-voice recipe), else a transformers directory's spk_dict.pt."""
  if path is None:
    return {}, None
  path = os.path.abspath(os.path.expanduser(path))
  from omni_jax import checkpoint  # pylint: disable=import-outside-toplevel

  places = [path]
  if os.path.isdir(os.path.join(path, "params")) or os.path.isdir(os.path.join(path, "checkpoints")):
    try:
      params_path = checkpoint.params_dir(path)
      places = [params_path, checkpoint.find_config(params_path), path,
                os.path.dirname(os.path.dirname(params_path))]  # a training step's workdir
    except FileNotFoundError:  # CheckpointError is one
      pass
  for d in places:
    if d is not None and os.path.isfile(os.path.join(d, SPEAKERS_FILE)):
      f = os.path.join(d, SPEAKERS_FILE)
      return read_voices(f), f
  if os.path.isfile(os.path.join(path, SPK_DICT)):
    from omni_jax.convert import speakers  # pylint: disable=import-outside-toplevel

    f = os.path.join(path, SPK_DICT)
    table = speakers.read_spk_dict(f)
    return {n: _voice(n, e["cond"], e["ref_mel"], f) for n, e in table.items() if "cond" in e and "ref_mel" in e}, f
  return {}, None


# --------------------------------------------------------------------------------------- synthesis


def with_dtype(token2wav, config: ml_collections.ConfigDict, dtype: str):
  """The same Token2Wav computing (and holding its parameters) in `dtype`: a rebuilt graph over cast weights."""
  from omni_jax.token2wav import tower as token2wav_tower  # pylint: disable=import-outside-toplevel

  dt = config_lib.dtype_of(dtype, "generate.voice.dtype")
  v = token2wav_tower.view(config)
  v = dataclasses.replace(v, runtime=dataclasses.replace(v.runtime, dtype=dt, param_dtype=dt))
  abstract = nnx.eval_shape(lambda: token2wav_tower.Token2Wav(v, rngs=nnx.Rngs(0)))
  graphdef, shapes = nnx.split(abstract)
  state = nnx.state(token2wav)
  cast = jax.tree.map(lambda s, x: scan.astype(x, s.dtype), shapes, state)  # split stacks stay split
  return nnx.merge(graphdef, cast)


def with_layer_buffers(token2wav, config: ml_collections.ConfigDict):
  """The Token2Wav with its DiT's layers held one buffer per layer (scan.split_layers; the DiT then runs them
  unrolled) where config.generate.layer_buffers says so for the platform its weights are on ("auto": GPUs).
  A GPU copies each layer's slice of the stacked weights before its matmuls (8 copy kernels a layer and
  evaluation): for a streaming window of a few blocks about as much again as its matmuls read, and half its
  kernels. As given otherwise (also a model without weights: nothing to split)."""
  mode = config.get("generate", {}).get("layer_buffers", "auto")
  dit_state = nnx.state(token2wav.code2wav_dit_model)
  leaf = next(iter(jax.tree.leaves(dit_state)), None)
  if not isinstance(leaf, (jax.Array, np.ndarray)) or scan.is_split(dit_state):
    return token2wav
  # Host arrays compute where jax puts them: the default backend.
  platform = next(iter(leaf.devices())).platform if isinstance(leaf, jax.Array) else jax.default_backend()
  if not scan.splits_on(mode, platform):
    return token2wav
  graphdef, state = nnx.split(token2wav)
  return nnx.merge(graphdef, scan.split_layers(state, under=[("code2wav_dit_model",)]))


def settings_of(config: ml_collections.ConfigDict) -> tuple[sampling.SamplerConfig, streaming_lib.StreamingConfig,
                                                               VoiceSettings]:
  """config.generate.token2wav (the sampler and its `streaming` chunk sizes) and config.generate.voice, checked;
  defaults when unset."""
  sampler, chunks = streaming_lib.from_config(config)
  sampler.validate("generate.token2wav")
  chunks.validate("generate.token2wav.streaming")
  generate = config.get("generate", None)
  return sampler, chunks, VoiceSettings.from_config(generate.get("voice", None) if generate is not None else None)


class Voicer:
  """A model's Token2Wav bound to its voices and settings: voicer(codes, speaker=...) -> Voiced.

  token2wav: the model's Token2Wav module (model.token2wav); voices: {name: Voice}; vocoder: "bigvgan" or
  "griffin_lim"; default_speaker: the voice used when none is named; streaming: the chunk sizes of a reply
  voiced while its codes arrive (token2wav.synthesis.synthesizer_for).
  """

  def __init__(self, token2wav, voices: dict, *, vocoder: str,
               sampler: sampling.SamplerConfig = sampling.SamplerConfig(), settings: VoiceSettings = VoiceSettings(),
               streaming: streaming_lib.StreamingConfig = streaming_lib.StreamingConfig(),
               default_speaker: Optional[str] = None, voices_file: Optional[str] = None,
               ref_frames: Optional[int] = None):
    if vocoder not in vocoding.VOCODERS:
      raise VoiceError(f"vocoder must be one of {vocoding.VOCODERS}, got {vocoder!r} (choose_vocoder resolves 'auto')")
    self.token2wav, self.voices, self.vocoder, self.ref_frames = token2wav, dict(voices), vocoder, ref_frames
    self.sampler, self.settings, self.streaming = sampler, settings, streaming
    self.default_speaker, self.voices_file = default_speaker, voices_file

  @classmethod
  def from_model(cls, token2wav, config: ml_collections.ConfigDict, checkpoint_path: Optional[str], *,
                 vocoder: Optional[str] = None, dtype: Optional[str] = None) -> "Voicer":
    """Settings from config.generate (token2wav: sampler and streaming; voice: vocoder, seed, griffin_lim_iters,
    dtype), voices stored with the checkpoint; vocoder / dtype override the config's."""
    sampler, chunks, settings = settings_of(config)
    settings = dataclasses.replace(settings, vocoder=vocoder or settings.vocoder, dtype=dtype or settings.dtype)
    settings.validate("generate.voice")
    chosen = choose_vocoder(settings.vocoder, checkpoint_path)
    if settings.dtype is not None:
      token2wav = with_dtype(token2wav, config, settings.dtype)
    token2wav = with_layer_buffers(token2wav, config)
    voices, where = voices_of(checkpoint_path)
    clips, ref_frames = _train_references(config)
    enc_emb_dim = int(token2wav.code2wav_dit_model.cfg.enc_emb_dim)
    for name, clip in clips.items():  # a DiT trained here: its speakers' reference clips
      if name not in voices and os.path.isfile(clip):
        voices[name] = voice_from_clip(clip, enc_emb_dim=enc_emb_dim, ref_frames=ref_frames, name=name)
    talker = config.model.get("talker", None)
    default = talker.get("default_speaker", None) if talker is not None else None
    log.info("Token2Wav: vocoder %s (setting %r), voices %s from %s", chosen, settings.vocoder, sorted(voices),
             where or "nowhere")
    return cls(token2wav, voices, vocoder=chosen, sampler=sampler, settings=settings, streaming=chunks,
               default_speaker=default, voices_file=where, ref_frames=ref_frames)

  def add_clip_voice(self, path: str, name: Optional[str] = None) -> str:
    """Voice any recording as a DiT trained here does (voice_from_clip); returns the new voice's name."""
    v = voice_from_clip(path, enc_emb_dim=int(self.token2wav.code2wav_dit_model.cfg.enc_emb_dim),
                        ref_frames=self.ref_frames, name=name)
    self.voices[v.name] = v
    return v.name

  def voice(self, speaker: Optional[str] = None) -> Voice:
    """The named voice (None: the default speaker), checked against the DiT's mel bins."""
    name = speaker or self.default_speaker
    if name is None:
      raise VoiceError("no speaker named and the config has no model.talker.default_speaker")
    if name not in self.voices:
      where = self.voices_file or f"no {SPEAKERS_FILE} or {SPK_DICT} with this checkpoint"
      raise VoiceError(f"speaker {name!r} has no cond / ref_mel to voice it ({where}; voices: {sorted(self.voices)})."
                       f" A released checkpoint brings them (python -m omni_jax.convert); a voice trained here gets "
                       f"them from the new-voice recipe (docs/new_voice.md), or give a clip of the voice "
                       f"(generate.py --reference_audio)")
    voice = self.voices[name]
    mel_dim = int(self.token2wav.code2wav_dit_model.cfg.mel_dim)
    if voice.ref_mel.shape[-1] != mel_dim:
      raise VoiceError(f"speaker {name!r}: ref_mel has {voice.ref_mel.shape[-1]} bins, the DiT {mel_dim}")
    return voice

  def __call__(self, codes, speaker: Optional[str] = None, *, seed: Optional[int] = None) -> Voiced:
    """One utterance: codes [N] in the speaker's voice (the same seed, the same audio; no codes, no audio)."""
    voice = self.voice(speaker)
    codes = np.asarray(codes).reshape(1, -1).astype(np.int32)
    speech = synthesis.synthesize(self.token2wav, codes, voice.cond[None], voice.ref_mel[None], vocoder=self.vocoder,
                                  sampler=self.sampler, seed=self.settings.seed if seed is None else seed,
                                  griffin_lim_iters=self.settings.griffin_lim_iters)
    return Voiced(speech.audio[0], speech.mel[0], SAMPLE_RATE, self.vocoder)


# --------------------------------------------------------------------------------------- files


def write_wav(path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> str:
  """Mono float audio -> 16-bit PCM WAV (soundfile)."""
  return griffin_lim.write_wav(path, audio, sample_rate)


def save_mel_png(path, mel: np.ndarray, *, title: Optional[str] = None) -> str:
  """A log mel [T, bins] (100 frames/s) as a spectrogram PNG (matplotlib, Agg backend: no display needed)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - no pyplot: no global backend
  from matplotlib.figure import Figure  # noqa: PLC0415

  mel = np.asarray(mel, np.float32)
  if mel.ndim != 2 or mel.shape[0] < 1:
    raise ValueError(f"save_mel_png: mel must be [frames >= 1, bins], got shape {mel.shape}")
  fig = Figure(figsize=(max(4.0, min(16.0, mel.shape[0] / 50)), 3.0), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  im = ax.imshow(mel.T, origin="lower", aspect="auto", interpolation="nearest",
                 extent=(0.0, mel.shape[0] / 100.0, 0, mel.shape[1]))
  ax.set_xlabel("seconds")
  ax.set_ylabel("mel bin")
  ax.set_title(title or "Token2Wav mel (natural log)")
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  directory = os.path.dirname(os.fspath(path))
  if directory:
    os.makedirs(directory, exist_ok=True)
  fig.savefig(os.fspath(path))
  return os.fspath(path)

"""DiT training data: (codes, target mel, speaker reference) triples of spoken replies, and the flow-matching
settings (config.train.token2wav). Pure numpy: it runs in the data workers (no jax).

A sample trains the DiT (objective `token2wav_flow`) when its last spoken assistant message (the one the
Talker trains on) has codes in config.data.speech_codes, the codes index the Talker reads:
  codes      the reply's unit ids (50 per second), the DiT's `quantized_code`;
  target     token2wav.mel.log_mel_file(the reply's audio): 80-bin natural-log mel, 100 frames/s, the DiT's
             output (`repeats` = 2 mel frames per code). Codes and mel are cut to the shorter of the two, then
             to the first config.train.token2wav.max_frames frames (one DiT row per utterance);
  reference  the speaker's reference mel for ECAPA: the mel of ANOTHER spoken reply of the same speaker
             (picked by a hash of the sample name among the speaker's clips, so it is deterministic and
             varies), tiled / cut to ref_frames. A speaker with a single clip (or none listed) uses the
             reply's own clip.
  speaker    the `cond` vector is zero: there is no x-vector model offline, so the voice reaches the DiT
             through ECAPA over the reference mel only (a new voice needs nothing but a clip of it).

The speakers' clips come from config.train.token2wav.references ({speaker: path or [paths]}) or, when that is
unset, from every spoken reply of the train split of the mixture's datasets (scanned once at startup; the
speaker is the message's `speaker`, else config.model.talker.default_speaker).

A reply whose audio cannot be analysed, or whose codes are missing or do not fit the DiT's code table, is
skipped and counted (reasons in REASONS), never a crash.
"""

import dataclasses
import functools
import logging
import os
import zlib
from typing import Mapping, Optional, Sequence

import numpy as np

from omni_jax import towers
from omni_jax.errors import ConfigError

log = logging.getLogger(__name__)

NO_CODES = "no_speech_codes"  # shared with the Talker (omni_jax.talker.targets)
BAD_AUDIO = "bad_speech_audio"  # the reply's audio (or its speaker's reference clip) cannot be analysed
REASONS = (BAD_AUDIO,)  # the skips of towers.TargetError raised here (and NO_CODES)
TIME_SAMPLING = ("cosine", "uniform", "logit_normal")
OBJECTIVE = "token2wav_flow"


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  """config.train.token2wav: how the DiT trains (docs/token2wav.md, "Training the DiT").

  time_sampling: "cosine" t = 1 - cos(pi u / 2), u ~ U(0, 1): the distribution of the sway-warped grid
    (sway -1) that inference integrates on, as CosyVoice's cosine t-scheduler; "uniform" (F5-TTS);
    "logit_normal": sigmoid(N(logit_mean, logit_std)) (SD3).
  drop_audio: probability that a row loses its speaker (zero reference mel and cond vector);
  drop_code: probability that a row loses everything (codes -> id 0 and the speaker): the unconditional rows
    that classifier-free guidance subtracts (token2wav.sampling);
  max_frames: mel frames per DiT row (a multiple of the DiT's repeats); longer replies train on their start;
  ref_frames: frames of the reference mel fed to ECAPA;
  references: {speaker: audio path or [paths]} of the reference clips; None: the data's own spoken replies.
  """
  time_sampling: str = "cosine"
  logit_mean: float = 0.0
  logit_std: float = 1.0
  drop_audio: float = 0.3
  drop_code: float = 0.2
  max_frames: int = 480
  ref_frames: int = 300
  references: Optional[tuple] = None  # ((speaker, (paths...)), ...) once parsed

  KEY = "train.token2wav"

  @classmethod
  def from_config(cls, config) -> "FlowConfig":
    """From config.train.token2wav (defaults when absent); ConfigError names the key."""
    train = config.get("train", None) if hasattr(config, "get") else None
    section = (train or {}).get("token2wav", None) if train is not None else None
    if section is None:
      return cls()
    values = dict(section.items()) if hasattr(section, "items") else None
    if values is None:
      raise ConfigError(f"config.{cls.KEY}: must be a section of keys, got {section!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
      raise ConfigError(f"config.{cls.KEY}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    refs = values.get("references", None)
    if refs is not None:
      if not hasattr(refs, "items"):
        raise ConfigError(f"config.{cls.KEY}.references: must map speaker names to audio paths, got {refs!r}")
      parsed = []
      for speaker, paths in refs.items():
        paths = [paths] if isinstance(paths, str) else list(paths)
        if not paths or not all(isinstance(p, str) for p in paths):
          raise ConfigError(f"config.{cls.KEY}.references.{speaker}: must be an audio path or a list of paths")
        parsed.append((str(speaker), tuple(os.path.abspath(os.path.expanduser(p)) for p in paths)))
      values["references"] = tuple(sorted(parsed))
    out = cls(**values)
    out.validate()
    return out

  def validate(self):
    k = self.KEY
    if self.time_sampling not in TIME_SAMPLING:
      raise ConfigError(f"config.{k}.time_sampling: {self.time_sampling!r} is not one of {TIME_SAMPLING}")
    for name in ("drop_audio", "drop_code"):
      p = getattr(self, name)
      if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1):
        raise ConfigError(f"config.{k}.{name}: must be a probability in [0, 1), got {p!r}")
    if not (isinstance(self.logit_std, (int, float)) and self.logit_std > 0):
      raise ConfigError(f"config.{k}.logit_std: must be > 0, got {self.logit_std!r}")
    if not isinstance(self.logit_mean, (int, float)) or isinstance(self.logit_mean, bool):
      raise ConfigError(f"config.{k}.logit_mean: must be a number, got {self.logit_mean!r}")
    for name in ("max_frames", "ref_frames"):
      v = getattr(self, name)
      if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
        raise ConfigError(f"config.{k}.{name}: must be a positive integer, got {v!r}")

  def check_model(self, repeats: int, min_ref: int):
    """Against the DiT's config (config.model.token2wav.dit)."""
    if self.max_frames % repeats:
      raise ConfigError(f"config.{self.KEY}.max_frames: {self.max_frames} must be a multiple of the DiT's repeats "
                        f"(config.model.token2wav.dit.repeats={repeats}): whole codes per row")
    if self.ref_frames < min_ref:
      raise ConfigError(f"config.{self.KEY}.ref_frames: {self.ref_frames} is too short for ECAPA's padding "
                        f"(at least {min_ref} frames)")


def objective_on(config) -> bool:
  """Whether the run trains the DiT: a Token2Wav section and a positive token2wav_flow weight (without
  config.train.objectives, every built tower's objective trains). Plain Python, no jax."""
  model = config.get("model") or {}
  if model.get("token2wav", None) is None or "train" not in config:
    return False
  weights = config.train.get("objectives", None)
  return weights is None or float(weights.get(OBJECTIVE, 0.0)) > 0


@dataclasses.dataclass(frozen=True)
class FlowTriple:
  """One DiT training example (numpy, channels last)."""
  codes: np.ndarray  # [N] int32
  mel: np.ndarray  # [N * repeats, 80] float32: the target
  reference: np.ndarray  # [ref_frames, 80] float32: the speaker's reference mel

  @property
  def frames(self) -> int:
    return int(self.mel.shape[0])


@functools.lru_cache(maxsize=512)
def _mel_of(path: str) -> np.ndarray:
  from omni_jax.token2wav import mel  # noqa: PLC0415 - librosa, only in the workers that need it

  return mel.log_mel_file(path)


_INDEX_CACHE: dict = {}


@dataclasses.dataclass(frozen=True)
class FlowTargets(towers.Targets):
  """Picklable: what the preprocessor needs to turn spoken replies into DiT triples."""
  codes_path: str
  units_version: Optional[str]
  num_codes: int  # rows of the DiT's code table: ids must be below
  repeats: int
  max_frames: int
  ref_frames: int
  pools: tuple  # ((speaker, (clip paths...)), ...)
  default_speaker: str

  def _index(self):
    from omni_jax.units import codes  # pylint: disable=import-outside-toplevel

    index = _INDEX_CACHE.get(self.codes_path)
    if index is None:
      index = codes.CodeIndex.load(self.codes_path)
      if self.units_version:
        codes.check_same_units(self.units_version, index.version, self.codes_path)
      _INDEX_CACHE[self.codes_path] = index
    return index

  def reference(self, name: str, speaker: str, own: str) -> np.ndarray:
    """[ref_frames, 80]: another clip of the speaker (hash of the sample name), tiled to length."""
    pool = dict(self.pools).get(speaker, ())
    others = [p for p in pool if p != own] or [own]
    path = others[zlib.crc32(name.encode()) % len(others)]
    try:
      ref = _mel_of(path)
    except Exception as e:  # noqa: BLE001 - a bad reference clip is this sample's skip, not a crash
      raise towers.TargetError(BAD_AUDIO, f"{name}: the reference clip {path} of speaker {speaker!r} cannot be "
                                          f"analysed: {type(e).__name__}: {e}") from None
    return ref[np.arange(self.ref_frames) % ref.shape[0]]

  def triple(self, name: str, messages: Sequence[Mapping]) -> Optional[FlowTriple]:
    """The DiT triple of the sample's last spoken reply (None when no assistant message is spoken)."""
    spoken = [m for m in messages if m["role"] == "assistant" and m.get("speech")]
    if not spoken:
      return None
    message = spoken[-1]
    path = message["speech"]
    ids = self._index().lookup(path)
    if ids is None:
      raise towers.TargetError(NO_CODES, f"{name}: the speech {path} is not in the codes index {self.codes_path} "
                                         "(run `python -m omni_jax.units encode` over this data)")
    if ids.size == 0 or ids.max() >= self.num_codes:
      raise towers.TargetError(NO_CODES, f"{name}: the codes of {path} are empty or exceed the DiT's code table "
                                         f"(config.model.token2wav.dit.num_embeds + 1 = {self.num_codes} rows)")
    try:
      target = _mel_of(path)
    except Exception as e:  # noqa: BLE001 - undecodable or too short: skipped and counted
      raise towers.TargetError(BAD_AUDIO, f"{name}: {path} cannot be analysed: {type(e).__name__}: {e}") from None
    n = min(ids.size, target.shape[0] // self.repeats, self.max_frames // self.repeats)
    if n == 0:
      raise towers.TargetError(BAD_AUDIO, f"{name}: {path} gives fewer than {self.repeats} mel frames")
    speaker = message.get("speaker", self.default_speaker)
    return FlowTriple(ids[:n].astype(np.int32), target[:n * self.repeats],
                      self.reference(name, speaker, path))

  def sample(self, name: str, messages: Sequence[Mapping], spans: Sequence[tuple[int, int]],
             pair: bool) -> Optional[FlowTriple]:
    """triple(); a preference pair's sides get none (a DiT row holds one reply: a pair would need two)."""
    del spans
    return None if pair else self.triple(name, messages)

  def bucket_sizes(self, seq_len: int) -> dict[str, int]:
    del seq_len  # one DiT row per Thinker row, as long as config.train.token2wav.max_frames
    return {"token2wav_frames": self.max_frames, "token2wav_ref_frames": self.ref_frames,
            "token2wav_repeats": self.repeats}


def speaker_pools(config, datasets: Mapping[str, object], flow: FlowConfig) -> tuple:
  """((speaker, clips), ...): config.train.token2wav.references, else every spoken reply of the given opened
  train-split sources ({dataset name: random-access source}), grouped by speaker."""
  if flow.references is not None:
    return flow.references
  from omni_jax.input import sources  # pylint: disable=import-outside-toplevel

  default = _default_speaker(config)
  pools: dict[str, set] = {}
  for dataset, source in datasets.items():
    for i in range(len(source)):
      try:
        rid, record, root = sources.decode_example(source[i])
        conv = sources.normalize(record, root, f"{dataset}/{rid}")
      except Exception:  # noqa: BLE001 - a bad record is skipped by the packer; here it just adds no clip
        continue
      for m in conv["messages"]:
        if m["role"] == "assistant" and m.get("speech") and os.path.exists(m["speech"]):
          pools.setdefault(m.get("speaker", default), set()).add(m["speech"])
  out = tuple(sorted((s, tuple(sorted(p))) for s, p in pools.items()))
  log.info("DiT speaker references: %s", ", ".join(f"{s}: {len(p)} clips" for s, p in out) or "none")
  return out


def _default_speaker(config) -> str:
  talker = (config.get("model") or {}).get("talker", None)
  return str((talker or {}).get("default_speaker", "Chelsie"))


def from_config(config, train_sources: Optional[Mapping[str, object]] = None) -> Optional[FlowTargets]:
  """The run's FlowTargets (None unless the run trains the DiT and config.data.speech_codes is set).
  train_sources: the mixture's opened train splits, scanned for speaker clips when no references are given."""
  if not objective_on(config):
    return None
  path = (config.get("data") or {}).get("speech_codes", None)
  if not path:
    weights = config.train.get("objectives", None)
    if weights is not None and float(weights.get(OBJECTIVE, 0.0)) > 0:  # named: a training run that needs data
      raise ConfigError(f"config.train.objectives.{OBJECTIVE}: the DiT trains on the codes of spoken replies; set "
                        "config.data.speech_codes (a codes index: `python -m omni_jax.units encode`)")
    return None
  flow = FlowConfig.from_config(config)
  dit = config.model.token2wav.dit
  talker = config.model.get("talker", None)
  pools = speaker_pools(config, train_sources or {}, flow)
  return FlowTargets(os.path.abspath(os.path.expanduser(path)),
                     None if talker is None else talker.get("units_version", None),
                     int(dit.get("num_embeds", 8193)) + 1, int(dit.get("repeats", 2)), flow.max_frames,
                     flow.ref_frames, pools, _default_speaker(config))

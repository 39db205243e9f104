"""The baseline speech units: k-means over the 50 Hz activations of an intermediate audio-tower layer.

This copies the design of Qwen's own single-codebook tokenizers (a quantiser inside the Whisper-style audio
encoder after layer L, before the pooler; docs/speech_units.md) with k-means in place of a trained VQ. The
encoder part is a FrozenEncoder (a copy, so training the Thinker does not move the units).

Artifact files: units.json, encoder.safetensors (conv1, conv2, layers.* of the frozen copy, float32) and
centroids.npy ([vocab_size, d_model] float32).
"""

import dataclasses
import os
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from omni_jax.errors import ConfigError
from omni_jax.input.media import audio as audio_lib
from omni_jax.models.audio import AudioConfig
from omni_jax.units import artifact, clustering
from omni_jax.units.base import SpeechUnits, UnitsError
from omni_jax.units.encoder import FrozenEncoder

ENCODER_FILE = "encoder.safetensors"
CENTROIDS_FILE = "centroids.npy"
FEATURES = "whisper log-mel, 16 kHz, hop 160 (omni_jax.input.media.audio.log_mel)"


@artifact.register
class KMeansUnits(SpeechUnits):
  """Nearest centroid of the frozen encoder's activations after `layer` layers, per 50 Hz frame."""

  kind = "kmeans"

  def __init__(self, encoder: FrozenEncoder, centroids: np.ndarray, fit_info: Optional[Mapping[str, Any]] = None):
    centroids = np.asarray(centroids, np.float32)
    if centroids.ndim != 2 or centroids.shape[1] != encoder.dim:
      raise ValueError(f"centroids must be [vocab_size, {encoder.dim}], got shape {centroids.shape}")
    self.encoder, self.centroids = encoder, centroids
    self.fit_info = dict(fit_info or {})
    self._version = artifact.content_hash(self._identity(), {**{f"encoder.{n}": w for n, w in encoder.weights.items()},
                                                              "centroids": centroids})

  def _identity(self) -> dict:
    """What decides the ids: the frozen encoder's shape (not the Thinker's depth, pooler or freeze flag)."""
    frozen = {k: v for k, v in dataclasses.asdict(self.encoder.config).items() if k not in ("output_dim", "freeze")}
    return {"kind": self.kind, "vocab_size": self.vocab_size, "frame_rate": self.frame_rate,
            "layer": self.encoder.layer, "encoder": frozen, "features": FEATURES}

  @property
  def vocab_size(self) -> int:
    return int(self.centroids.shape[0])

  @property
  def version(self) -> str:
    return self._version

  @property
  def layer(self) -> int:
    return self.encoder.layer

  @property
  def num_mel_bins(self) -> int:
    return self.encoder.config.num_mel_bins

  def encode_features(self, features: np.ndarray) -> np.ndarray:
    return self.encoder.apply(features, clustering.nearest, self.centroids).astype(np.int32)

  # ------------------------------------------------------------------------------------------ fitting

  @classmethod
  def fit(cls, encoder: FrozenEncoder, features: Iterable[np.ndarray], vocab_size: int, *, seed: int = 0,
          max_frames: int = 100_000, iterations: int = 20,
          fit_info: Optional[Mapping[str, Any]] = None) -> "KMeansUnits":
    """k-means (k-means++ seeded by `seed`, Lloyd) over the frames of `features` ([mels, T] log-mels), at most
    `max_frames` of them (a seeded uniform subset). fit_info is stored in units.json as provenance."""
    sample = clustering.FrameSample(max_frames, seed)
    seconds = 0.0
    files = 0
    for f in features:
      sample.add(encoder.frames(f))
      seconds += f.shape[1] / 100.0
      files += 1
    centroids, err = clustering.fit(sample.frames, vocab_size, seed=seed, iterations=iterations)
    info = dict(fit_info or {}, files=files, seconds=round(seconds, 2), frames_seen=sample.seen,
                frames_used=int(sample.frames.shape[0]), seed=int(seed), init="k-means++", iterations=int(iterations),
                mean_squared_distance=err)
    return cls(encoder, centroids, info)

  # ------------------------------------------------------------------------------------------ files

  def save(self, directory) -> None:
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    save_file(dict(self.encoder.weights), os.path.join(directory, ENCODER_FILE))
    np.save(os.path.join(directory, CENTROIDS_FILE), self.centroids)
    artifact.write_manifest(directory, {
        "kind": self.kind, "version": self.version, "vocab_size": self.vocab_size, "frame_rate": self.frame_rate,
        "layer": self.layer, "audio": dataclasses.asdict(self.encoder.audio), "features": FEATURES,
        "sample_rate": audio_lib.SAMPLE_RATE, "fit": self.fit_info,
        "files": {"encoder": ENCODER_FILE, "centroids": CENTROIDS_FILE}})

  @classmethod
  def load(cls, directory) -> "KMeansUnits":
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

    directory = os.fspath(directory)
    manifest = artifact.read_manifest(directory)
    where = os.path.join(directory, artifact.MANIFEST)
    if manifest["kind"] != cls.kind:
      raise UnitsError(f"{where}: kind {manifest['kind']!r} is not {cls.kind!r}")
    audio_dict = artifact.require(manifest, "audio", directory, dict)
    layer = artifact.require(manifest, "layer", directory, int)
    try:
      audio = AudioConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in audio_dict.items()})
      audio.validate("audio")
    except (TypeError, ConfigError) as e:
      raise UnitsError(f"{where}: bad `audio` section ({e})") from None
    encoder_path = os.path.join(directory, ENCODER_FILE)
    centroids_path = os.path.join(directory, CENTROIDS_FILE)
    for path in (encoder_path, centroids_path):
      if not os.path.isfile(path):
        raise UnitsError(f"{path}: missing")
    try:
      weights = load_file(encoder_path)
    except Exception as e:  # noqa: BLE001 - any safetensors failure is a damaged file
      raise UnitsError(f"{encoder_path}: unreadable ({type(e).__name__}: {e})") from None
    try:
      centroids = np.load(centroids_path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
      raise UnitsError(f"{centroids_path}: unreadable ({type(e).__name__}: {e})") from None
    try:
      encoder = FrozenEncoder(audio, layer, weights)
      units = cls(encoder, centroids, manifest.get("fit"))
    except ValueError as e:
      raise UnitsError(f"{directory}: {e}") from None
    if units.vocab_size != manifest["vocab_size"]:
      raise UnitsError(f"{centroids_path}: {units.vocab_size} centroids, but {where} says vocab_size="
                       f"{manifest['vocab_size']}")
    if units.version != manifest["version"]:
      raise UnitsError(f"{directory}: the files hash to version {units.version}, but {where} says "
                       f"{manifest['version']} (a file was changed or damaged)")
    return units

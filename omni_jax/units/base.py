"""The swappable speech-unit interface: audio in, 50 Hz discrete ids out (the Talker's targets).

A SpeechUnits turns a waveform into one id per 20 ms: the Thinker's log-mel analysis (100 frames/s,
omni_jax.input.media.audio) followed by something that maps two mel frames to one id (the audio encoder's
stride-2 conv, for the k-means baseline). `version` is a content hash: two unit sets with the same version
give the same ids, so codes made by one can be mixed with codes made by the other and nothing else.
"""

import abc
import os
from typing import ClassVar, Union

import numpy as np

from omni_jax.input.media import audio as audio_lib

FRAME_RATE = 50  # ids per second: 100 mel frames/s, two per id
SAMPLE_RATES = (16000, 24000)  # the Thinker's input rate and the Token2Wav output rate


class UnitsError(ValueError):
  """A speech-units artifact that is missing, corrupt or inconsistent; the message names the file."""


class SpeechUnits(abc.ABC):
  """Audio -> int32 ids in [0, vocab_size), about FRAME_RATE per second."""

  kind: ClassVar[str]  # units.json's `kind`: which subclass omni_jax.units.load builds
  frame_rate: ClassVar[int] = FRAME_RATE

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of distinct ids."""

  @property
  @abc.abstractmethod
  def version(self) -> str:
    """16 hex characters of a sha256 over everything that decides the ids."""

  @property
  def num_mel_bins(self) -> int:
    return audio_lib.NUM_MEL_BINS

  @abc.abstractmethod
  def encode_features(self, features: np.ndarray) -> np.ndarray:
    """[num_mel_bins, T] log-mel features (100 frames/s) -> [(T + 1) // 2] int32 ids."""

  @abc.abstractmethod
  def save(self, directory: Union[str, os.PathLike]) -> None:
    """Write the artifact directory (units.json + weights) that omni_jax.units.load reads back."""

  @classmethod
  @abc.abstractmethod
  def load(cls, directory: Union[str, os.PathLike]) -> "SpeechUnits":
    """Read an artifact directory written by save()."""

  def encode(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """A mono waveform at 16 or 24 kHz -> 1-D int32 ids (24 kHz is resampled to 16 kHz first)."""
    wave = np.asarray(wave)
    if wave.ndim != 1:
      raise ValueError(f"encode expects a mono 1-D waveform, got shape {wave.shape}")
    if wave.size == 0:
      raise ValueError("encode got an empty waveform")
    if int(sample_rate) not in SAMPLE_RATES:
      raise ValueError(f"sample rate {sample_rate} Hz is not supported; give audio at one of "
                       f"{', '.join(f'{r} Hz' for r in SAMPLE_RATES)}")
    wave = audio_lib.resample(wave.astype(np.float32), int(sample_rate), audio_lib.SAMPLE_RATE)
    return self.encode_features(audio_lib.log_mel(wave, self.num_mel_bins))

  def encode_file(self, path: Union[str, os.PathLike]) -> np.ndarray:
    """An audio file, decoded and resampled to 16 kHz by the Thinker's own loader (any rate it reads);
    a missing or corrupt file raises omni_jax.input.media.MediaError naming it."""
    return self.encode_features(audio_lib.features_from_file(path, self.num_mel_bins))

"""The fallback vocoder: a log mel of omni_jax.token2wav.mel -> a 24 kHz waveform with librosa's mel inversion
and Griffin-Lim, for models trained only here (no converted BigVGAN weights). The demo and the tests get real,
listenable WAVs from it; BigVGAN (omni_jax/models/bigvgan.py) is the vocoder whenever converted weights exist.

  exp(log mel) -> linear magnitude by non-negative least squares on the mel basis
  (librosa.feature.inverse.mel_to_stft) -> Griffin-Lim phase (librosa.griffinlim, seeded random start) at the
  analysis' own STFT (16 kHz, n_fft 1024, hop 160, window 640, uncentred; the analysis' reflect padding is
  cropped) -> resampled to 24 kHz -> clipped to [-1, 1].

The result is band-limited to the analysis' 8 kHz and has Griffin-Lim's phasey timbre: intelligible, not
natural. Level: the analysis peak-normalises to -6 dBFS, so the output sits near that level.
"""

import os

import numpy as np

from omni_jax.input.media import audio as audio_media
from omni_jax.token2wav import mel as mel_lib

OUTPUT_SAMPLE_RATE = 24000  # the vocoder's rate: the Token2Wav output is always written at 24 kHz
N_ITER = 32


def mel_to_audio(log_mel: np.ndarray, *, n_iter: int = N_ITER, seed: int = 0,
                 sample_rate: int = OUTPUT_SAMPLE_RATE) -> np.ndarray:
  """[frames, 80] natural-log mel (omni_jax.token2wav.mel.log_mel) -> float32 mono waveform at sample_rate,
  frames * sample_rate / 100 samples. The same seed gives the same waveform."""
  import librosa  # noqa: PLC0415 - heavy import, only for the fallback

  log_mel = np.asarray(log_mel)
  if log_mel.ndim != 2 or log_mel.shape[1] != mel_lib.N_MELS:
    raise ValueError(f"Griffin-Lim: mel must be [frames, {mel_lib.N_MELS}], got shape {log_mel.shape}")
  if log_mel.shape[0] < 1 or not np.all(np.isfinite(log_mel)):
    raise ValueError("Griffin-Lim: mel has no frames or non-finite values")
  if n_iter < 1:
    raise ValueError(f"Griffin-Lim: n_iter must be >= 1, got {n_iter}")
  mel = np.exp(log_mel.astype(np.float64)).T
  magnitude = librosa.feature.inverse.mel_to_stft(mel, sr=mel_lib.SAMPLE_RATE, n_fft=mel_lib.N_FFT, power=1.0,
                                                  fmin=mel_lib.FMIN, fmax=mel_lib.FMAX)
  frames = log_mel.shape[0]
  padded = (frames - 1) * mel_lib.HOP_LENGTH + mel_lib.N_FFT  # the analysis' padded signal spans these samples
  wave = librosa.griffinlim(magnitude, n_iter=n_iter, hop_length=mel_lib.HOP_LENGTH, win_length=mel_lib.WIN_LENGTH,
                            n_fft=mel_lib.N_FFT, window="hann", center=False, length=padded, init="random",
                            random_state=np.random.default_rng(seed))
  wave = wave[mel_lib.EDGE:mel_lib.EDGE + frames * mel_lib.HOP_LENGTH].astype(np.float32)
  wave = audio_media.resample(wave, mel_lib.SAMPLE_RATE, sample_rate)
  return np.clip(wave, -1.0, 1.0).astype(np.float32)


def write_wav(path, wave: np.ndarray, sample_rate: int = OUTPUT_SAMPLE_RATE) -> str:
  """Write a mono float waveform as 16-bit PCM WAV (soundfile); returns the path."""
  import soundfile  # noqa: PLC0415

  wave = np.asarray(wave, np.float32)
  if wave.ndim != 1:
    raise ValueError(f"write_wav: waveform must be mono [samples], got shape {wave.shape}")
  directory = os.path.dirname(os.fspath(path))
  if directory:
    os.makedirs(directory, exist_ok=True)
  soundfile.write(os.fspath(path), np.clip(wave, -1.0, 1.0), sample_rate, subtype="PCM_16")
  return os.fspath(path)


def mel_to_wav(path, log_mel: np.ndarray, *, n_iter: int = N_ITER, seed: int = 0) -> str:
  """The fallback end to end: log mel -> 24 kHz WAV at `path`."""
  return write_wav(path, mel_to_audio(log_mel, n_iter=n_iter, seed=seed), OUTPUT_SAMPLE_RATE)

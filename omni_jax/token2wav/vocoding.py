"""Mel -> 24 kHz audio: the one compiled BigVGAN program, and the Griffin-Lim fallback beside it.

Whole-utterance synthesis (token2wav.synthesis) and streaming (token2wav.streaming) vocode through the same
jitted function, so they share its compile cache: one program per (vocoder graph, batch, mel length). A whole
utterance brings its own length; the streaming synthesizer pads its windows to two bucket lengths.
Which vocoder a model uses is token2wav.voice's choice (config.generate.voice.vocoder).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni_jax.token2wav import griffin_lim

SAMPLE_RATE = griffin_lim.OUTPUT_SAMPLE_RATE  # 24 kHz from either vocoder
VOCODERS = ("bigvgan", "griffin_lim")


@functools.partial(jax.jit, static_argnums=0)
def _bigvgan(graphdef, state, mel):
  return nnx.merge(graphdef, state)(mel)


def vocode(vocoder_split: tuple, mel) -> jax.Array:
  """BigVGAN: mel [B, T, mel_dim] -> waveform [B, T * hop]. vocoder_split: nnx.split(the BigVGAN module),
  split once by callers that vocode often."""
  return _bigvgan(*vocoder_split, jnp.asarray(mel, jnp.float32))


def to_audio(token2wav, mel, vocoder: str, *, seed: int = 0,
             griffin_lim_iters: int = griffin_lim.N_ITER) -> np.ndarray:
  """float32 waveforms [B, T * 240] of mels [B, T, mel] with "bigvgan" (the Token2Wav's own) or "griffin_lim"
  (each row from the same seed)."""
  if vocoder not in VOCODERS:
    raise ValueError(f"vocoder must be one of {VOCODERS}, got {vocoder!r} (token2wav.voice.choose_vocoder "
                     "resolves 'auto')")
  if vocoder == "bigvgan":
    return np.asarray(vocode(nnx.split(token2wav.code2wav_bigvgan_model), mel), np.float32)
  return np.stack([griffin_lim.mel_to_audio(np.asarray(row), n_iter=griffin_lim_iters, seed=seed) for row in mel])

"""Codes -> 24 kHz speech with a Token2Wav (omni_jax.models.token2wav_tower): the DiT samples a mel from noise
(token2wav.sampling: RK4 or Euler, guidance), BigVGAN turns it into a waveform; as transformers'
Qwen2_5OmniToken2WavModel.forward, one utterance per row.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni_jax.token2wav import sampling

SAMPLE_RATE = 24000


@nnx.jit
def vocode(vocoder, mel):
  """BigVGAN: mel [B, T, mel_dim] -> waveform [B, T * 240] (one compile per vocoder graph and shape)."""
  return vocoder(mel)


def synthesize(token2wav, codes, cond, reference_mel, *, sampler: sampling.SamplerConfig = sampling.SamplerConfig(),
               noise: Optional[jax.Array] = None, seed: Optional[int] = 0) -> np.ndarray:
  """Waveforms [B, N * repeats * hop] (float32 in [-1, 1], 24 kHz) of codes [B, N] for a voice: its `cond`
  vector [B, enc_emb_dim] and reference mel [B, T_ref, mel] (spk_dict.pt's entries; omni_jax.convert.speakers).
  `noise` [B, N * repeats, mel] or `seed` fixes the DiT's starting noise (reproducible speech)."""
  codes = jnp.asarray(codes, jnp.int32)
  mel = sampling.sample(token2wav.code2wav_dit_model, codes, jnp.asarray(cond, jnp.float32),
                        jnp.asarray(reference_mel, jnp.float32), noise=noise,
                        seed=None if noise is not None else seed, sampler=sampler)
  return np.asarray(vocode(token2wav.code2wav_bigvgan_model, mel))

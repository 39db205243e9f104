"""Token2Wav: speech codes -> mel (the flow-matching DiT, omni_jax.models.dit, and its samplers) -> waveform
(BigVGAN). docs/token2wav.md describes what is built and checked.

  sampling     the DiT's flow: noise -> mel (one compiled sampler program)
  vocoding     mel -> audio: the one compiled BigVGAN program, and Griffin-Lim
  streaming    chunked synthesis: codes in pieces -> audio chunk by chunk
  synthesis    whole-utterance synthesis, the synthesizer interface and the factory a model's replies use
  voice        voices, the vocoder choice, a model's Voicer
  mel, griffin_lim, bigvgan_weights, targets, objective: the mel analysis, the fallback vocoder, the BigVGAN
               conversion rules, the DiT's training data and loss

The package imports none of them: the data workers import the numpy-only modules (mel, targets) and must not
import jax.
"""

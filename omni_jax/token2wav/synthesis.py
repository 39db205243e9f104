"""Codes -> 24 kHz speech with a Token2Wav (omni_jax.token2wav.tower): one synthesizer interface, and
the factory that picks a synthesizer for a model's voice settings.

  synth = synthesis.synthesizer_for(voicer, speaker="Ethan")   # voicer: token2wav.voice.Voicer
  for codes in talker_pieces:                                  # any sizes, down to one code at a time
    for audio in synth.push(codes):                            # float32 [S] chunks, ready now
      play(audio)
  for audio in synth.finish():                                 # the rest, once the codes are complete
    play(audio)

A Synthesizer takes a reply's codes as they arrive (push) and returns the audio chunks that are ready;
finish() returns the rest. There are two:
- streaming.StreamingSynthesizer (BigVGAN): chunks while the codes arrive, equal to the whole utterance within
  the tolerances of docs/token2wav.md "Streaming synthesis";
- WholeUtterance (either vocoder): the whole reply at finish(). The factory takes it for Griffin-Lim, which
  works on a whole mel and cannot stream.
Both sample the DiT with the one sampler program (sampling.flow_mel) and vocode BigVGAN with the one vocoder
program (vocoding.vocode). `synthesize` is the whole-utterance computation: with the same starting noise it
equals transformers' Qwen2_5OmniToken2WavModel.forward, one utterance per row.
"""

from typing import NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.token2wav import griffin_lim
from omni_jax.token2wav import sampling
from omni_jax.token2wav import streaming
from omni_jax.token2wav import vocoding


class Synthesizer(Protocol):
  """Codes in, 24 kHz float32 audio chunks out (np.ndarray [S], or [B, S] for a batch of voices)."""

  def push(self, codes) -> list[np.ndarray]:
    ...

  def finish(self) -> list[np.ndarray]:
    ...


class Speech(NamedTuple):
  """Whole utterances: audio [B, N * repeats * hop] float32 in [-1, 1] at 24 kHz, and the DiT's log mel
  [B, N * repeats, mel] (100 frames/s) that the vocoder turned into it."""
  audio: np.ndarray
  mel: np.ndarray


def synthesize(token2wav, codes, cond, reference_mel, *, vocoder: str = "bigvgan",
               sampler: sampling.SamplerConfig = sampling.SamplerConfig(), noise: Optional[jax.Array] = None,
               seed: Optional[int] = 0, griffin_lim_iters: int = griffin_lim.N_ITER) -> Speech:
  """The speech of codes [B, N] (Talker code ids; ids outside the DiT's table read row 0, as Qwen's code) in a
  voice per row: its `cond` vector [B, enc_emb_dim] and reference mel [B, T_ref, mel] (token2wav.voice.Voice).
  `noise` [B, N * repeats, mel] or `seed` fixes the DiT's starting noise (the same seed, the same speech; the
  seed also starts Griffin-Lim). No codes give empty audio."""
  codes = jnp.asarray(codes, jnp.int32)
  dit = token2wav.code2wav_dit_model
  if codes.shape[1] == 0:
    rows = codes.shape[0]
    return Speech(np.zeros((rows, 0), np.float32), np.zeros((rows, 0, dit.cfg.mel_dim), np.float32))
  mel = sampling.sample(dit, codes, jnp.asarray(cond, jnp.float32), jnp.asarray(reference_mel, jnp.float32),
                        noise=noise, seed=None if noise is not None else seed, sampler=sampler)
  mel = jnp.asarray(mel, jnp.float32)  # a bfloat16 DiT (voice.with_dtype): the vocoders take float32 mels
  audio = vocoding.to_audio(token2wav, mel, vocoder, seed=0 if seed is None else seed,
                            griffin_lim_iters=griffin_lim_iters)
  return Speech(audio, np.asarray(mel, np.float32))


class WholeUtterance:
  """A Synthesizer that voices the reply when its codes end: push() collects, finish() synthesizes.

  cond [D] / reference_mel [T_ref, mel] (or [B, D] / [B, T_ref, mel] with codes [B, n] per push) and the
  settings are `synthesize`'s."""

  def __init__(self, token2wav, cond, reference_mel, *, vocoder: str,
               sampler: sampling.SamplerConfig = sampling.SamplerConfig(), seed: int = 0,
               griffin_lim_iters: int = griffin_lim.N_ITER):
    self.token2wav, self.vocoder, self.sampler = token2wav, vocoder, sampler
    self.seed, self.griffin_lim_iters = seed, griffin_lim_iters
    cond, reference_mel = np.asarray(cond, np.float32), np.asarray(reference_mel, np.float32)
    self._squeeze = cond.ndim == 1
    self.cond, self.reference_mel = (cond[None], reference_mel[None]) if self._squeeze else (cond, reference_mel)
    self._codes = np.zeros((self.cond.shape[0], 0), np.int32)
    self.finished = False

  def push(self, codes) -> list[np.ndarray]:
    if self.finished:
      raise ValueError("WholeUtterance.push: the utterance is finished; start a new synthesizer")
    codes = np.asarray(codes, np.int32)
    codes = codes.reshape(1, -1) if self._squeeze else codes
    self._codes = np.concatenate([self._codes, codes], axis=1)
    return []

  def finish(self) -> list[np.ndarray]:
    if self.finished or self._codes.shape[1] == 0:
      self.finished = True
      return []
    self.finished = True
    audio = synthesize(self.token2wav, self._codes, self.cond, self.reference_mel, vocoder=self.vocoder,
                       sampler=self.sampler, seed=self.seed, griffin_lim_iters=self.griffin_lim_iters).audio
    return [audio[0] if self._squeeze else audio]


def synthesizer_for(voicer, speaker: Optional[str] = None) -> Synthesizer:
  """A reply's synthesizer in a model's voice: voicer is the model's token2wav.voice.Voicer (its Token2Wav,
  voices, vocoder choice and config.generate settings), speaker a voice name (None: the default speaker).

  With BigVGAN, a StreamingSynthesizer (config.generate.token2wav: the sampler and its `streaming` chunk
  sizes; config.generate.voice.seed); with Griffin-Lim, a WholeUtterance, whose audio is voicer(codes,
  speaker)'s. The streamed audio equals whole-utterance synthesis from its own starting noise
  (StreamingSynthesizer.noise, drawn per block) within the streaming tolerances; that noise is not the one
  `synthesize` draws from the same seed, so it is another rendering of the same voice.
  Raises token2wav.voice.VoiceError when the speaker cannot be voiced."""
  voice = voicer.voice(speaker)
  if voicer.vocoder == "bigvgan":
    return streaming.StreamingSynthesizer(voicer.token2wav, voice.cond, voice.ref_mel, sampler=voicer.sampler,
                                          streaming=voicer.streaming, seed=voicer.settings.seed)
  return WholeUtterance(voicer.token2wav, voice.cond, voice.ref_mel, vocoder=voicer.vocoder, sampler=voicer.sampler,
                        seed=voicer.settings.seed, griffin_lim_iters=voicer.settings.griffin_lim_iters)

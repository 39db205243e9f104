"""Chunked (streaming) Token2Wav: speech codes arrive in pieces, 24 kHz audio leaves chunk by chunk.

  synth = StreamingSynthesizer(model.token2wav, cond, ref_mel, sampler=SamplerConfig(method="euler"), seed=0)
  synth.warm_up()                             # optional: compile the 4 window shapes before the first codes
  for codes in talker_pieces:                 # any sizes, e.g. one code at a time
    for audio in synth.push(codes):           # np.float32 [S] (or [B, S] when cond is [B, D]), ready now
      play(audio)
  for audio in synth.finish():                # the rest, once the codes are complete
    play(audio)
  synth.times                                 # time.perf_counter() when each chunk was ready (synth.started: 1st push)

  chunks = synthesize_chunked(model.token2wav, codes, cond, ref_mel, noise=noise)   # the same, in one call

cond [D] / [B, D] and ref_mel [T_ref, mel] / [B, T_ref, mel] are the voice (synthesis.synthesize's); rows of a
batch advance together (the same number of codes). Settings: `sampler` (config.generate.token2wav) and
`streaming` (StreamingConfig, config.generate.token2wav.streaming; `from_config` reads both). A model's
synthesizer comes from synthesis.synthesizer_for, which takes this one for BigVGAN.

The scheme (Qwen's Qwen2Code2wav, generalised; docs/token2wav.md "Streaming synthesis"), in DiT blocks of
block_size mel frames (24 = 12 codes = 0.24 s for the released model):
- chunk k emits the mel blocks [a, b): the first chunk `first_chunk_blocks`, later ones `chunk_blocks` each;
- its DiT window is [a - past_blocks, b + future_blocks) blocks, cut at 0 and at the utterance end: the DiT sees
  whole blocks at their own block positions (RoPE is relative, so the window's offset does not matter), and a
  chunk is computed as soon as the codes of its window have arrived (finish() computes the rest);
- one starting noise for the whole utterance (`noise` [B, >= T, mel], or N(0, 1) drawn per block from `seed`,
  `utterance_noise`: no length limit), sliced per window, so a window integrates the same ODE as the whole
  utterance with truncated context. A frame's output depends on `evaluations x look-back (look-ahead) layers`
  blocks on each side (the ODE's receptive field grows with every velocity evaluation), so chunked = whole to
  float rounding once past / future blocks cover that, and approximately with Qwen's 2 / 1 (measured:
  docs/token2wav.md);
- BigVGAN vocodes each chunk's mel with `vocoder_context` mel frames of context on each side (the final mel of
  earlier chunks on the left, the window's look-ahead mel on the right) and keeps the chunk's own samples
  (Qwen's trim; the vocoder's receptive field is about 14 frames, so 20 frames of context make the seam exact
  up to the right context's own DiT error). Chunks concatenate to the whole utterance's length.

Compiles stay bounded. The DiT and BigVGAN programs are whole-utterance synthesis's own (sampling.flow_mel,
vocoding.vocode), here at a few window shapes: every DiT window is right-padded to one of two lengths
((first + future) and (past + chunk + future) blocks) and the padding is masked out of attention (DiT
`frames`), so it changes nothing; every vocoder window is one of two lengths (first chunk + context,
chunk + 2 x context), padded on the right by repeating the last frame when the window ends before the
utterance does (the padding lies beyond the kept samples' receptive field), and the final window is moved left
(more real context) to a bucket length so that the utterance's end is vocoded as the whole utterance's is.
Only utterances shorter than a bucket compile their final vocoder window per length, as whole-utterance
synthesis compiles every length.
"""

import dataclasses
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from omni_jax.config import from_config_dict
from omni_jax.errors import ConfigError
from omni_jax.token2wav import sampling
from omni_jax.token2wav import vocoding


@dataclasses.dataclass(frozen=True)
class StreamingConfig:
  """config.generate.token2wav.streaming: chunk sizes in DiT blocks (block_size mel frames each).

  The defaults favour the first chunk's latency: 1 block (0.24 s of audio from 24 codes with the 1-block
  look-ahead); Qwen's own streaming uses first_chunk_blocks = chunk_blocks = 3.
  """
  first_chunk_blocks: int = 1  # blocks the first chunk emits
  chunk_blocks: int = 3  # blocks every later chunk emits
  past_blocks: int = 2  # left context re-run per window (Qwen: 2)
  future_blocks: int = 1  # look-ahead blocks a chunk waits for (Qwen: 1)
  vocoder_context: int = 20  # mel frames of vocoder context on each side of a chunk (Qwen: 20)

  @classmethod
  def from_config(cls, cfg: Optional[ml_collections.ConfigDict],
                  key: str = "generate.token2wav.streaming") -> "StreamingConfig":
    return cls() if cfg is None else from_config_dict(cls, cfg, key)

  def validate(self, key: str):
    for name in ("first_chunk_blocks", "chunk_blocks"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ConfigError(f"config.{key}.{name}: must be an integer >= 1, got {value!r}")
    for name in ("past_blocks", "future_blocks", "vocoder_context"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 0:
        raise ConfigError(f"config.{key}.{name}: must be an integer >= 0, got {value!r}")


def from_config(config: ml_collections.ConfigDict) -> tuple[sampling.SamplerConfig, StreamingConfig]:
  """(sampler, streaming settings) from config.generate.token2wav (defaults for what is unset)."""
  generate = config.get("generate", None)
  section = None if generate is None else generate.get("token2wav", None)
  streaming = None if section is None else section.get("streaming", None)
  return sampling.SamplerConfig.from_config(section), StreamingConfig.from_config(streaming)


def utterance_noise(seed: int, batch: int, stop: int, block_size: int, mel_dim: int, start: int = 0) -> np.ndarray:
  """Mel frames [start, stop) (start on a block boundary) of the seeded starting noise of a StreamingSynthesizer,
  [batch, stop - start, mel_dim]: N(0, 1), block b drawn from numpy's generator seeded (seed, b), so that a
  window's noise is drawn without knowing the utterance's length."""
  blocks = [np.random.default_rng((seed, b)).standard_normal((batch, block_size, mel_dim), np.float32)
            for b in range(start // block_size, -(-stop // block_size))]
  out = np.concatenate(blocks, axis=1) if blocks else np.zeros((batch, 0, mel_dim), np.float32)
  return out[:, :stop - start]


def _bucket(length: int, buckets: tuple[int, ...]) -> int:
  return min(b for b in buckets if b >= length)


class StreamingSynthesizer:
  """Codes in (push, finish), 24 kHz float32 audio chunks out; the module docstring has the scheme.

  token2wav: the model's Token2Wav (code2wav_dit_model, code2wav_bigvgan_model). noise [B, F, mel] (F: at least
  the utterance's mel frames) or seed (`utterance_noise`): the utterance's starting noise; whole-utterance
  synthesis with the same noise (`self.noise(T)`) gives the same speech up to the context truncation.
  """

  def __init__(self, token2wav, cond, reference_mel, *, sampler: sampling.SamplerConfig = sampling.SamplerConfig(),
               streaming: StreamingConfig = StreamingConfig(), noise=None, seed: Optional[int] = 0):
    sampler.validate("generate.token2wav")
    streaming.validate("generate.token2wav.streaming")
    dit, vocoder = token2wav.code2wav_dit_model, token2wav.code2wav_bigvgan_model
    cfg = dit.cfg
    if cfg.block_size % cfg.repeats:
      raise ConfigError(f"config.model.token2wav.dit.block_size: {cfg.block_size} must be a multiple of repeats="
                        f"{cfg.repeats} for streaming (windows start at block boundaries, on whole codes)")
    cond, reference_mel = np.asarray(cond, np.float32), np.asarray(reference_mel, np.float32)
    self._squeeze = cond.ndim == 1
    if self._squeeze:
      cond, reference_mel = cond[None], reference_mel[None]
    if cond.ndim != 2 or reference_mel.ndim != 3 or reference_mel.shape[0] != cond.shape[0]:
      raise ValueError(f"StreamingSynthesizer: cond {cond.shape} must be [D] or [B, D] and reference_mel "
                       f"{reference_mel.shape} [T_ref, mel] or [B, T_ref, mel] with the same batch")
    self.batch = cond.shape[0]
    self.sampler, self.streaming, self.cfg = sampler, streaming, cfg
    self.block, self.hop = cfg.block_size, vocoder.cfg.hop_length
    s = streaming
    # The two DiT window lengths (frames) and the two vocoder window lengths (frames), see the module docstring.
    self._dit_buckets = tuple(sorted({(s.first_chunk_blocks + s.future_blocks) * self.block,
                                      (s.past_blocks + s.chunk_blocks + s.future_blocks) * self.block}))
    v = s.vocoder_context
    # (the first chunk has no left context: its window is shorter, and so is the first audio's wait)
    self._vocoder_buckets = tuple(sorted({s.first_chunk_blocks * self.block + v, s.chunk_blocks * self.block + 2 * v}))
    if noise is None and seed is None:
      raise ValueError("StreamingSynthesizer: give noise or seed (the starting noise must be reproducible)")
    if noise is not None:
      noise = np.asarray(noise, np.float32)
      noise = noise[None] if noise.ndim == 2 and self._squeeze else noise
      if noise.ndim != 3 or noise.shape[0] != self.batch or noise.shape[2] != cfg.mel_dim:
        raise ValueError(f"StreamingSynthesizer: noise {noise.shape} must be [B={self.batch}, frames, {cfg.mel_dim}]")
    self._given_noise, self.seed = noise, seed
    self._dit = nnx.split(dit)
    self._vocoder = nnx.split(vocoder)
    self._speaker = jnp.asarray(cond)
    self._reference_mel = jnp.asarray(reference_mel)
    self._codes = np.zeros((self.batch, 0), np.int32)
    self._mel = np.zeros((self.batch, 0, cfg.mel_dim), np.float32)  # the final mel of the chunks emitted so far
    self._chunk = 0  # the next chunk to emit
    self.finished = False
    self.started: Optional[float] = None  # time.perf_counter() of the first push
    self.times: list[float] = []  # time.perf_counter() when each chunk's audio was ready

  # -- public -------------------------------------------------------------------------------------------------

  def push(self, codes) -> list[np.ndarray]:
    """Append codes ([n] or [B, n] ints) and return the audio chunks that are ready (possibly none)."""
    if self.finished:
      raise ValueError("StreamingSynthesizer.push: the utterance is finished; start a new StreamingSynthesizer")
    if self.started is None:
      self.started = time.perf_counter()
    codes = np.asarray(codes)
    if codes.ndim == 1 and self._squeeze:
      codes = codes[None]
    if codes.ndim != 2 or codes.shape[0] != self.batch or not np.issubdtype(codes.dtype, np.integer):
      raise ValueError(f"StreamingSynthesizer.push: codes {codes.shape} ({codes.dtype}) must be integers "
                       f"[{'n' if self._squeeze else 'B, n'}] (B = {self.batch})")
    total = (self._codes.shape[1] + codes.shape[1]) * self.cfg.repeats
    if self._given_noise is not None and total > self._given_noise.shape[1]:
      raise ValueError(f"StreamingSynthesizer.push: {total} mel frames need a longer noise than the given "
                       f"{self._given_noise.shape[1]} frames")
    self._codes = np.concatenate([self._codes, codes.astype(np.int32)], axis=1)
    out = []
    while True:
      start, stop = self._chunk_frames(self._chunk)
      if self.frames < stop + self.streaming.future_blocks * self.block:
        return out
      out.append(self._emit(start, stop, final=False))

  def finish(self) -> list[np.ndarray]:
    """The remaining audio chunks, now that all codes have been pushed."""
    if self.finished:
      return []
    if self.started is None:
      self.started = time.perf_counter()
    self.finished = True
    out = []
    while True:
      start, stop = self._chunk_frames(self._chunk)
      if start >= self.frames:
        return out
      out.append(self._emit(start, min(stop, self.frames), final=True))

  def warm_up(self) -> None:
    """Compile the window shapes now (2 DiT, 2 vocoder lengths), so that the first chunk pays no compile;
    they are shared by every synthesizer of the same model, batch size and settings."""
    repeats, mel_dim = self.cfg.repeats, self.cfg.mel_dim
    for length in self._dit_buckets:
      jax.block_until_ready(sampling.flow_mel(
          self._dit, self._reference_mel, self._speaker, jnp.zeros((self.batch, length // repeats), jnp.int32),
          jnp.zeros((self.batch, length, mel_dim), jnp.float32), self.sampler, frames=jnp.int32(length)))
    for length in self._vocoder_buckets:
      jax.block_until_ready(vocoding.vocode(self._vocoder, jnp.zeros((self.batch, length, mel_dim), jnp.float32)))

  @property
  def frames(self) -> int:
    """Mel frames of the codes pushed so far."""
    return self._codes.shape[1] * self.cfg.repeats

  @property
  def mel(self) -> np.ndarray:
    """The final mel of the chunks emitted so far, [T_emitted, mel] (or [B, T_emitted, mel])."""
    return self._mel[0] if self._squeeze else self._mel

  @property
  def first_chunk_latency(self) -> Optional[float]:
    """Seconds from the first push to the first audio chunk (None before it)."""
    return self.times[0] - self.started if self.times else None

  def noise(self, frames: int) -> np.ndarray:
    """The utterance's starting noise of its first `frames` mel frames, [B, frames, mel]."""
    if self._given_noise is not None:
      return self._given_noise[:, :frames]
    return utterance_noise(self.seed, self.batch, frames, self.block, self.cfg.mel_dim)

  # -- the windows --------------------------------------------------------------------------------------------

  def _chunk_frames(self, k: int) -> tuple[int, int]:
    s = self.streaming
    if k == 0:
      return 0, s.first_chunk_blocks * self.block
    start = (s.first_chunk_blocks + (k - 1) * s.chunk_blocks) * self.block
    return start, start + s.chunk_blocks * self.block

  def _emit(self, start: int, stop: int, final: bool) -> np.ndarray:
    """Sample the DiT window of mel [start, stop), vocode the chunk with context, keep its samples."""
    s, total = self.streaming, self.frames
    lo = max(0, start - s.past_blocks * self.block)
    hi = min(stop + s.future_blocks * self.block, total)
    window = self._window(lo, hi)  # [B, hi - lo, mel]
    self._mel = np.concatenate([self._mel, window[:, start - lo:stop - lo]], axis=1)
    # The vocoder window: final mel on the left, this window's mel (its look-ahead included) on the right.
    v_lo, v_hi = max(0, start - s.vocoder_context), min(hi, stop + s.vocoder_context)
    at_end = final and v_hi == total  # known only in finish(): push() never assumes the codes have ended
    # Before the end, the vocoder always sees vocoder_context frames right of the chunk: the window's look-ahead
    # mel, then its last frame repeated (closer to speech than the convolutions' zero padding of a hard edge).
    length = _bucket((v_hi if at_end else stop + s.vocoder_context) - v_lo, self._vocoder_buckets)
    if at_end:  # no padding past the utterance's end (vocoded as the whole utterance's); more left context instead
      v_lo = max(0, total - length)
    mel = np.concatenate([self._mel[:, v_lo:start], window[:, start - lo:v_hi - lo]], axis=1)
    if not at_end:  # right padding: the repeated last frame
      mel = np.pad(mel, ((0, 0), (0, length - mel.shape[1]), (0, 0)), mode="edge")
    wave = np.asarray(vocoding.vocode(self._vocoder, mel))
    audio = wave[:, (start - v_lo) * self.hop:(stop - v_lo) * self.hop]
    self._chunk += 1
    self.times.append(time.perf_counter())
    return audio[0] if self._squeeze else audio

  def _window(self, lo: int, hi: int) -> np.ndarray:
    """The DiT's mel of frames [lo, hi) (lo on a block boundary), computed in a padded bucket."""
    repeats = self.cfg.repeats
    length = _bucket(hi - lo, self._dit_buckets)
    codes = self._codes[:, lo // repeats:hi // repeats]
    codes = np.pad(codes, ((0, 0), (0, length // repeats - codes.shape[1])))
    if self._given_noise is not None:
      x0 = self._given_noise[:, lo:hi]
    else:
      x0 = utterance_noise(self.seed, self.batch, hi, self.block, self.cfg.mel_dim, start=lo)
    x0 = np.pad(x0, ((0, 0), (0, length - (hi - lo)), (0, 0)))
    mel = sampling.flow_mel(self._dit, self._reference_mel, self._speaker, codes, x0, self.sampler,
                            frames=jnp.int32(hi - lo))
    return np.asarray(mel)[:, :hi - lo]


def synthesize_chunked(token2wav, codes, cond, reference_mel, *, sampler: sampling.SamplerConfig =
                       sampling.SamplerConfig(), streaming: StreamingConfig = StreamingConfig(), noise=None,
                       seed: Optional[int] = 0) -> list[np.ndarray]:
  """All the audio chunks of codes ([n] or [B, n]) pushed at once, then finished (np.concatenate(chunks, -1)
  is the utterance: codes x repeats x hop samples)."""
  synth = StreamingSynthesizer(token2wav, cond, reference_mel, sampler=sampler, streaming=streaming, noise=noise,
                               seed=seed)
  return synth.push(codes) + synth.finish()

"""Log-mel features of audio that arrives in pieces (a microphone, a streamed request).

Whole chunks are encoded as soon as their samples, and the few samples of STFT lookahead their last frame
reads, are in; the rest when the audio ends. The frames are the whole utterance's log_mel frames, frame for
frame, except the processor's dynamic-range floor (max - 8 in log10 units): here it is the max over the audio
seen so far, so frames more than 80 dB below a later, louder frame come out different. Frames already handed
out keep their floor (a prefilled cache cannot change).
"""

from typing import Optional

import numpy as np

from omni_jax.input.media import audio as audio_media

# Samples past a chunk's end that its last (centred, N_FFT wide) frame reads.
LOOKAHEAD = audio_media.N_FFT // 2 - audio_media.HOP_LENGTH
# Samples before a chunk that its first frame's left half reads, rounded up to whole hops.
CONTEXT = -(-(audio_media.N_FFT // 2) // audio_media.HOP_LENGTH) * audio_media.HOP_LENGTH


class StreamingLogMel:
  """push(samples) -> feature blocks [mels, n] of the chunks completed; finish() -> the last block (or None).

  chunk_samples: samples per block (whole encoder chunks); None: nothing is encoded before finish().
  """

  def __init__(self, num_mel_bins: int = audio_media.NUM_MEL_BINS, chunk_samples: Optional[int] = None):
    self.num_mel_bins, self.chunk_samples = int(num_mel_bins), chunk_samples
    self.samples = np.zeros((0,), np.float32)
    self.blocks: list[np.ndarray] = []  # handed out, in order
    self.encoded = 0  # samples the blocks cover
    self.floor = audio_media.LOG_FLOOR  # the running max of the raw log10 features

  @property
  def num_frames(self) -> int:
    return sum(b.shape[1] for b in self.blocks)

  def push(self, wave: np.ndarray) -> list[np.ndarray]:
    self.samples = np.concatenate([self.samples, np.asarray(wave, np.float32).reshape(-1)])
    out = []
    step = self.chunk_samples
    while step is not None and self.samples.shape[0] >= self.encoded + step + LOOKAHEAD:
      out.append(self._encode(self.encoded + step))
    return [b for b in out if b.shape[1]]

  def finish(self) -> Optional[np.ndarray]:
    """The block of the samples not encoded yet (None when there are none, or they make no frame)."""
    if self.encoded >= self.samples.shape[0]:
      return None
    block = self._encode(None)
    return block if block.shape[1] else None

  def features(self) -> np.ndarray:
    """Every block so far as one [mels, frames] array."""
    if not self.blocks:
      return np.zeros((self.num_mel_bins, 0), np.float32)
    return np.concatenate(self.blocks, axis=1)

  def _encode(self, end: Optional[int]) -> np.ndarray:
    """The frames of samples [encoded, end) (None: to the audio's end)."""
    hop = audio_media.HOP_LENGTH
    start, total = self.encoded, self.samples.shape[0]
    last = end is None
    stop = total if last else end + LOOKAHEAD
    lo = max(0, start - CONTEXT)
    feats = audio_media.log_mel(self.samples[lo:stop], self.num_mel_bins)  # floored at this window's max
    skip = (start - lo) // hop
    keep = (audio_media.num_frames(total) - self.num_frames) if last else (end - start) // hop
    block = feats[:, skip:skip + keep]
    self.encoded = total if last else end
    if block.shape[1] == 0:
      return block
    # The window floored its frames at its own max - 8 (then + 4, / 4); raise that to the running max:
    # max(max(x, f1), f2) = max(x, f2) for f2 >= f1, the whole utterance's floor unless a later frame is louder.
    self.floor = max(self.floor, float(block.max()) * 4.0 - 4.0)
    block = np.maximum(block, (self.floor - 8.0 + 4.0) / 4.0).astype(np.float32)
    self.blocks.append(block)
    return block

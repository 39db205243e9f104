"""Token2Wav's data hook (omni_jax.towers.TowerData): the DiT rows of the batches. Numpy only (the data workers).

One DiT row per Thinker row, holding at most one spoken reply (its last spoken message's triple, targets.py:
ECAPA sees one speaker); F = the bucket's token2wav_frames (0: the bucket carries no DiT rows, so it takes no
sample with a DiT triple), R = its token2wav_ref_frames, token2wav_repeats mel frames per code:
  token2wav_codes      [B, F / repeats] int32   the reply's speech codes (0 past its end)
  token2wav_mel        [B, F, 80] float32       target log mel (100 frames/s; the silence level past its end)
  token2wav_lengths    [B] int32                real mel frames (0: the row carries no reply; the loss skips it)
  token2wav_reference  [B, R, 80] float32       the speaker's reference mel for ECAPA
"""

import numpy as np

from omni_jax import towers
from omni_jax.token2wav import mel as mel_lib
from omni_jax.token2wav import targets as targets_lib

FRAMES, REF_FRAMES, REPEATS = "token2wav_frames", "token2wav_ref_frames", "token2wav_repeats"


class Token2WavData(towers.TowerData):
  name = "token2wav"
  fields = {"token2wav_codes": 2, "token2wav_mel": 3, "token2wav_lengths": 1, "token2wav_reference": 3}
  sizes = {FRAMES: 0, REF_FRAMES: 0, REPEATS: 2}

  def targets(self, config, preference, train_sources):
    # The speakers' reference clips come from the train split when the config lists none (targets.py).
    if not targets_lib.objective_on(config):
      return None
    return targets_lib.from_config(config, train_sources())

  def check_sizes(self, sizes):
    frames, ref, repeats = sizes.get(FRAMES, 0), sizes.get(REF_FRAMES, 0), sizes.get(REPEATS, 2)
    if frames and (frames % repeats or ref <= 0):
      raise ValueError(f"{FRAMES} must be a multiple of {REPEATS}, with {REF_FRAMES} > 0; got {dict(sizes)}")

  def fits(self, targets, sizes):
    frames = sizes.get(FRAMES, 0)
    return len(targets) <= int(frames > 0) and all(t.frames <= frames for t in targets)

  def describe(self, targets):
    return f"{max(t.frames for t in targets)} DiT mel frames"

  def empty(self, rows, sizes, pairs):
    frames = sizes.get(FRAMES, 0)
    if not frames:
      return {}
    # Past a reply's end: the silence level (no loss there; the DiT has no padding mask, so the last real
    # frames see silence as their right context, as after a pause).
    return {"token2wav_codes": np.zeros((rows, frames // sizes.get(REPEATS, 2)), np.int32),
            "token2wav_mel": np.full((rows, frames, mel_lib.N_MELS), np.log(mel_lib.LOG_FLOOR), np.float32),
            "token2wav_lengths": np.zeros((rows,), np.int32),
            "token2wav_reference": np.zeros((rows, sizes[REF_FRAMES], mel_lib.N_MELS), np.float32)}

  def write(self, batch, row, cursor, at, segment, target, pair):
    batch["token2wav_codes"][row, :len(target.codes)] = target.codes
    batch["token2wav_mel"][row, :target.frames] = target.mel
    batch["token2wav_lengths"][row] = target.frames
    batch["token2wav_reference"][row] = target.reference
    return cursor

  def check(self, batch):
    if "token2wav_mel" not in batch:
      return
    frames, codes = np.shape(batch["token2wav_mel"])[1], np.shape(batch["token2wav_codes"])[1]
    if codes == 0 or frames % codes:
      raise ValueError(f"batch['token2wav_codes'] has {codes} codes per row for {frames} mel frames: expected a "
                       "whole number of frames per code (the DiT's repeats)")


DATA = Token2WavData()

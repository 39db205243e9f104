"""The batch contract between the input pipeline (producer) and the train/eval steps (consumer).

A batch is a dict of numpy/jax arrays with static shapes (B rows of L tokens; media buffers padded to fixed
maxima per row), so XLA compiles once per length bucket. Several samples may be packed into one row.

Text fields, [B, L] int32:
  input_ids    token ids (media placeholders expanded: bos + N pad tokens + eos).
  labels       aligned with input_ids (transformers convention): the step predicts labels[:, i + 1] from
               position i. IGNORE (-100) = no loss. The loss also never crosses a segment boundary.
  segment_ids  0 = padding, 1..S = which packed sample of the row the token belongs to.
  kind         modality of the sample the token belongs to (KIND_* below), for per-modality metrics.
Per row, [B] bool:
  use_audio_in_video  whether the row's videos carry their audio track interleaved (chosen once per sample
               when it is rendered, and recorded here so positions and generation can never disagree).
Media, padded per row (item order inside a row = order of appearance; all-zero grid rows / zero lengths are
padding). Flattening the first two axes gives transformers' global row-major item order:
  pixel_values        [B, P, 3*2*14*14] float32     image patches (omni_jax.input.media.image)
  image_grid_thw      [B, NI, 3] int32
  pixel_values_videos [B, PV, 3*2*14*14] float32    video patches
  video_grid_thw      [B, NV, 3] int32
  second_per_grids    [B, NV] float32
  audio_features      [B, NA, num_mel_bins, T] float32   log-mel (omni_jax.input.media.audio)
  audio_lengths       [B, NA] int32                 valid mel frames per audio
Media fields are optional: a text-only pipeline omits them.
Talker rows, [B, T] int32 (T = the bucket's talker_seq_len; present when the bucket trains the Talker): one
Talker row per Thinker row, laid out by omni_jax.talker.layout (its docstring defines each field):
  talker_text_src, talker_text_id, talker_codes_in, talker_labels, talker_segment_ids, talker_anchor,
  talker_offset
DiT rows (present when the bucket trains the DiT: omni_jax.token2wav.targets / objective): one per Thinker row,
holding at most one spoken reply (its last spoken message's triple); F = the bucket's token2wav_frames:
  token2wav_codes      [B, F / repeats] int32   the reply's speech codes (0 past its end)
  token2wav_mel        [B, F, 80] float32       target log mel (100 frames/s; the silence level past its end)
  token2wav_lengths    [B] int32                real mel frames (0: the row carries no reply; the loss skips it)
  token2wav_reference  [B, R, 80] float32       the speaker's reference mel for ECAPA (R = token2wav_ref_frames)
Preference pairs (present in every batch of a DPO run: config.dpo; omni_jax.input.pairs). A pair is two
segments of one row, the prompt + the chosen reply and the same prompt + the rejected reply, side by side; their
labels are the usual SFT labels on the reply only (IGNORE on the prompt, earlier assistant turns included). A
row holds at most config.dpo.max_pairs_per_row = P pairs, numbered p = 1..P within the row:
  dpo_pair         [B, L] int32   2p-1 on every token of pair p's chosen segment, 2p on its rejected one, 0
                                  elsewhere (SFT samples, padding, and pairs whose two texts are the same)
  talker_dpo_pair  [B, T] int32   the same numbering on the Talker positions (talker_segment_ids) of a pair
                                  whose two replies are spoken; present when the Talker fields are
A pair is marked in dpo_pair when its reply texts differ (a Thinker preference) and in talker_dpo_pair when
both replies are spoken (a Talker preference: the same text with two code sequences, for a voice or a pace);
it may be both. A pair's number is the same in both fields; some numbers may appear in one field only.
"""

from typing import Mapping

import numpy as np

IGNORE = -100
KIND_TEXT, KIND_IMAGE, KIND_AUDIO, KIND_VIDEO = 0, 1, 2, 3
KINDS = {"text": KIND_TEXT, "image": KIND_IMAGE, "audio": KIND_AUDIO, "video": KIND_VIDEO}

TEXT_FIELDS = ("input_ids", "labels", "segment_ids", "kind")
TALKER_FIELDS = ("talker_text_src", "talker_text_id", "talker_codes_in", "talker_labels", "talker_segment_ids",
                 "talker_anchor", "talker_offset")
TOKEN2WAV_FIELDS = {"token2wav_codes": 2, "token2wav_mel": 3, "token2wav_lengths": 1, "token2wav_reference": 3}
# Per-token like the text / Talker fields they follow (field -> the field whose shape it has).
DPO_FIELDS = {"dpo_pair": "input_ids", "talker_dpo_pair": "talker_segment_ids"}
MEDIA_FIELDS = {
    "pixel_values": 3, "image_grid_thw": 3, "pixel_values_videos": 3, "video_grid_thw": 3,
    "second_per_grids": 2, "audio_features": 4, "audio_lengths": 2,
}


def check(batch: Mapping[str, np.ndarray]) -> None:
  """Raise ValueError naming the field when a batch breaks the contract (shapes, not values)."""
  missing = [f for f in TEXT_FIELDS if f not in batch]
  if missing:
    raise ValueError(f"batch is missing fields {missing}")
  b, l = np.shape(batch["input_ids"])
  for f in TEXT_FIELDS:
    if np.shape(batch[f]) != (b, l):
      raise ValueError(f"batch[{f!r}] has shape {np.shape(batch[f])}, expected {(b, l)}")
  if "use_audio_in_video" in batch and np.shape(batch["use_audio_in_video"]) != (b,):
    raise ValueError(f"batch['use_audio_in_video'] has shape {np.shape(batch['use_audio_in_video'])}, expected {(b,)}")
  for f, ndim in MEDIA_FIELDS.items():
    if f in batch and (np.ndim(batch[f]) != ndim or np.shape(batch[f])[0] != b):
      raise ValueError(f"batch[{f!r}] has shape {np.shape(batch[f])}: expected {ndim} dims with {b} rows first")
  talker = [f for f in TALKER_FIELDS if f in batch]
  if talker and len(talker) != len(TALKER_FIELDS):
    raise ValueError(f"batch has Talker fields {talker} but not all of {list(TALKER_FIELDS)}")
  for f in talker:
    if np.ndim(batch[f]) != 2 or np.shape(batch[f]) != np.shape(batch["talker_segment_ids"]) or np.shape(batch[f])[0] != b:
      raise ValueError(f"batch[{f!r}] has shape {np.shape(batch[f])}: expected [{b}, talker_seq_len] like "
                       "talker_segment_ids")
  dit = [f for f in TOKEN2WAV_FIELDS if f in batch]
  if dit and len(dit) != len(TOKEN2WAV_FIELDS):
    raise ValueError(f"batch has DiT fields {dit} but not all of {list(TOKEN2WAV_FIELDS)}")
  for f in dit:
    if np.ndim(batch[f]) != TOKEN2WAV_FIELDS[f] or np.shape(batch[f])[0] != b:
      raise ValueError(f"batch[{f!r}] has shape {np.shape(batch[f])}: expected {TOKEN2WAV_FIELDS[f]} dims with {b} "
                       "rows first")
  if dit:
    frames, codes = np.shape(batch["token2wav_mel"])[1], np.shape(batch["token2wav_codes"])[1]
    if codes == 0 or frames % codes:
      raise ValueError(f"batch['token2wav_codes'] has {codes} codes per row for {frames} mel frames: expected a "
                       "whole number of frames per code (the DiT's repeats)")
  for f, like in DPO_FIELDS.items():
    if f not in batch:
      continue
    if like not in batch:
      raise ValueError(f"batch[{f!r}] is given without {like!r}, whose positions it numbers")
    if np.shape(batch[f]) != np.shape(batch[like]):
      raise ValueError(f"batch[{f!r}] has shape {np.shape(batch[f])}, expected {np.shape(batch[like])} like {like!r}")
  if "talker_dpo_pair" in batch and "dpo_pair" not in batch:
    raise ValueError("batch has 'talker_dpo_pair' but not 'dpo_pair'")
  if "dpo_pair" in batch and "talker_segment_ids" in batch and "talker_dpo_pair" not in batch:
    raise ValueError("batch has 'dpo_pair' and the Talker fields but not 'talker_dpo_pair'")
  unknown = (set(batch) - set(TEXT_FIELDS) - set(MEDIA_FIELDS) - set(TALKER_FIELDS) - set(TOKEN2WAV_FIELDS)
             - set(DPO_FIELDS) - {"use_audio_in_video"})
  if unknown:
    raise ValueError(f"batch has unknown fields {sorted(unknown)}")

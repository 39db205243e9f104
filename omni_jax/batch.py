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
Tower fields: a tower that trains on more than the text adds its own fields through its data hook
(omni_jax.towers.TowerData: names, dims, which buckets carry them); the built-in ones document theirs in their
`data` modules. A tower's fields are all present in a bucket that gives the tower room, or all absent.
Preference pairs (present in every batch of a DPO run: config.dpo; omni_jax.input.pairs). A pair is two
segments of one row, the prompt + the chosen reply and the same prompt + the rejected reply, side by side; their
labels are the usual SFT labels on the reply only (IGNORE on the prompt, earlier assistant turns included). A
row holds at most config.dpo.max_pairs_per_row = P pairs, numbered p = 1..P within the row:
  dpo_pair         [B, L] int32   2p-1 on every token of pair p's chosen segment, 2p on its rejected one, 0
                                  elsewhere (SFT samples, padding, and pairs whose two texts are the same)
A pair is marked in dpo_pair when its reply texts differ (a preference between texts); a tower that learns the
preference from its own targets of the two replies (e.g. the speech codes of two spoken replies) numbers the
pair in a pair field of its own (TowerData.pair_fields), with the same number, present with dpo_pair; some
numbers may appear in one field only.
"""

from typing import Mapping, Sequence

import numpy as np

IGNORE = -100
KIND_TEXT, KIND_IMAGE, KIND_AUDIO, KIND_VIDEO = 0, 1, 2, 3
KINDS = {"text": KIND_TEXT, "image": KIND_IMAGE, "audio": KIND_AUDIO, "video": KIND_VIDEO}

TEXT_FIELDS = ("input_ids", "labels", "segment_ids", "kind")
PAIR_FIELD = "dpo_pair"  # [B, L] like input_ids
TOKEN_FIELDS = TEXT_FIELDS + (PAIR_FIELD,)  # per token: [B, L]
MEDIA_FIELDS = {
    "pixel_values": 3, "image_grid_thw": 3, "pixel_values_videos": 3, "video_grid_thw": 3,
    "second_per_grids": 2, "audio_features": 4, "audio_lengths": 2,
}


def check(batch: Mapping[str, np.ndarray], towers: Sequence = ()) -> None:
  """Raise ValueError naming the field when a batch breaks the contract (shapes, not values).

  towers: the data hooks of the towers whose fields the batch may hold (omni_jax.towers.data_hooks(); each with
  `name`, `fields` {field: dims}, `pair_fields` and check(batch)): any other field is unknown.
  """
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
  if PAIR_FIELD in batch and np.shape(batch[PAIR_FIELD]) != (b, l):
    raise ValueError(f"batch[{PAIR_FIELD!r}] has shape {np.shape(batch[PAIR_FIELD])}, expected {(b, l)} like "
                     "'input_ids'")
  known = set(TEXT_FIELDS) | set(MEDIA_FIELDS) | {PAIR_FIELD, "use_audio_in_video"}
  for tower in towers:
    known |= set(tower.fields)
    always = [f for f in tower.fields if f not in tower.pair_fields]
    present = [f for f in always if f in batch]
    if present and len(present) != len(always):
      raise ValueError(f"batch has {tower.name} fields {present} but not all of {always}")
    for f, ndim in tower.fields.items():
      if f in batch and (np.ndim(batch[f]) != ndim or np.shape(batch[f])[0] != b):
        raise ValueError(f"batch[{f!r}] has shape {np.shape(batch[f])}: expected {ndim} dims with {b} rows first")
    for f in sorted(tower.pair_fields):
      if f in batch and PAIR_FIELD not in batch:
        raise ValueError(f"batch has {f!r} but not {PAIR_FIELD!r}")
      if f not in batch and PAIR_FIELD in batch and present:
        raise ValueError(f"batch has {PAIR_FIELD!r} and the {tower.name} fields but not {f!r}")
    tower.check(batch)
  unknown = set(batch) - known
  if unknown:
    raise ValueError(f"batch has unknown fields {sorted(unknown)}")

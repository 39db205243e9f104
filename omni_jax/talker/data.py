"""The Talker's data hook (omni_jax.towers.TowerData): its rows in the batches. Numpy only (the data workers).

One Talker row per Thinker row, T = the bucket's talker_seq_len positions (0: the bucket carries no Talker rows,
so it takes no sample with a spoken reply that trains the Talker). Each spoken sample of the row lays out its
prompt, the speaker row and its codes there (layout.write; layout.py defines each field), one after another:
  talker_text_src, talker_text_id, talker_codes_in, talker_labels, talker_segment_ids, talker_anchor,
  talker_offset                   [B, T] int32
In a preference run (config.dpo), a pair whose two replies are both spoken is numbered on its Talker positions
as dpo_pair numbers it on the tokens (omni_jax.batch):
  talker_dpo_pair                 [B, T] int32
"""

from typing import Mapping, Sequence

import numpy as np

from omni_jax import towers
from omni_jax.talker import layout
from omni_jax.talker import targets as targets_lib

PAIR_FIELD = "talker_dpo_pair"
SIZE = "talker_seq_len"


class TalkerData(towers.TowerData):
  name = "talker"
  fields = {**{f: 2 for f in layout.FIELDS}, PAIR_FIELD: 2}
  token_fields = frozenset(fields)
  pair_fields = frozenset({PAIR_FIELD})
  sizes = {SIZE: 0}

  def targets(self, config, preference, train_sources):
    # A run that prefers between spoken replies (talker_dpo) builds them too, from replies given as codes if
    # there is no codes index. A run that does not train the Talker (a DiT-only one) gets no Talker rows.
    dpo = preference and towers.trains(config, "talker_dpo")
    if not (towers.trains(config, "talker_codes") or dpo):
      return None
    return targets_lib.from_config(config, without_index=dpo)

  def check_sizes(self, sizes):
    if sizes.get(SIZE, 0) < 0:
      raise ValueError(f"{SIZE} must be >= 0, got {sizes[SIZE]}")

  def fits(self, targets: Sequence[layout.SpokenReply], sizes: Mapping[str, int]) -> bool:
    return sum(t.talker_len for t in targets) <= sizes.get(SIZE, 0)

  def describe(self, targets):
    return f"{sum(t.talker_len for t in targets)} Talker positions"

  def empty(self, rows, sizes, pairs):
    length = sizes.get(SIZE, 0)
    if not length:
      return {}
    row = layout.empty_row(length)
    out = {f: np.repeat(row[f][None], rows, axis=0) for f in layout.FIELDS}
    if pairs:
      out[PAIR_FIELD] = np.zeros((rows, length), np.int32)
    return out

  def write(self, batch, row, cursor, at, segment, target, pair):
    end = layout.write({f: batch[f][row] for f in layout.FIELDS}, cursor, at, segment, target)
    if pair and PAIR_FIELD in batch:
      batch[PAIR_FIELD][row, cursor:end] = pair
    return end

  def check(self, batch):
    if "talker_segment_ids" not in batch:
      if PAIR_FIELD in batch:
        raise ValueError(f"batch[{PAIR_FIELD!r}] is given without 'talker_segment_ids', whose positions it numbers")
      return
    shape = np.shape(batch["talker_segment_ids"])
    for f in self.fields:
      if f in batch and np.shape(batch[f]) != shape:
        raise ValueError(f"batch[{f!r}] has shape {np.shape(batch[f])}: expected [{shape[0]}, talker_seq_len] "
                         f"{shape} like talker_segment_ids")


DATA = TalkerData()

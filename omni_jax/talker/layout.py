"""The Talker's teacher-forced sequence, laid out on the host exactly as inference builds it.

A spoken reply is a sample whose Thinker row holds a prompt of L tokens p_0..p_{L-1} followed by the reply
tokens g_0..g_{N-1} (its content and <|im_end|>), and whose speech is M codes c_0..c_{M-1}. Its Talker sequence
has L + 2 + M positions; position i takes as input the sum of

  text track   i < L:        H(p_i) + E(p_i)  (E zeroed at media placeholders)
               i = L:        the bare embedding of the speaker's bos token
               i = L+1+k:    H(g_k) + E(g_k) for k <= N-2, then the bare tts-eos embedding (k = N-1), then
                             tts-pad for ever (inference's queue, whose last element repeats)
  codec track  i < L:        nothing (transformers fills input_ids with the mask id, never embedded)
               i = L:        codec pad;  i = L+1: codec bos;  i = L+1+k (k >= 1): the previous code c_{k-1}

and predicts c_k at position L+1+k (k < M) and the codec end id at L+1+M. Positions: the prompt keeps the
Thinker's TMRoPE ids; position L+j (j >= 0) continues from the last prompt token's id: id(p_{L-1}) + 1 + j.

The layout is expressed per Talker position as indices into the sample's Thinker row (so the step gathers the
hidden states it needs inside jit) and is pure numpy: it runs in the data-pipeline workers.
"""

import dataclasses

import numpy as np

from omni_jax.batch import IGNORE

NONE = -1  # no text-track source / no codec input at this position

# The per-position fields of a Talker row, [B, T] int32 each (the batch fields of omni_jax.talker.data).
FIELDS = ("talker_text_src", "talker_text_id", "talker_codes_in", "talker_labels", "talker_segment_ids",
          "talker_anchor", "talker_offset")


@dataclasses.dataclass(frozen=True)
class CodecIds:
  bos: int
  eos: int
  pad: int
  text_eos: int  # Thinker-vocabulary ids of the text stream's eos / pad rows
  text_pad: int


@dataclasses.dataclass(frozen=True)
class SpokenReply:
  """What a sample carries for the Talker: its reply's token span in the sample, its codes and speaker token."""
  reply_start: int  # index of g_0 in the sample's tokens (= the prompt length L)
  reply_len: int  # N: reply content + <|im_end|>
  codes: np.ndarray  # [M] int32 speech codes
  speaker_token: int  # Thinker-vocabulary id whose embedding opens the text track (the speaker's bos)
  ids: CodecIds

  @property
  def talker_len(self) -> int:
    return self.reply_start + 2 + len(self.codes)


def empty_row(length: int) -> dict:
  out = {f: np.full((length,), NONE, np.int32) for f in FIELDS}
  out["talker_labels"][:] = IGNORE
  out["talker_segment_ids"][:] = 0
  out["talker_offset"][:] = 0
  out["talker_anchor"][:] = 0
  return out


def write(row: dict, at: int, thinker_at: int, segment: int, reply: SpokenReply) -> int:
  """Lay one spoken reply into `row` (a dict of [T] arrays) from Talker slot `at`; its Thinker tokens start at
  `thinker_at` in the Thinker row. Returns the next free Talker slot."""
  big_l, n, codes, ids = reply.reply_start, reply.reply_len, np.asarray(reply.codes, np.int32), reply.ids
  m = len(codes)
  end = at + big_l + 2 + m
  prompt = slice(at, at + big_l)
  row["talker_segment_ids"][at:end] = segment
  row["talker_text_src"][prompt] = thinker_at + np.arange(big_l)
  row["talker_anchor"][prompt] = thinker_at + np.arange(big_l)
  row["talker_offset"][prompt] = 0
  last = thinker_at + big_l - 1
  tail = slice(at + big_l, end)  # the speaker row, then the L+1+k rows
  row["talker_anchor"][tail] = last
  row["talker_offset"][tail] = 1 + np.arange(2 + m)
  # The speaker row.
  row["talker_text_id"][at + big_l] = reply.speaker_token
  row["talker_codes_in"][at + big_l] = ids.pad
  # Rows L+1+k, k = 0..M: text track reply_k (k <= N-2), tts eos (k = N-1), tts pad (k >= N).
  k = np.arange(m + 1)
  slots = at + big_l + 1 + k
  reply_rows = k <= n - 2
  row["talker_text_src"][slots[reply_rows]] = thinker_at + big_l + k[reply_rows]
  row["talker_text_id"][slots[k == n - 1]] = ids.text_eos
  row["talker_text_id"][slots[k >= n]] = ids.text_pad
  row["talker_codes_in"][slots] = np.concatenate([[ids.bos], codes]).astype(np.int32)
  row["talker_labels"][slots] = np.concatenate([codes, [ids.eos]]).astype(np.int32)
  return end

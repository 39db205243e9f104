"""The Talker's inputs at inference, from a Thinker generation: its prompt batch and generated ids.

The sequence is the one training lays out (omni_jax.talker.layout), so training and inference cannot drift:
`speech_batch` lays each row out with layout.write (the prompt, the speaker row, reply_0 + codec bos, then the
text-track queue reply_1.., tts eos, tts pad) with the reply length given by transformers' batched first-eos
rule (`reply_lengths`), and the text track comes from one teacher-forced Thinker forward over prompt +
generated ids (omni_jax.talker.objective.talker_inputs, the training code path). That forward gives the
hidden states the decode loop gave (same positions, same causal attention; equal within float rounding),
costs one prefill-sized pass, keeps the Thinker's decode loop lean, and works from any (prompt, reply) pair.

Rows (left padding kept, as transformers does): [0, L) the prompt (L = padded prompt length), L the speaker
row (+ codec pad), L+1 reply_0 (+ codec bos) -- the prefill --, then L+1+k (k = 1..N) the text track of decode
step k without its codec half (the decode loop adds the embedding of the previous code); steps past N repeat
the last row (tts pad), like transformers' queue whose last element stays.
"""

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax import batch as batch_lib
from omni_jax.models.talker import TalkerConfig
from omni_jax.talker import layout
from omni_jax.talker import objective

# Fields of the Talker rows that inference uses (labels are training's only).
_FIELDS = tuple(f for f in layout.FIELDS if f != "talker_labels")


def reply_lengths(tokens: np.ndarray, eos_token_ids: Sequence[int]) -> np.ndarray:
  """[B] reply lengths N (content + stop token) by transformers' batched rule: first_eos = the first stop id
  in the row's generated ids, clamped to [1, n - 1] (n = generated columns); N = first_eos + 1. A row without
  a stop id thus ends its text track with its last generated column."""
  tokens = np.asarray(tokens)
  n = tokens.shape[1]
  is_eos = np.isin(tokens, np.asarray(tuple(eos_token_ids), tokens.dtype))
  first = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), n)
  return np.maximum(np.minimum(first, n - 1), 1) + 1


def codec_ids(cfg: TalkerConfig) -> layout.CodecIds:
  return layout.CodecIds(bos=cfg.tts_codec_start_token_id, eos=cfg.tts_codec_end_token_id,
                         pad=cfg.tts_codec_pad_token_id, text_eos=cfg.tts_text_end_token_id,
                         text_pad=cfg.tts_text_pad_token_id)


def speech_batch(prompt: Mapping[str, np.ndarray], tokens: np.ndarray, cfg: TalkerConfig,
                 speaker_tokens: Sequence[int], eos_token_ids: Sequence[int]) -> dict:
  """The host batch of one speech generation: the Thinker row (prompt + generated ids, media of the prompt)
  and the Talker rows laid out by layout.write.

  prompt: the prompt batch the Thinker generated from (omni_jax.batch fields, left padded, one sample a row);
  tokens [B, N]: the generated ids (pad after a row's stop id); speaker_tokens [B]: each row's speaker bos id.
  """
  tokens = np.asarray(tokens, np.int32)
  ids = np.asarray(prompt["input_ids"], np.int32)
  seg = np.asarray(prompt["segment_ids"], np.int32)
  (b, big_l), n = ids.shape, tokens.shape[1]
  if tokens.shape[0] != b or len(speaker_tokens) != b:
    raise ValueError(f"{b} prompts, {tokens.shape[0]} generated rows and {len(speaker_tokens)} speakers")
  if n < 1:
    raise ValueError("no generated tokens to speak")
  if np.any((seg > 0).sum(axis=1) == 0):
    raise ValueError("a prompt row is empty (segment_ids all 0)")
  out = {k: np.asarray(v) for k, v in prompt.items() if k in batch_lib.MEDIA_FIELDS or k == "use_audio_in_video"}
  out["input_ids"] = np.concatenate([ids, tokens], axis=1)
  # The reply attends to its prompt; columns after a row's stop only feed rows the first-eos rule replaces.
  out["segment_ids"] = np.concatenate([(seg > 0).astype(np.int32), np.ones((b, n), np.int32)], axis=1)
  codec = codec_ids(cfg)
  rows = []
  for r, (length, speaker) in enumerate(zip(reply_lengths(tokens, eos_token_ids), speaker_tokens)):
    row = layout.empty_row(big_l + 2 + n)
    reply = layout.SpokenReply(reply_start=big_l, reply_len=int(length), codes=np.zeros((n,), np.int32),
                               speaker_token=int(speaker), ids=codec)
    layout.write(row, 0, 0, 1, reply)
    row["talker_segment_ids"][:big_l] = (seg[r] > 0).astype(np.int32)
    row["talker_codes_in"][big_l + 2:] = layout.NONE  # the decode loop adds the previous code's embedding
    rows.append(row)
  for f in _FIELDS:
    out[f] = np.stack([row[f] for row in rows]).astype(np.int32)
  return out


def prefill_inputs(model, batch: Mapping[str, jax.Array], prompt_len: int) -> dict:
  """Inside jit: the Talker prefill and the decode steps' text track of a speech_batch.

  Returns inputs [B, L+2, D] (model dtype), positions [3, B, L+2], segment_ids [B, L+2], queue [B, N+1, D]
  (row j: the text track of Talker row L+1+j; rows j >= 1 feed decode step j) and seen [B, V] bool: the ids
  transformers' repetition penalty sees in the Talker's input_ids (the mask id of each real prompt row, codec
  pad, codec bos).
  """
  x, positions = objective.talker_inputs(model, batch)
  split = prompt_len + 2
  seg = batch["talker_segment_ids"][:, :split]
  cfg = model.talker.cfg
  vocab = cfg.text.vocab_size
  b = seg.shape[0]
  seen = jnp.zeros((b, vocab), bool).at[:, cfg.tts_codec_mask_token_id].set(jnp.any(seg[:, :prompt_len] > 0, axis=1))
  seen = seen.at[:, cfg.tts_codec_pad_token_id].set(True).at[:, cfg.tts_codec_start_token_id].set(True)
  return dict(inputs=x[:, :split], positions=positions[:, :, :split], segment_ids=seg, queue=x[:, prompt_len + 1:],
              seen=seen)

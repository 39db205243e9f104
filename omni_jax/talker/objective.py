"""The `talker_codes` objective: next-code cross-entropy of the Talker over speech codes and the end code,
teacher-forced on the sequence omni_jax.talker.layout lays out (the same inputs inference builds).

The text track comes from the Thinker's forward on the same batch (shared with `thinker_text`, one forward);
config.model.talker.thinker_gradient=False stops the code loss's gradient at the Talker's inputs, so the
Thinker trains on its text loss only. Sums are per modality of the sample (omni_jax.batch.KINDS), like the
Thinker's, and divided by the global number of code targets.

`talker_dpo` (omni_jax.dpo): DPO / IPO on pairs of spoken replies (two code sequences for the same text, marked
by talker_dpo_pair on the Talker rows), each reply's log-probability summed over the code targets of the code
loss, from the same logits; divided by the number of pairs of the global batch.
"""

from typing import Mapping

import jax
import jax.numpy as jnp

from omni_jax import batch as batch_lib
from omni_jax import dpo as dpo_lib
from omni_jax import preference, towers
from omni_jax.models.talker import zero_media_rows
from omni_jax.talker.layout import NONE
from omni_jax.thinker import inputs as thinker_inputs
from omni_jax.thinker import objective as thinker_objective

Batch = Mapping[str, jax.Array]


def _take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B, L, D], index [B, T] -> [B, T, D]."""
  return jnp.take_along_axis(x, jnp.clip(index, 0)[..., None], axis=1)


def talker_inputs(model, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """(inputs_embeds [B, T, D] of the Talker rows, positions [3, B, T]) from the Thinker's forward."""
  thinker, talker = model.thinker, model.talker
  out = thinker_inputs.outputs(thinker, batch)
  ids = thinker.ids
  embeds = out["embeds"].astype(jnp.float32)
  zeroed = zero_media_rows(embeds, batch["input_ids"], (ids.audio_token_id, ids.image_token_id, ids.video_token_id))
  hidden = out["hidden"].astype(jnp.float32)
  text_ids = batch["talker_text_id"]
  bare = thinker.embed(jnp.clip(text_ids, 0)).astype(jnp.float32)
  if not talker.cfg.thinker_gradient:
    hidden, embeds, zeroed, bare = (jax.lax.stop_gradient(x) for x in (hidden, embeds, zeroed, bare))
  src = batch["talker_text_src"]
  # Media rows are zeroed in the prompt only (offset 0); a reply row keeps its embedding whatever its id, as
  # transformers does (it zeroes the prompt's input embeddings, not the generated tokens').
  prompt_row = (batch["talker_offset"] == 0)[..., None]
  track = _take_rows(hidden, src) + jnp.where(prompt_row, _take_rows(zeroed, src), _take_rows(embeds, src))
  text = jnp.where((src != NONE)[..., None], track, jnp.where((text_ids != NONE)[..., None], bare, 0.0))
  codes_in = batch["talker_codes_in"]
  codec = jnp.where((codes_in != NONE)[..., None], talker.codec_embed(jnp.clip(codes_in, 0)).astype(jnp.float32),
                    0.0)
  anchor = jnp.broadcast_to(batch["talker_anchor"][None], (3,) + batch["talker_anchor"].shape)
  positions = jnp.take_along_axis(out["positions"], anchor, axis=2) + batch["talker_offset"][None]
  return (text + codec).astype(talker.model.rt.dtype), positions


def talker_logits(model, batch: Batch) -> jax.Array:
  """The Talker's float32 code logits [B, T, V] on the batch's Talker rows, shared by the objectives of one batch
  (omni_jax.towers.shared): the code loss and talker_dpo take one forward."""

  def forward():
    x, positions = talker_inputs(model, batch)
    return model.talker(x, positions, batch["talker_segment_ids"])

  return towers.shared("talker", forward)


def code_loss(model, batch: Batch, rng: jax.Array, evaluate: bool = False) -> dict:
  """Sums of the code cross-entropy (and, with evaluate, correct argmax codes) per modality of the sample."""
  del rng
  if "talker_labels" not in batch:  # a bucket without Talker rows: nothing to learn here
    zeros = jnp.zeros((len(batch_lib.KINDS),), jnp.float32)
    return {"loss_sum": zeros, "count": zeros, **({"correct": zeros} if evaluate else {})}
  logits = talker_logits(model, batch)
  labels = batch["talker_labels"]
  valid = labels != batch_lib.IGNORE
  kind = _take_rows(batch["kind"][..., None], batch["talker_anchor"])[..., 0]  # the sample's modality
  return thinker_objective.per_kind_sums(logits, jnp.where(valid, labels, 0), valid, kind, evaluate)


def num_codes(batch: Batch) -> jax.Array:
  """Code targets in the whole (global) batch: the normaliser of the objective."""
  if "talker_labels" not in batch:
    return jnp.zeros((), jnp.int32)
  return jnp.sum(batch["talker_labels"] != batch_lib.IGNORE)


def pair_logprobs(logits: jax.Array, batch: Batch, max_pairs: int) -> preference.PairLogps:
  """Per-row, per-pair sums [B, max_pairs] of the code targets' log-probs of the chosen and rejected spoken
  replies (the targets of the code loss, grouped by talker_dpo_pair)."""
  labels = batch["talker_labels"]
  valid = labels != batch_lib.IGNORE
  logp = thinker_objective.target_logprobs(logits, jnp.where(valid, labels, 0))
  return preference.pair_sums(logp, valid, batch["talker_dpo_pair"], max_pairs)


def dpo_loss(model, batch: Batch, rng: jax.Array, evaluate: bool = False) -> dict:
  """The `talker_dpo` objective: DPO / IPO sums over the batch's pairs of spoken replies (omni_jax.dpo); the
  reference runs the reference Thinker and Talker (the policy's Thinker forward when the Thinker does not
  train) under stop_gradient."""
  del rng, evaluate
  cfg = dpo_lib.settings(model.talker)
  if cfg is None or "talker_dpo_pair" not in batch or "talker_labels" not in batch:
    return preference.zero_sums()
  policy = pair_logprobs(talker_logits(model, batch), batch, cfg.max_pairs_per_row)

  def reference(ref):
    return pair_logprobs(talker_logits(ref, batch), batch, cfg.max_pairs_per_row)

  thinker_out = thinker_inputs.outputs(model.thinker, batch)  # shared with the policy's forward above
  return cfg.sums(policy, dpo_lib.reference(model, cfg, "talker_dpo", reference, ("thinker", "talker"),
                                            {"thinker": thinker_out}))


def num_dpo_pairs(batch: Batch) -> jax.Array:
  """Pairs of spoken replies (both with code targets) in the whole (global) batch: talker_dpo's normaliser."""
  if "talker_dpo_pair" not in batch or "talker_labels" not in batch:
    return jnp.zeros((), jnp.int32)
  return preference.count_pairs(batch["talker_labels"] != batch_lib.IGNORE, batch["talker_dpo_pair"])

"""The Thinker's objectives (omni_jax.towers.Objective): `thinker_text` and `thinker_dpo`.

`thinker_text`: next-token cross-entropy over label tokens that never crosses a packed-segment boundary, summed
per modality (omni_jax.batch.KINDS); the step divides the sums by the label count of the whole global batch
(inputs.label_mask), so k micro-batches of b rows give the same update as one batch of k*b rows.

`thinker_dpo` (omni_jax.dpo): DPO / IPO on the pairs of text replies the batch's dpo_pair marks, with each
reply's log-probability summed over the same label tokens, from the same logits, as the text loss; divided by
the number of pairs of the global batch.
"""

import dataclasses
import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from omni_jax import batch as batch_lib
from omni_jax import dpo as dpo_lib
from omni_jax import preference, sharding
from omni_jax.layers import head_loss
from omni_jax.layers.head_loss import HIDDEN_NAMES
from omni_jax.models.thinker import Thinker
from omni_jax.thinker.inputs import label_mask, outputs

NUM_KINDS = len(batch_lib.KINDS)
Batch = Mapping[str, jax.Array]


target_logprobs = head_loss.target_logprobs  # log p(target) in float32: what every loss of the tower takes


def kind_counts(valid, kind) -> jax.Array:
  """Valid targets per modality `kind`: [NUM_KINDS] float32."""
  return jnp.sum(jax.nn.one_hot(kind, NUM_KINDS, dtype=jnp.float32) * valid[..., None], axis=(0, 1))


def per_kind_sums(logits, targets, valid, kind, with_accuracy: bool = False) -> dict:
  """Cross-entropy sums (and argmax hits) of valid targets per modality `kind`: the objectives' sum format."""
  out = {"loss_sum": head_loss.group_sums(-target_logprobs(logits, targets), valid, kind, NUM_KINDS),
         "count": kind_counts(valid, kind)}
  if with_accuracy:
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    out["correct"] = head_loss.group_sums(correct, valid, kind, NUM_KINDS)
  return out


@dataclasses.dataclass(frozen=True)
class LossLayout:
  """How the LM head meets the labels (config.train; docs/training.md "The LM head and its loss").

  chunk: positions per chunk of the head + cross-entropy (0: all at once). Each chunk's logits
    [B, chunk, V] live only inside a rematerialised scan step, so the step never holds [B, L, V].
  label_budget: labelled positions per row gathered before the head (0: every position). In SFT data most
    positions carry no label (the prompt, the media), so the 151,936-wide head runs on the budget only. The
    training loss pools the budget over the rows each device holds (rows differ: a long reply beside short
    ones fits); a batch whose labels do not fit takes the every-position path instead (lax.cond), so the loss
    is always exact.
  fused: the training loss's head + cross-entropy computes its gradient in the forward pass
    (omni_jax.layers.head_loss): neither the logits kept nor the chunks' logits recomputed. Evaluation, the
    accuracy and a head that is more than a matrix (Thinker.head_weight) take the plain path.
  """
  chunk: int = 0
  label_budget: int = 0
  fused: bool = False

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "LossLayout":
    t = config.get("train", {})
    return cls(int(t.get("loss_chunk_size", 0) or 0), int(t.get("label_budget", 0) or 0),
               bool(t.get("fused_head_loss", True)))


def _row_groups(rows: int, length: int) -> int:
  """Groups of rows that pool their label budget: one per shard of the batch axis (inside sharding.activate();
  one outside it), so that each group's gather stays on its device. Where the length axis is sharded as well
  (context parallelism), each row is a group of its own."""
  active = sharding.active()
  if active is None:
    return 1
  mesh, rules = active
  spec = tuple(sharding.logical_to_spec(HIDDEN_NAMES[:2], (rows, length), mesh, rules, strict=False))
  batch_axes, length_axes = (spec + (None, None))[:2]
  if length_axes:
    return rows
  return math.prod(mesh.shape[a] for a in jax.tree.leaves(batch_axes))


def _over_labels(reduce: Callable, hidden: jax.Array, batch: Batch, layout: LossLayout, extra,
                 pool_rows: bool = False) -> dict:
  """reduce(h, targets, valid, extra, chunk) (sums additive over positions) over the label positions of a
  batch: all of them in chunks, or the labelled ones gathered under layout.label_budget. pool_rows: the rows a
  device holds share their budget (for sums that are totals, not per row)."""
  valid = label_mask(batch)
  targets = jnp.where(valid, batch["labels"][:, 1:], 0)
  h = hidden[:, :-1]
  budget = layout.label_budget
  rows, length = valid.shape
  if not budget or budget >= length:
    return reduce(h, targets, valid, extra, layout.chunk)
  groups = _row_groups(rows, length) if pool_rows else rows

  def every_position():  # the rare over-budget batch: chunked (budget-sized chunks by default), so that this
    # branch's buffers (lax.cond allocates both) stay as small as the labelled branch's
    return reduce(h, targets, valid, extra, layout.chunk or budget)

  def grouped(x):  # [B, L, ...] -> [groups, B / groups * L, ...]: a device's rows end to end
    return x.reshape((groups, -1) + x.shape[2:])

  def labelled_only():
    g_valid = grouped(valid)
    order = jnp.argsort(~g_valid, axis=1, stable=True)[:, :budget * rows // groups]  # labelled positions first
    take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
    return reduce(take(grouped(h)), take(grouped(targets)), take(g_valid), tuple(take(grouped(x)) for x in extra),
                  layout.chunk)

  fits = jnp.all(jnp.sum(grouped(valid), axis=1) <= budget * rows // groups)
  return jax.lax.cond(fits, labelled_only, every_position)


def head_sums(thinker: Thinker, hidden: jax.Array, batch: Batch, layout: LossLayout, sums: Callable,
              *extra: jax.Array, pool_rows: bool = False) -> dict:
  """sums(logits, targets, valid, *extra) over the label positions of a batch (additive over positions), with
  the LM head applied to the final hidden states as `layout` says: logits [B, T, V] of a chunk of positions in
  the compute dtype (sums widen inside their reductions, as target_logprobs does), targets / valid [B, T]
  (label_mask), extra: per-position fields [B, L-1] aligned with the targets (e.g. batch["kind"][:, 1:]).
  pool_rows: rows share the label budget (_over_labels), where the sums are totals rather than per row."""

  def of_hidden(hid, *rest):
    return sums(thinker.logits(hid), *rest)

  def reduce(h, targets, valid, ex, chunk):
    return head_loss.chunked_sums(of_hidden, h, targets, valid, ex, chunk)

  return _over_labels(reduce, hidden, batch, layout, extra, pool_rows)


def hidden_token_stats(thinker: Thinker, hidden: jax.Array, batch: Batch, layout: LossLayout,
                       with_accuracy: bool = False) -> dict:
  """token_stats from the final hidden states, with the head applied as `layout` says (same sums)."""
  kind = batch["kind"][:, 1:]
  head = thinker.head_weight(hidden.dtype) if layout.fused and not with_accuracy else None
  if head is None:
    return head_sums(thinker, hidden, batch, layout,
                     lambda logits, y, m, k: per_kind_sums(logits, y, m, k, with_accuracy), kind, pool_rows=True)
  weight, names = head

  def fused(h, targets, valid, ex, chunk):
    (k,) = ex
    return {"loss_sum": head_loss.grouped_nll_sums(h, weight, targets, valid, k, NUM_KINDS, chunk, names),
            "count": kind_counts(valid, k)}

  return _over_labels(fused, hidden, batch, layout, (kind,), pool_rows=True)


def text_loss(model, batch: Batch, rng: jax.Array, evaluate: bool = False) -> dict:
  """The `thinker_text` objective: next-token cross-entropy of the Thinker (deterministic: rng unused)."""
  del rng
  out = outputs(model.thinker, batch)
  layout = getattr(model.thinker, "loss_layout", LossLayout())
  return hidden_token_stats(model.thinker, out["hidden"], batch, layout, with_accuracy=evaluate)


def num_labels(batch: Batch) -> jax.Array:
  return jnp.sum(label_mask(batch))


def pair_logprobs(thinker: Thinker, hidden: jax.Array, batch: Batch, layout: LossLayout,
                  max_pairs: int) -> preference.PairLogps:
  """Per-row, per-pair sums [B, max_pairs] of the label log-probs of the chosen and rejected replies (the label
  tokens and logits of the text loss; a label belongs to the pair of its own token's dpo_pair)."""

  def sums(logits, y, m, pair):
    return preference.segment_totals(target_logprobs(logits, y), m, pair, max_pairs)

  return preference.split_pairs(head_sums(thinker, hidden, batch, layout, sums, batch["dpo_pair"][:, 1:]))


def dpo_loss(model, batch: Batch, rng: jax.Array, evaluate: bool = False) -> dict:
  """The `thinker_dpo` objective: DPO / IPO sums over the batch's pairs of text replies (omni_jax.dpo), the
  policy's log-probs from the forward the text loss shares, the reference's under stop_gradient."""
  del rng, evaluate
  cfg = dpo_lib.settings(model.thinker)
  if cfg is None or "dpo_pair" not in batch:  # no DPO in this run, or a bucket without pairs
    return preference.zero_sums()
  layout = getattr(model.thinker, "loss_layout", LossLayout())
  policy_out = outputs(model.thinker, batch)
  policy = pair_logprobs(model.thinker, policy_out["hidden"], batch, layout, cfg.max_pairs_per_row)

  def reference(ref):
    hidden = outputs(ref.thinker, batch)["hidden"]
    return pair_logprobs(ref.thinker, hidden, batch, layout, cfg.max_pairs_per_row)

  return cfg.sums(policy, dpo_lib.reference(model, cfg, "thinker_dpo", reference, ("thinker",),
                                            {"thinker": policy_out}))


def num_dpo_pairs(batch: Batch) -> jax.Array:
  """Pairs of text replies (both with label tokens) in the whole (global) batch: thinker_dpo's normaliser."""
  if "dpo_pair" not in batch:
    return jnp.zeros((), jnp.int32)
  return preference.count_pairs(label_mask(batch), batch["dpo_pair"][:, 1:])


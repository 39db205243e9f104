"""Preference losses on sequence log-probabilities (jax only): DPO with label smoothing (cDPO) and IPO, and the
per-pair sums of per-token log-probs over a packed row (the `dpo_pair` numbering of omni_jax.batch).

Notation, per preference pair: pi_c / pi_r the policy's log-probability of the chosen / rejected reply (the sum
over its label tokens), ref_c / ref_r the frozen reference's, and

  h = (pi_c - ref_c) - (pi_r - ref_r)

  sigmoid (DPO, Rafailov et al. 2023; cDPO with label smoothing ls, Mitchell 2023):
      loss = -(1 - ls) * log sigmoid(beta * h) - ls * log sigmoid(-beta * h)
  ipo (Azar et al. 2023):
      loss = (h - 1 / (2 * beta)) ** 2

The implicit rewards are beta * (pi - ref) of each reply (TRL's rewards/chosen and rewards/rejected); the margin
is their difference and a pair counts as correct when the chosen reward exceeds the rejected one. The rewards
are reported only (they carry no gradient).

IPO here takes the sums of the label tokens' log-probs, as the paper writes it (TRL averages them per token for
IPO; scale beta accordingly when comparing runs).
"""

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp

LOSSES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, reference_chosen: jax.Array,
             reference_rejected: jax.Array, *, beta: float, label_smoothing: float = 0.0,
             loss: str = "sigmoid") -> dict:
  """Per-pair losses and rewards from sequence log-probs (arrays of one shape, e.g. [B, P]).

  Returns {"loss", "chosen_reward", "rejected_reward", "margin", "correct"} of that shape, in float32 or wider
  (float64 inputs under jax_enable_x64 stay float64); "correct" is 1.0 where the chosen reward exceeds the
  rejected one.
  """
  if loss not in LOSSES:
    raise ValueError(f"unknown preference loss {loss!r}; expected one of {LOSSES}")
  xs = [jnp.asarray(x) for x in (policy_chosen, policy_rejected, reference_chosen, reference_rejected)]
  dtype = jnp.result_type(jnp.float32, *xs)
  pc, pr, rc, rr = (x.astype(dtype) for x in xs)
  h = (pc - rc) - (pr - rr)
  if loss == "sigmoid":
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
              - label_smoothing * jax.nn.log_sigmoid(-beta * h))
  else:
    losses = (h - 1.0 / (2.0 * beta)) ** 2
  chosen = jax.lax.stop_gradient(beta * (pc - rc))
  rejected = jax.lax.stop_gradient(beta * (pr - rr))
  return {"loss": losses, "chosen_reward": chosen, "rejected_reward": rejected, "margin": chosen - rejected,
          "correct": (chosen > rejected).astype(dtype)}


class PairLogps(NamedTuple):
  """Per-row, per-pair sums [B, P] (pair p of a row at index p - 1)."""
  chosen: jax.Array  # sum of the chosen reply's label log-probs
  rejected: jax.Array
  chosen_tokens: jax.Array  # label tokens of the chosen reply (float32)
  rejected_tokens: jax.Array
  valid: jax.Array  # bool: both replies of the pair have label tokens in this row


def segment_totals(logp: jax.Array, valid: jax.Array, pair: jax.Array, max_pairs: int) -> dict:
  """Additive per-row totals by pair id: {"logp", "tokens"}, each [B, 2 * max_pairs + 1] (index 0: outside pairs).

  logp [B, L] per-token log-probs, valid [B, L] bool (the label mask of the objective), pair [B, L] int (the
  dpo_pair numbering of the same positions: 2p - 1 chosen, 2p rejected, 0 none). Ids above 2 * max_pairs are
  dropped (the pipeline packs at most max_pairs pairs per row). Chunks of a row may be summed separately and
  added (the chunked LM head does).
  """
  n = 2 * max_pairs + 1
  ids = jnp.where(valid, pair, 0).astype(jnp.int32)
  masked = jnp.where(valid, logp.astype(jnp.float32), 0.0)  # where, not *: a masked position's value may be inf

  def row(x, i):
    return jax.ops.segment_sum(x, i, num_segments=n)

  return {"logp": jax.vmap(row)(masked, ids), "tokens": jax.vmap(row)(valid.astype(jnp.float32), ids)}


def split_pairs(totals: Mapping[str, jax.Array]) -> PairLogps:
  """segment_totals -> PairLogps (odd ids are the chosen replies, even ids the rejected ones)."""
  logp, tokens = totals["logp"], totals["tokens"]
  chosen_tokens, rejected_tokens = tokens[:, 1::2], tokens[:, 2::2]
  return PairLogps(logp[:, 1::2], logp[:, 2::2], chosen_tokens, rejected_tokens,
                   (chosen_tokens > 0) & (rejected_tokens > 0))


def pair_sums(logp: jax.Array, valid: jax.Array, pair: jax.Array, max_pairs: int) -> PairLogps:
  """Per-row, per-pair sums [B, max_pairs] of the per-token log-probs (see segment_totals for the inputs)."""
  return split_pairs(segment_totals(logp, valid, pair, max_pairs))


def count_pairs(valid: jax.Array, pair: jax.Array) -> jax.Array:
  """Pairs whose both replies have label tokens, over all rows (no bound on the pairs per row: the ids can reach
  the row length at most). The objectives' normaliser, computed from the batch alone."""
  length = pair.shape[-1]
  tokens = segment_totals(jnp.zeros(valid.shape, jnp.float32), valid, pair, (length + 1) // 2)["tokens"]
  return jnp.sum((tokens[:, 1::2] > 0) & (tokens[:, 2::2] > 0))


def pair_objective_sums(policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float = 0.0,
                        loss: str = "sigmoid", sft_weight: float = 0.0) -> dict:
  """An objective's sums over the valid pairs (omni_jax.towers.Objective): loss_sum, count (pairs),
  chosen_reward, rejected_reward, margin, correct, all float32 scalars.

  sft_weight > 0 adds sft_weight times the chosen reply's negative log-likelihood per token to each pair's loss
  (RPO, Pang et al. 2024), which keeps the chosen reply likely while the margin grows.
  """
  out = dpo_loss(policy.chosen, policy.rejected, reference.chosen, reference.rejected, beta=beta,
                 label_smoothing=label_smoothing, loss=loss)
  per_pair = out["loss"]
  if sft_weight:
    per_pair = per_pair + sft_weight * -policy.chosen / jnp.maximum(policy.chosen_tokens, 1.0)
  mask = policy.valid
  total = lambda x: jnp.sum(jnp.where(mask, x, 0.0))  # noqa: E731
  return {"loss_sum": total(per_pair), "count": jnp.sum(mask).astype(jnp.float32),
          "chosen_reward": total(out["chosen_reward"]), "rejected_reward": total(out["rejected_reward"]),
          "margin": total(out["margin"]), "correct": total(out["correct"])}


SUM_KEYS = ("loss_sum", "count", "chosen_reward", "rejected_reward", "margin", "correct")


def zero_sums() -> dict:
  """The sums of a batch without preference pairs."""
  return {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}

"""Choosing the next token: repetition penalty, temperature, top-k, top-p, then greedy or a random draw.

SamplingParams is a request's rule; RowSampling holds one per slot of the conversation engine, so replies with
different rules decode in one program. The rules and their order are transformers' logits processors
(RepetitionPenalty, then for sampling Temperature -> TopK -> TopP), so greedy decoding and the penalty agree
with `generate` token for token.
"""

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.layers import kernels


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How tokens are chosen (hashable: it is static in the compiled decode loop)."""
  do_sample: bool = False  # False: greedy (temperature, top_k, top_p are then ignored, as in transformers)
  temperature: float = 1.0
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1.0: off
  repetition_penalty: float = 1.0  # 1.0: off; applies to greedy decoding too

  @classmethod
  def from_config(cls, cfg: Optional[Mapping[str, Any]] = None, **overrides) -> "SamplingParams":
    """From config.generate (keys of this class; others ignored), then the non-None overrides."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(cfg or {}).items() if k in names}
    values.update({k: v for k, v in overrides.items() if v is not None})
    out = cls(**values)
    out.validate()
    return out

  def validate(self) -> None:
    if self.do_sample and not self.temperature > 0:
      raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature} (use greedy decoding)")
    if not (isinstance(self.top_k, int) and self.top_k >= 0):
      raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if not self.repetition_penalty > 0:
      raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

  @property
  def penalises(self) -> bool:
    return self.repetition_penalty != 1.0


class RowSampling(NamedTuple):
  """SamplingParams per row ([B] arrays): the engine's slots each decode with their request's settings in one
  program (no recompile per setting). Rows with do_sample=False are greedy, as SamplingParams."""
  do_sample: jax.Array  # bool
  temperature: jax.Array  # float32
  top_k: jax.Array  # int32, 0: off
  top_p: jax.Array  # float32, 1.0: off
  repetition_penalty: jax.Array  # float32, 1.0: off

  @classmethod
  def of(cls, params: SamplingParams) -> "RowSampling":
    """One row's values (numpy scalars; stacked by the engine)."""
    return cls(np.bool_(params.do_sample), np.float32(params.temperature), np.int32(params.top_k),
               np.float32(params.top_p), np.float32(params.repetition_penalty))

  @classmethod
  def empty(cls, rows: int) -> "RowSampling":
    return cls(np.zeros(rows, bool), np.ones(rows, np.float32), np.zeros(rows, np.int32), np.ones(rows, np.float32),
               np.ones(rows, np.float32))


# Scores a row's top-k / top-p filter looks at when its top_k is below this: one partial sort of this many per
# row instead of two sorts of the whole vocabulary (on a CPU ~200 ms per step at Qwen's 152K ids, batch 4).
TOP_K_CANDIDATES = 64


def _when(conditional: bool, pred: jax.Array, pass_: Callable, x):
  """pass_(x), skipped (x unchanged) where pred is false when `conditional`; pass_ must leave the rows that do
  not use it unchanged, so that running it unconditionally is the same."""
  return jax.lax.cond(pred, pass_, lambda x: x, x) if conditional else pass_(x)


def process_rows(logits: jax.Array, seen: jax.Array, params: RowSampling, *, conditional: bool = True) -> jax.Array:
  """process() with per-row settings: [B, V] float32 logits -> scores. The same operations in the same order,
  so a row's scores equal process() with its own SamplingParams (a penalty, temperature or top-p of 1.0 and a
  top-k of 0 leave the row unchanged). Filtering runs only when some row samples (conditional=False: the
  penalty and the filter run whatever the rows ask, with the same scores), and sorts the whole vocabulary only
  for a row whose top-k does not bound it to its TOP_K_CANDIDATES largest scores."""
  logits = logits.astype(jnp.float32)
  penalty = params.repetition_penalty[:, None]

  def penalised(logits):
    return jnp.where(seen & (penalty != 1.0), jnp.where(logits < 0, logits * penalty, logits / penalty), logits)

  # Each pass over [B, V] costs as much as a small model's LM head: only when some row asks for it.
  logits = _when(conditional, jnp.any(params.repetition_penalty != 1.0), penalised, logits)

  def filtered(logits):
    sample = params.do_sample[:, None]
    scaled = jnp.where(sample & (params.temperature[:, None] != 1.0), logits / params.temperature[:, None], logits)
    top_k = sample & (params.top_k[:, None] > 0)
    top_p = sample & (params.top_p[:, None] < 1.0)
    # A row whose top-k survivors lie among its TOP_K_CANDIDATES largest scores (k below that, and no tie with
    # the k-th running past them) is filtered on those candidates: a partial sort instead of two sorts of the
    # whole vocabulary. Whether a row may is its own property, so its scores never depend on its neighbours.
    cap = min(TOP_K_CANDIDATES, scaled.shape[-1])
    # Descending; equal scores: the lower id first. The barrier keeps XLA's CPU compiler from fusing the top-k
    # into its consumers, which turns it back into a sort of the whole row (measured: 1 ms -> 110 ms). It holds
    # the scores too: a barrier over the top-k's two outputs alone is folded onto the top-k itself, which XLA's
    # top-k decomposition (a sharded batch) then fails on.
    values, ids, scaled = jax.lax.optimization_barrier((*jax.lax.top_k(scaled, cap), scaled))
    kth = jnp.take_along_axis(values, (jnp.clip(params.top_k, 1, cap) - 1)[:, None], axis=-1)
    in_candidates = (params.top_k > 0) & (params.top_k < cap) & (values[:, -1] < kth[:, 0])
    fast = ~params.do_sample | ((params.top_k == 0) & (params.top_p >= 1.0)) | in_candidates
    candidates = top_p_among(jnp.where(top_k & (scaled < kth), -jnp.inf, scaled), values, ids, kth, top_p)
    return jax.lax.cond(jnp.all(fast), lambda: candidates,
                        lambda: jnp.where(fast[:, None], candidates, whole_vocabulary(scaled, top_k, top_p)))

  def top_p_among(filtered, values, ids, kth, top_p):
    """top-p among the candidates (the rows' only finite scores after top-k), by the rule of whole_vocabulary:
    ascending, equal scores in id order, the largest always kept."""
    survivors = jnp.where(values >= kth, values, -jnp.inf)
    ascending, order = jax.lax.sort((survivors[:, ::-1], ids[:, ::-1]), num_keys=2)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    drop = (cumulative <= 1 - params.top_p[:, None]).at[..., -1].set(False) & top_p
    rows = jnp.arange(filtered.shape[0])[:, None]
    return filtered.at[rows, order].set(jnp.where(drop, -jnp.inf, filtered[rows, order]))

  def whole_vocabulary(scaled, top_k, top_p):
    vocab = scaled.shape[-1]
    descending = -jnp.sort(-scaled, axis=-1)
    k = jnp.clip(params.top_k, 1, vocab)
    kth = jnp.take_along_axis(descending, (k - 1)[:, None], axis=-1)
    scaled = jnp.where(top_k & (scaled < kth), -jnp.inf, scaled)
    # top-p on the top-k-filtered scores (transformers' order), by the ascending rule of top_p_filter.
    order = jnp.argsort(scaled, axis=-1)
    ascending = jnp.take_along_axis(scaled, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    drop_sorted = (cumulative <= 1 - params.top_p[:, None]).at[..., -1].set(False)
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(scaled.shape[0])[:, None], order].set(drop_sorted)
    return jnp.where(top_p & drop, -jnp.inf, scaled)

  return _when(conditional, jnp.any(params.do_sample), filtered, logits)


def first_max(scores: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis (the first of equal maxima), as two plain reductions: XLA's CPU argmax is a
  variadic reduce several times slower than a max, which on a small model costs more than its LM head. A row of
  NaN gives its last id (argmax: the NaN's)."""
  top = jnp.max(scores, axis=-1, keepdims=True)
  ids = jax.lax.broadcasted_iota(jnp.int32, scores.shape, scores.ndim - 1)
  vocab = scores.shape[-1]
  return jnp.minimum(jnp.min(jnp.where(scores == top, ids, vocab), axis=-1), vocab - 1)


def choose_rows(scores: jax.Array, keys: jax.Array, params: RowSampling, *, conditional: bool = True) -> jax.Array:
  """Next token [B] int32: argmax on greedy rows, a draw from softmax(scores) with the row's own key on the
  others (keys [B]: typed keys), so a row's draw never depends on its neighbours. The noise of a draw costs as
  much as the LM head on a small model: it is drawn only when some row samples (conditional=False: always)."""
  greedy = first_max(scores)

  def drawn(scores):
    out = jax.vmap(lambda k, s: jax.random.categorical(k, s).astype(jnp.int32))(keys, scores)
    return jnp.where(params.do_sample, out, greedy)

  if not conditional:
    return drawn(scores)
  return jax.lax.cond(jnp.any(params.do_sample), drawn, lambda _: greedy, scores)


def next_tokens(logits: jax.Array, seen: jax.Array, keys: jax.Array, params: RowSampling) -> jax.Array:
  """choose_rows(process_rows(logits, seen, params), keys, params): the decode loop's choice per row. A GPU
  runs a conditional by copying its predicate to the host and waiting for it, so there the passes that are
  cheap on the device (the penalty, the top-k filter, the draw) run unconditionally behind one conditional:
  rows that are all greedy without a penalty take the argmax, any other mix the whole chain. One host round
  trip a step instead of three (greedy) or four (sampling); the tokens are the same."""
  if kernels.platform() != "gpu":
    return choose_rows(process_rows(logits, seen, params), keys, params)

  def chain(logits):
    return choose_rows(process_rows(logits, seen, params, conditional=False), keys, params, conditional=False)

  plain = ~params.do_sample & (params.repetition_penalty == 1.0)
  return jax.lax.cond(jnp.all(plain), first_max, chain, logits.astype(jnp.float32))

"""Choosing the next token: repetition penalty, temperature, top-k, top-p, then greedy or a random draw.

The rules and their order are transformers' logits processors (RepetitionPenalty, then for sampling
Temperature -> TopK -> TopP), so greedy decoding and the penalty agree with `generate` token for token.
"""

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp


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


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
  """Logits of tokens already in the sequence: divided by `penalty` when positive, multiplied when negative."""
  penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
  return jnp.where(seen, penalised, logits)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Keep the k largest logits of each row (ties with the k-th kept), the rest -inf."""
  k = min(k, logits.shape[-1])
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """Keep the smallest set of most likely tokens whose probability reaches p (at least one), the rest -inf.

  transformers' rule: sorted ascending, drop tokens whose cumulative probability is <= 1 - p.
  """
  order = jnp.argsort(logits, axis=-1)
  ascending = jnp.take_along_axis(logits, order, axis=-1)
  cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
  drop_sorted = (cumulative <= 1 - p).at[..., -1].set(False)
  drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
  return jnp.where(drop, -jnp.inf, logits)


def process(logits: jax.Array, seen: Optional[jax.Array], params: SamplingParams) -> jax.Array:
  """[B, V] float32 logits -> the scores tokens are chosen from."""
  logits = logits.astype(jnp.float32)
  if params.penalises:
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
  if params.do_sample:
    if params.temperature != 1.0:
      logits = logits / params.temperature
    if params.top_k > 0:
      logits = top_k_filter(logits, params.top_k)
    if params.top_p < 1.0:
      logits = top_p_filter(logits, params.top_p)
  return logits


def choose(scores: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
  """Next token [B] int32: argmax (greedy) or a draw from softmax(scores) with `key`."""
  if not params.do_sample:
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)

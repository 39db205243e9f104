"""The LM head and its cross-entropy in one pass, whose forward pass computes the gradient too.

`grouped_nll_sums(hidden, weight, targets, valid, group, ...)`: per-group sums of -log p(target) under
logits = hidden @ weight, over chunks of positions, so that the [B, L, V] logits never exist at once.

Why: a chunked head + cross-entropy under jax.checkpoint multiplies the [positions, D] x [D, V] head four times
per step (the forward, the backward pass' recompute, and the two products of its gradient); keeping the logits
instead costs [B, L, V] of memory. Differentiated, this function turns each chunk's softmax - onehot at once into
the gradients of the hidden states and of the weight (three products) and keeps only those ([B, L, D], [D, V]);
an input that is not differentiated (a frozen head under LoRA) gets no product. Not differentiated (evaluation),
it is the chunked forward alone.

The kept weight gradient is that of the groups' plain sum: the function is for losses that weight every group
alike, as a training step does (all groups' sums over one count; omni_jax.towers.Objective). The hidden states'
gradient is per position, so any cotangent scales it exactly; a cotangent that weights the groups differently
makes the weight's gradient NaN rather than silently wrong (training stops at a non-finite gradient norm,
without saving that state). A branch to an exact recompute would cost every step a conditional (a host round
trip on GPUs) and double the compiled head.
"""

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from omni_jax import sharding

LOGITS_NAMES = ("activation_batch", "activation_length", "activation_vocab")
HIDDEN_NAMES = ("activation_batch", "activation_length", "activation_embed")


def target_logprobs(logits, targets) -> jax.Array:
  """log p(target) in float32 under logits [..., V] of any float dtype. The widening happens inside the
  reductions, so bfloat16 logits are never copied to float32."""
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0].astype(jnp.float32)
  return target_logit - jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)


def group_sums(values, valid, group, num_groups: int) -> jax.Array:
  """[B, T] float values summed per group id [B, T] over the valid positions: [num_groups] float32."""
  onehot = jax.nn.one_hot(group, num_groups, dtype=jnp.float32) * valid[..., None]
  return jnp.einsum("bt,btg->g", jnp.where(valid, values, 0.0).astype(jnp.float32), onehot)


def _specs(weight_names: Sequence[str]) -> tuple[str, str, str]:
  """einsum specs of the logits, the hidden states' gradient and the weight's, for a [D, V] weight or, where
  its names put the vocabulary first (a tied embedding table), a [V, D] one."""
  w = "vd" if weight_names[0] == "vocab" else "dv"
  return f"btd,{w}->btv", f"btv,{w}->btd", f"btd,btv->{w}"


def logits(hidden, weight, weight_names: Sequence[str]) -> jax.Array:
  """hidden [B, T, D] @ the head, in the weight's dtype (the compute dtype)."""
  out = jnp.einsum(_specs(weight_names)[0], hidden.astype(weight.dtype), weight)
  return sharding.constrain(out, LOGITS_NAMES)


def split_chunks(x, chunk: int) -> jax.Array:
  """[B, T, ...] -> [n, B, chunk, ...], the last chunk zero-padded (padding is never valid)."""
  b, t = x.shape[:2]
  n = -(-t // chunk)
  x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)


def _chunk_size(chunk: int, length: int) -> int:
  return length if not chunk or chunk >= length else chunk


def chunked_sums(sums: Callable, hidden, targets, valid, extra, chunk: int):
  """sums(hidden, targets, valid, *extra) (sums applies the head) over chunks of the length axis, added up:
  [B, T, D] -> sums (a pytree additive over positions), never the [B, T, V] logits at once."""
  if not chunk or chunk >= targets.shape[1]:
    return sums(hidden, targets, valid, *extra)
  xs = tuple(split_chunks(x, chunk) for x in (hidden, targets, valid, *extra))

  @jax.checkpoint  # differentiated by JAX, the backward pass recomputes each chunk's logits instead of storing them
  def one(*x):
    return sums(*x)

  def body(total, x):
    return jax.tree.map(jnp.add, total, one(*x)), None

  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(one, *(x[0] for x in xs)))
  return jax.lax.scan(body, zeros, xs)[0]


def _plain_sums(hidden, weight, targets, valid, group, num_groups, chunk, weight_names):
  """The forward alone: the chunks' per-group sums, added up."""

  def one(h, y, m, k):
    return group_sums(-target_logprobs(logits(h, weight, weight_names), y), m, k, num_groups)

  return chunked_sums(one, hidden, targets, valid, (group,), chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def grouped_nll_sums(hidden, weight, targets, valid, group, num_groups: int, chunk: int,
                     weight_names: Sequence[str]) -> jax.Array:
  """Per-group sums [num_groups] (float32) of -log p(targets) over the valid positions.

  hidden [B, T, D]; weight [D, V], or [V, D] where weight_names[0] is "vocab" (a tied embedding table), in the
  dtype the logits are computed in; targets, group (ids < num_groups) [B, T] int; valid [B, T] bool. chunk:
  positions per chunk (0: all at once). weight_names: the weight's logical axis names (its gradient's sharding).
  """
  return _plain_sums(hidden, weight, targets, valid, group, num_groups, chunk, weight_names)


def _fwd(hidden, weight, targets, valid, group, num_groups, chunk, weight_names):
  want_hidden, want_weight = hidden.perturbed, weight.perturbed
  hidden, weight, targets, valid, group = (a.value for a in (hidden, weight, targets, valid, group))
  _, dh_spec, dw_spec = _specs(weight_names)
  t = targets.shape[1]
  c = _chunk_size(chunk, t)

  def one(carry, x):
    sums, dw = carry
    h, y, m, k = x
    h = h.astype(weight.dtype)
    z = logits(h, weight, weight_names).astype(jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1)
    nll = lse - jnp.take_along_axis(z, y[..., None], axis=-1)[..., 0]
    # d nll / d logits = softmax - onehot(target), zero where the position carries no label
    g = jnp.exp(z - lse[..., None]) - jax.nn.one_hot(y, z.shape[-1], dtype=jnp.float32)
    g = sharding.constrain(jnp.where(m[..., None], g, 0.0).astype(weight.dtype), LOGITS_NAMES)
    dh = None
    if want_hidden:
      dh = sharding.constrain(jnp.einsum(dh_spec, g, weight).astype(hidden.dtype), HIDDEN_NAMES)
    if want_weight:
      dw = sharding.constrain(dw + jnp.einsum(dw_spec, h, g, preferred_element_type=jnp.float32), weight_names)
    return (sums + group_sums(nll, m, k, num_groups), dw), dh

  dw0 = sharding.constrain(jnp.zeros(weight.shape, jnp.float32), weight_names) if want_weight else None
  xs = tuple(split_chunks(x, c) for x in (hidden, targets, valid, group))
  (sums, dw), dh = jax.lax.scan(one, (jnp.zeros((num_groups,), jnp.float32), dw0), xs)
  if want_hidden:  # [n, B, c, D] -> [B, T, D]
    dh = jnp.moveaxis(dh, 0, 1).reshape((hidden.shape[0], -1, hidden.shape[2]))[:, :t]
  if want_weight:
    dw = dw.astype(weight.dtype)
  return sums, (dh, dw, valid, group)


def _bwd(num_groups, chunk, weight_names, residuals, ct):
  del num_groups, chunk, weight_names
  dh, dw, valid, group = residuals
  if isinstance(ct, jax.custom_derivatives.SymbolicZero):
    return None, None, None, None, None
  ct = ct.astype(jnp.float32)
  d_hidden = None
  if dh is not None:
    scale = jnp.where(valid, ct[group], 0.0)
    d_hidden = (dh.astype(jnp.float32) * scale[..., None]).astype(dh.dtype)
  d_weight = None
  if dw is not None:
    alike = jnp.all(ct == ct[0])
    d_weight = (dw.astype(jnp.float32) * jnp.where(alike, ct[0], jnp.nan)).astype(dw.dtype)
  return d_hidden, d_weight, None, None, None


grouped_nll_sums.defvjp(_fwd, _bwd, symbolic_zeros=True)

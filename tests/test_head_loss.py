"""The fused LM head + cross-entropy (omni_jax.layers.head_loss): the plain function's sums and gradients, one
vocabulary-wide product fewer than a chunked head under remat, and the same on a sharded mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_testlib as lib
from omni_jax import sharding
from omni_jax.aot import hlo
from omni_jax.layers import head_loss

GROUPS = 4
NAMES = {"dv": ("embed", "vocab"), "vd": ("vocab", "embed")}  # lm_head's kernel; a tied embedding table


def _inputs(layout, b=2, t=13, d=8, v=37, seed=0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  weight = jnp.asarray(rng.normal(size=(d, v) if layout == "dv" else (v, d)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  valid = jnp.asarray(rng.random((b, t)) < 0.6)
  group = jnp.asarray(rng.integers(0, GROUPS, (b, t)), jnp.int32)
  return hidden, weight, targets, valid, group


def _plain(hidden, weight, targets, valid, group, names):
  """The reference: all logits at once, differentiated by JAX."""
  logits = head_loss.logits(hidden, weight, names)
  return head_loss.group_sums(-head_loss.target_logprobs(logits, targets), valid, group, GROUPS)


@pytest.mark.parametrize("layout", ["dv", "vd"])
@pytest.mark.parametrize("chunk", [0, 4, 5, 13])
def test_sums_and_gradients_equal_the_plain_head(layout, chunk):
  hidden, weight, targets, valid, group = _inputs(layout)
  names = NAMES[layout]
  plain = lambda h, w: _plain(h, w, targets, valid, group, names)  # noqa: E731
  fused = lambda h, w: head_loss.grouped_nll_sums(h, w, targets, valid, group, GROUPS, chunk, names)  # noqa: E731
  np.testing.assert_allclose(jax.jit(fused)(hidden, weight), plain(hidden, weight), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(fused)(hidden, weight), head_loss._plain_sums(  # the primal's own path
      hidden, weight, targets, valid, group, GROUPS, chunk, names), rtol=1e-6)

  # every group weighted alike (a training step): both gradients
  for scale in (1.0, 0.37):
    ct = jnp.full((GROUPS,), scale, jnp.float32)
    want = jax.vjp(plain, hidden, weight)[1](ct)
    got = jax.jit(lambda h, w, ct: jax.vjp(fused, h, w)[1](ct))(hidden, weight, ct)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  # one input differentiated (a frozen head; frozen hidden states)
  np.testing.assert_allclose(jax.grad(lambda h: jnp.sum(fused(h, weight)))(hidden),
                             jax.grad(lambda h: jnp.sum(plain(h, weight)))(hidden), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda w: jnp.sum(fused(hidden, w)))(weight),
                             jax.grad(lambda w: jnp.sum(plain(hidden, w)))(weight), rtol=1e-5, atol=1e-6)


def test_groups_weighted_differently_scale_the_hidden_states_exactly_and_poison_the_weight():
  """The hidden states' gradient is per position, so any weights of the groups give it exactly; the weight's
  gradient was summed over all groups in the forward pass, so unequal weights make it NaN, never wrong."""
  hidden, weight, targets, valid, group = _inputs("dv")
  names = NAMES["dv"]
  ct = jnp.asarray([1.0, 2.0, -0.5, 3.0])
  want = jax.vjp(lambda h: _plain(h, weight, targets, valid, group, names), hidden)[1](ct)[0]
  d_hidden, d_weight = jax.vjp(
      lambda h, w: head_loss.grouped_nll_sums(h, w, targets, valid, group, GROUPS, 5, names), hidden, weight)[1](ct)
  np.testing.assert_allclose(d_hidden, want, rtol=1e-5, atol=1e-6)
  assert np.isnan(np.asarray(d_weight)).all()


def test_bfloat16_gradients_are_within_bfloat16_error_of_float32():
  hidden, weight, targets, valid, group = _inputs("dv", t=64, d=32, v=300)
  names = NAMES["dv"]

  def grads(fn, dtype):
    loss = lambda h, w: jnp.sum(fn(h.astype(dtype), w.astype(dtype)))  # noqa: E731
    return jax.grad(loss, argnums=(0, 1))(hidden, weight)

  want = grads(lambda h, w: _plain(h, w, targets, valid, group, names), jnp.float32)
  got = grads(lambda h, w: head_loss.grouped_nll_sums(h, w, targets, valid, group, GROUPS, 16, names),
              jnp.bfloat16)
  for g, w in zip(got, want):
    err = np.linalg.norm(np.asarray(g, np.float32) - w) / np.linalg.norm(w)
    assert err < 2e-2, err


@pytest.mark.parametrize("frozen_head", [False, True], ids=["trained", "frozen-head"])
def test_one_vocabulary_wide_product_fewer_than_a_chunked_head_under_remat(frozen_head):
  """At the released vocabulary (151,936): the compiled loss + gradient multiplies by the head 3 times (2 with a
  frozen head) where chunks under jax.checkpoint do 4 (3), with no more temporaries (HLO counted per loop trip)."""
  b, t, d, v, chunk = 2, 256, 64, 151936, 64
  names = NAMES["dv"]
  args = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.bool_),
          jax.ShapeDtypeStruct((b, t), jnp.int32))

  def remat_chunks(h, w, y, m, k):  # the plain layout's chunks (differentiated by JAX)
    return head_loss.chunked_sums(lambda *x: _plain(x[0], w, *x[1:], names), h, y, m, (k,), chunk)

  def fused(h, w, y, m, k):
    return head_loss.grouped_nll_sums(h, w, y, m, k, GROUPS, chunk, names)

  def compiled(fn):
    loss = lambda *a: jnp.sum(fn(*a))  # noqa: E731
    c = jax.jit(jax.value_and_grad(loss, argnums=(0,) if frozen_head else (0, 1))).lower(*args).compile()
    return hlo.parse(c.as_text(), 1).flops / (2 * b * t * d * v), c.memory_analysis().temp_size_in_bytes

  (plain_products, plain_temp), (fused_products, fused_temp) = compiled(remat_chunks), compiled(fused)
  assert plain_products == pytest.approx(3 if frozen_head else 4, abs=0.01)
  assert fused_products == pytest.approx(plain_products - 1, abs=0.01)
  assert fused_temp <= plain_temp * 1.05, (fused_temp, plain_temp)


def test_sharded_over_data_and_tensor_equals_one_device():
  """Batch over data x fsdp, the vocabulary over tensor (the configs' rule table): the one-device sums and
  gradients, the weight's gradient summed over the batch shards."""
  hidden, weight, targets, valid, group = _inputs("dv", b=4, t=16, d=16, v=64)
  names = NAMES["dv"]
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  rules = lib.config().sharding_rules

  def loss(h, w):
    return jnp.sum(head_loss.grouped_nll_sums(h, w, targets, valid, group, GROUPS, 5, names))

  @jax.jit
  def on_mesh(h, w):
    with sharding.activate(mesh, rules):
      h = sharding.constrain(h, head_loss.HIDDEN_NAMES)
      w = sharding.constrain(w, names)
      return jax.value_and_grad(loss, argnums=(0, 1))(h, w)

  want_value, want_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(hidden, weight)
  value, grads = on_mesh(hidden, weight)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)

"""The layers with hand-written gradients (RMSNorm, LayerNorm, the MLPs' activations) equal the gradients of the
formulas they replace: float32 to rounding, bfloat16 within its rounding; and they keep fewer residuals for the
backward pass (the reason they exist)."""

import functools

import jax
import jax.test_util  # noqa: F401 - check_grads
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint.print_saved_residuals prints

from omni_jax.layers import mlp, norms


def _plain_rms_norm(x, scale, eps):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale * y.astype(x.dtype)


def _plain_layer_norm(x, scale, bias, eps):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True) + eps)
  if scale is not None:
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(x.dtype)


def _plain_gated(act, gate, up):
  return act(gate) * up


def _inputs(dtype, shape=(2, 5, 48)):
  ks = jax.random.split(jax.random.key(0), 4)
  x = (3.0 * jax.random.normal(ks[0], shape) + 0.5).astype(dtype)
  scale = (1.0 + 0.3 * jax.random.normal(ks[1], shape[-1:])).astype(dtype)
  up = jax.random.normal(ks[2], shape).astype(dtype)
  dy = jax.random.normal(ks[3], shape).astype(dtype)
  return x, scale, up, dy


def _vjp(f, *args, dy):
  y, pull = jax.vjp(f, *args)
  return (y, *pull(dy))


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_rms_norm_gradient_equals_the_formula_in_float32():
  x, scale, _, dy = _inputs(jnp.float32)
  ours = _vjp(functools.partial(norms.rms_norm, eps=1e-6), x, scale, dy=dy)
  plain = _vjp(functools.partial(_plain_rms_norm, eps=1e-6), x, scale, dy=dy)
  for a, b in zip(ours, plain):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  jax.test_util.check_grads(lambda x, s: norms.rms_norm(x, s, 1e-6), (x, scale), order=1, modes=("rev",),
                            atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_gradient_equals_the_formula_in_float32(affine):
  x, scale, up, dy = _inputs(jnp.float32)
  params = (scale, 0.1 * up[0, 0]) if affine else (None, None)
  f = lambda x, p: norms.layer_norm(x, *p, 1e-5)  # noqa: E731
  ours = jax.vjp(f, x, params)
  plain = jax.vjp(lambda x, p: _plain_layer_norm(x, *p, 1e-5), x, params)
  np.testing.assert_allclose(ours[0], plain[0], rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(ours[1](dy)), jax.tree.leaves(plain[1](dy))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert len(jax.tree.leaves(ours[1](dy))) == (3 if affine else 1)


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_pytorch_tanh", "quick_gelu", "relu"])
def test_activation_gradients_equal_the_formula_in_float32(name):
  gate, _, up, dy = _inputs(jnp.float32)
  act = mlp.activation(name)
  ours = _vjp(functools.partial(mlp.gated, act), gate, up, dy=dy)
  plain = _vjp(functools.partial(_plain_gated, act), gate, up, dy=dy)
  for a, b in zip(ours, plain):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  for a, b in zip(_vjp(functools.partial(mlp.activate, act), gate, dy=dy), _vjp(act, gate, dy=dy)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_are_within_bfloat16_rounding_of_float32():
  x, scale, up, dy = _inputs(jnp.float32)
  exact_norm = _vjp(functools.partial(_plain_rms_norm, eps=1e-6), x, scale, dy=dy)
  exact_gated = _vjp(functools.partial(_plain_gated, jax.nn.silu), x, up, dy=dy)
  bf = lambda *a: [t.astype(jnp.bfloat16) for t in a]  # noqa: E731
  ours_norm = _vjp(functools.partial(norms.rms_norm, eps=1e-6), *bf(x, scale), dy=bf(dy)[0])
  ours_gated = _vjp(functools.partial(mlp.gated, jax.nn.silu), *bf(x, up), dy=bf(dy)[0])
  exact_layer = _vjp(lambda x, s, b: _plain_layer_norm(x, s, b, 1e-5), x, scale, up[0, 0], dy=dy)
  ours_layer = _vjp(lambda x, s, b: norms.layer_norm(x, s, b, 1e-5), *bf(x, scale, up[0, 0]), dy=bf(dy)[0])
  for ours, exact in ((ours_norm, exact_norm), (ours_gated, exact_gated), (ours_layer, exact_layer)):
    assert all(t.dtype == jnp.bfloat16 for t in ours)
    for a, b in zip(ours, exact):
      assert _rel(a, b) < 1e-2, _rel(a, b)


def _residual_bytes(f, *args):
  return sum(np.prod(a.shape) * a.dtype.itemsize for a, _ in saved_residuals(f, *args))


def test_the_backward_pass_keeps_fewer_bytes():
  x, scale, up, _ = _inputs(jnp.bfloat16, (4, 64, 256))
  loss = lambda f: (lambda *a: f(*a).astype(jnp.float32).sum())  # noqa: E731
  norm_ours = _residual_bytes(loss(lambda x, s: norms.rms_norm(x, s, 1e-6)), x, scale)
  norm_plain = _residual_bytes(loss(lambda x, s: _plain_rms_norm(x, s, 1e-6)), x, scale)
  layer_ours = _residual_bytes(loss(lambda x, s: norms.layer_norm(x, s, s, 1e-5)), x, scale)
  layer_plain = _residual_bytes(loss(lambda x, s: _plain_layer_norm(x, s, s, 1e-5)), x, scale)
  gated_ours = _residual_bytes(loss(functools.partial(mlp.gated, jax.nn.silu)), x, up)
  gated_plain = _residual_bytes(loss(functools.partial(_plain_gated, jax.nn.silu)), x, up)
  gelu = mlp.activation("gelu")
  act_ours = _residual_bytes(loss(functools.partial(mlp.activate, gelu)), x)
  act_plain = _residual_bytes(loss(gelu), x)
  activation, stats = x.size * 2, x.size // 256 * 4  # bfloat16 x; one float32 per row
  # x itself (an argument) with the [..., 1] float32 statistics (and the scale / bias); gate and up; x
  assert norm_ours <= activation + stats + scale.size * 2, norm_ours
  assert layer_ours <= activation + 2 * stats + 2 * scale.size * 2, layer_ours
  assert norm_plain >= 2 * activation and layer_plain >= 2 * activation
  assert gated_ours == 2 * activation and gated_plain > gated_ours
  assert act_ours == activation and act_plain >= 3 * activation


def _stack_loss(policy: str, attention_impl: str):
  """(loss, params) of a scanned 2-layer decoder stack (float32, GQA, two packed segments and padding, perturbed
  weights) under a remat policy and an attention implementation."""
  from flax import nnx
  from omni_jax.config import Runtime, TextConfig
  from omni_jax.models.text import DecoderStack

  cfg = TextConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, mrope_section=(2, 1, 1))
  x = jax.random.normal(jax.random.key(1), (2, 12, 32))
  positions = jnp.broadcast_to(jnp.arange(12), (3, 2, 12))
  segments = jnp.asarray([[1] * 7 + [2] * 5, [1] * 10 + [0] * 2], jnp.int32)
  rt = Runtime(dtype=jnp.float32, param_dtype=jnp.float32, scan_layers=True, remat_policy=policy,
               attention_impl=attention_impl)
  graphdef, state = nnx.split(DecoderStack(cfg, rt, rngs=nnx.Rngs(0)))
  state = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), state)

  def loss(state):
    h, _ = nnx.merge(graphdef, state)(x, positions, segments)
    return jnp.sum(jnp.where(segments[..., None] > 0, h, 0.0) ** 2)

  return loss, state


def test_a_scanned_stack_has_the_same_gradients_under_every_remat_policy():
  """The hand-written gradients inside a scanned, rematerialised decoder stack (float32, perturbed norms): every
  policy recomputes or saves their residuals and must give the gradients of remat "none"."""
  from omni_jax.models import scan

  grads = {}
  for policy in ["none", *scan._POLICIES]:
    loss, state = _stack_loss(policy, "xla")
    grads[policy] = jax.grad(loss)(state)
  for policy, g in grads.items():
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(grads["none"])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=policy)


def test_a_scanned_stack_casts_its_weights_once_and_keeps_no_per_layer_copies(monkeypatch):
  """bfloat16 compute over float32 weights, scanned without remat: each layer's bfloat16 weights are not
  residuals of the loop (stacks of their own, written by the forward loop and read back by the backward), and
  the float32 gradients are those of the same stack casting each layer's weights inside the loop."""
  from flax import nnx
  from omni_jax.config import Runtime, TextConfig
  from omni_jax.models import scan
  from omni_jax.models.text import DecoderStack

  cfg = TextConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, mrope_section=(2, 1, 1))
  x = jax.random.normal(jax.random.key(1), (2, 12, 32))
  positions = jnp.broadcast_to(jnp.arange(12), (3, 2, 12))
  segments = jnp.asarray([[1] * 7 + [2] * 5, [1] * 10 + [0] * 2], jnp.int32)
  rt = Runtime(dtype=jnp.bfloat16, param_dtype=jnp.float32, scan_layers=True, remat_policy="none",
               attention_impl="xla")
  graphdef, state = nnx.split(DecoderStack(cfg, rt, rngs=nnx.Rngs(0)))
  state = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), state)

  def loss(state):
    h, _ = nnx.merge(graphdef, state)(x, positions, segments)
    return jnp.sum(jnp.where(segments[..., None] > 0, h, 0).astype(jnp.float32) ** 2)

  def per_layer_residuals():
    return [a.shape for a, source in saved_residuals(loss, state) if "output of scan" in source]

  kernels = {leaf.shape for leaf in jax.tree.leaves(state) if leaf.ndim == 3}
  assert (3, 32, 48) in kernels and (3, 32, 16) in kernels
  ours, kept = jax.grad(loss)(state), per_layer_residuals()
  monkeypatch.setattr(scan, "_cast_before_the_loop", lambda layers, state: state)  # each layer casts its own
  inside, kept_inside = jax.grad(loss)(state), per_layer_residuals()
  assert kept and not kernels & set(kept), kept
  assert kernels <= set(kept_inside)  # what the test would see without the cast before the loop
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(inside)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.abs(b).max()))


@pytest.mark.parametrize("impl", ["flash_gpu", "blocked"])
def test_dots_and_attention_runs_the_kernels_forward_once_with_the_same_gradients(impl, monkeypatch):
  """remat "dots_and_attention" over a scanned stack whose attention is a kernel with its own backward (flash_gpu
  in Pallas interpret mode, blocked): the gradients of remat "none"; and the compiled gradient runs flash_gpu's
  forward once (its loops are those of "none"), where "dots" runs it again in the backward pass; blocked's too
  (in tiles of 4 tokens here, so that its loops stay loops)."""
  from omni_jax.layers import flash

  monkeypatch.setattr(flash, "blocked_attention", functools.partial(flash.blocked_attention, block_q=4, block_k=4))
  grads, loops = {}, {}
  for policy in ("none", "dots", "dots_and_attention"):
    loss, state = _stack_loss(policy, impl)
    grads[policy] = jax.grad(loss)(state)
    program = jax.jit(jax.grad(loss)).lower(state).compile().as_text()
    whiles = [line for line in program.splitlines() if " while(" in line]  # the layer scans' and the kernels'
    loops[policy] = (len(whiles), sum("flash_gpu_forward" in line for line in whiles))
  for a, b in zip(jax.tree.leaves(grads["dots_and_attention"]), jax.tree.leaves(grads["none"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  if impl == "flash_gpu":  # the interpreted kernel's forward: a loop over its grid and one over its key tiles
    assert loops["none"][1] == 2 and loops["dots"][1] == 4 and loops["dots_and_attention"] == loops["none"], loops
  else:  # blocked in tiles of 4 tokens: 3 a row, whose loops stay loops in the compiled program
    assert loops["dots_and_attention"] == loops["none"] and loops["dots"][0] > loops["none"][0], loops

"""Attention that never materialises L x L equals dense attention: values and gradients (float32, 1e-5) on
packed rows with many segments and padding, for the blocked XLA path and the Pallas kernels (interpret mode
on CPU), and end to end through every tower (text causal, vision windows + per-image blocks, audio chunks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_testlib as lib
from omni_jax import towers
from omni_jax.errors import ConfigError
from omni_jax.layers import attention
from omni_jax.layers.attention import SegmentMask, attention_mask, dot_product_attention
from omni_jax.layers import flash, kernels


def _packed(rng, b, length, max_segment):
  """Rows of consecutive segments of random lengths, then padding (segment 0)."""
  seg = np.zeros((b, length), np.int32)
  for r in range(b):
    at, sid = 0, 1
    end = length - int(rng.integers(0, length // 4))
    while at < end:
      n = int(rng.integers(1, max_segment + 1))
      seg[r, at:min(at + n, end)] = sid
      at, sid = at + n, sid + 1
  return jnp.asarray(seg)


def _qkv(rng, b, length, heads, kv_heads, dim):
  q = jnp.asarray(rng.normal(size=(b, length, heads, dim)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, length, kv_heads, dim)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, length, kv_heads, dim)), jnp.float32)
  return q, k, v


def _value_and_grads(fn, q, k, v, weights):
  """fn's output and its gradients, as one jitted program (run eagerly, every op compiles a program of its own)."""

  @jax.jit
  def both(q, k, v):
    return fn(q, k, v), jax.grad(lambda *x: (fn(*x) * weights).sum(), argnums=(0, 1, 2))(q, k, v)

  return both(q, k, v)


def _check(fn, q, k, v, seg, causal, atol=1e-5):
  dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=attention_mask(seg, causal=causal))
  real = np.asarray(seg) > 0
  weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * real[:, :, None, None]
  (ref, ref_grads), (out, grads) = (_value_and_grads(f, q, k, v, weights) for f in (dense, fn))
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=atol, rtol=1e-5)
  for name, g, r in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=atol, rtol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "segments"])
@pytest.mark.parametrize("blocks", [(8, 16), (16, 8), (64, 64)], ids=lambda b: f"q{b[0]}k{b[1]}")
def test_blocked_equals_dense(causal, blocks):
  rng = np.random.default_rng(0)
  q, k, v = _qkv(rng, 2, 61, 4, 2, 8)  # 61: not a multiple of any block (padded tiles)
  seg = _packed(rng, 2, 61, 12)
  fn = lambda q, k, v: flash.blocked_attention(q, k, v, seg, seg, causal=causal, block_q=blocks[0],
                                               block_k=blocks[1])
  _check(fn, q, k, v, seg, causal)


def test_blocked_with_explicit_indices_equals_the_dense_mask():
  """Context parallelism's case: a permuted sequence whose causality follows the original token indices."""
  rng = np.random.default_rng(2)
  q, k, v = _qkv(rng, 1, 48, 2, 1, 8)
  seg = _packed(rng, 1, 48, 20)
  perm = jnp.asarray(rng.permutation(48))
  index = jnp.broadcast_to(perm, (1, 48))
  mask = SegmentMask(seg[:, perm], causal=True, q_index=index, kv_index=index)
  dense = jax.nn.dot_product_attention(q, k, v, mask=mask.dense())
  blocked = dot_product_attention(q, k, v, mask, implementation="blocked")
  real = np.asarray(seg[:, perm]) > 0
  np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(dense)[real], atol=1e-5)
  # and the permuted computation is the original one, permuted
  plain = jax.nn.dot_product_attention(q[:, jnp.argsort(perm)], k[:, jnp.argsort(perm)], v[:, jnp.argsort(perm)],
                                       mask=attention_mask(seg, causal=True))
  np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(plain[:, perm])[real], atol=1e-5)


def test_blocked_memory_is_linear_in_length():
  """The compiled program's temporaries: dense grows as L^2, blocked as L (ratios in one run)."""
  def temp_bytes(impl, length):
    q = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def loss(q, seg):
      return dot_product_attention(q, q, q, SegmentMask(seg, causal=True), implementation=impl).sum()

    return jax.jit(jax.grad(loss)).lower(q, seg).compile().memory_analysis().temp_size_in_bytes

  dense = [temp_bytes(None, n) for n in (2048, 4096)]
  blocked = [temp_bytes("blocked", n) for n in (2048, 4096)]
  assert dense[1] / dense[0] > 3.5  # quadratic
  assert blocked[1] / blocked[0] < 2.5  # linear
  assert blocked[1] * 8 < dense[1]


@pytest.mark.parametrize("impl", ["splash", "pallas_gpu", "flash_gpu"])
def test_pallas_kernels_equal_dense_in_interpret_mode(impl):
  rng = np.random.default_rng(3)
  q, k, v = _qkv(rng, 2, 128, 4, 2, 16)
  seg = _packed(rng, 2, 128, 40)
  for causal in (True, False):
    fn = lambda q, k, v: dot_product_attention(q, k, v, SegmentMask(seg, causal=causal), implementation=impl)
    _check(fn, q, k, v, seg, causal)


def test_kernel_cases_they_do_not_cover_fall_back_to_blocked():
  rng = np.random.default_rng(4)
  q, k, v = _qkv(rng, 1, 16, 2, 2, 8)
  seg = jnp.ones((1, 16), jnp.int32)
  index = jnp.arange(16)[None]
  mask = SegmentMask(seg, causal=True, q_index=index, kv_index=index)  # explicit indices: not a kernel case
  for impl in ("splash", "pallas_gpu", "flash_gpu"):
    np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v, mask, implementation=impl)),
                               np.asarray(dot_product_attention(q, k, v, mask, implementation="blocked")), atol=1e-6)
  bad = lib.config()
  bad.model.attention_impl = "flash2"
  with pytest.raises(ConfigError, match="model.attention_impl"):
    towers.validate(bad)


@pytest.mark.slow
def test_every_tower_trains_the_same_with_blocked_attention():
  """Train steps on packed text + image + audio rows: the losses (the second after an update made from the
  first step's gradients) equal the dense path's."""
  def run(impl):
    c = lib.config(seq_len=64, steps=2)
    c.data.synthetic.kinds = ("text", "image", "audio")
    c.model.attention_impl = impl
    losses, metrics, _, _ = lib.train_steps(c, lib.mesh_of(dict(data=1)), 2)
    grad_norm = [float(m["grad_norm"]) for m in metrics] if "grad_norm" in metrics[0] else None
    return losses, grad_norm

  (dense_loss, dense_norm), (blocked_loss, blocked_norm) = run(None), run("blocked")
  np.testing.assert_allclose(blocked_loss, dense_loss, rtol=1e-5)
  if dense_norm is not None:
    np.testing.assert_allclose(blocked_norm, dense_norm, rtol=1e-4)


@pytest.mark.parametrize("impl", ["splash", "flash_gpu"])
def test_kernels_run_per_shard_on_a_mesh(impl):
  """On a mesh a Pallas kernel runs inside shard_map (XLA cannot partition it): data x tensor sharded q/k/v
  through layers.Attention give the one-device result."""
  from flax import nnx
  from omni_jax import sharding
  from omni_jax.layers.attention import Attention

  layer = Attention(32, num_heads=4, num_kv_heads=2, head_dim=8, bias=(True, True, True, False),
                    rngs=nnx.Rngs(0), implementation=impl)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 128, 32)), jnp.float32)
  seg = _packed(rng, 2, 128, 50)
  mask = SegmentMask(seg, causal=True)
  graphdef, state = nnx.split(layer)
  mesh = sharding.make_mesh(dict(data=2, tensor=2), devices=jax.devices()[:4])
  rules = lib.config().sharding_rules

  @jax.jit
  def run(state, x, mask):
    with sharding.activate(mesh, rules):
      return nnx.merge(graphdef, state)(x, mask)

  dense = nnx.merge(graphdef, state)
  dense.implementation = None
  real = np.asarray(seg) > 0
  np.testing.assert_allclose(np.asarray(run(state, x, mask))[real], np.asarray(dense(x, mask))[real], atol=1e-5)


def test_every_shipped_config_and_recipe_attends_with_auto():
  """The default is "auto" everywhere (every tower reads config.model.attention_impl); dense is a named choice."""
  import importlib
  import pathlib

  root = pathlib.Path(__file__).parents[1] / "configs"
  names = [f"configs.{p.stem}" for p in root.glob("*.py") if p.stem != "__init__"]
  # new_voice needs a prepared voice folder; it starts from the model configs (tiny / 3b / 7b), checked here.
  recipes = [p.stem for p in (root / "recipes").glob("*.py") if p.stem not in ("__init__", "common", "new_voice")]
  assert len(names) >= 6 and len(recipes) >= 6
  configs = [importlib.import_module(name).get_config() for name in names]
  configs += [importlib.import_module(f"configs.recipes.{r}").get_config(f"model={m}") for r in recipes
              for m in ("tiny", "7b")]
  configs += [importlib.import_module("configs.recipes.common").base(m) for m in ("tiny", "3b", "7b")]
  assert [c.model.attention_impl for c in configs] == ["auto"] * len(configs)


def test_auto_is_dense_for_small_calls_and_blocked_for_large_ones_off_accelerators():
  """On the CPU "auto" is the exact dense path while a call's float32 scores fit 256 MiB, else blocked (linear
  memory); explicit choices are kept as they are."""
  assert kernels.platform() == "cpu"
  assert attention.resolve("auto", 2 * 4 * 2048 * 2048) == "xla"  # 128 MiB of scores
  assert attention.resolve("auto", 2 * 16 * 2048 * 2048) == "blocked"  # 512 MiB
  assert attention.resolve("auto", 28 * 8192 * 8192) == "blocked"  # one 7B row at 8K: 7 GiB
  assert [attention.resolve(i, 1 << 40) for i in (None, "xla", "blocked")] == [None, "xla", "blocked"]
  rng = np.random.default_rng(3)
  q, k, v = _qkv(rng, 1, 4096, 16, 2, 8)  # 1 GiB of scores: "auto" runs blocked, equal to dense
  mask = SegmentMask(_packed(rng, 1, 4096, 700), causal=True)
  auto = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask, implementation="auto"))
  blocked = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask, implementation="blocked"))
  assert auto.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes < (256 << 20)
  np.testing.assert_array_equal(np.asarray(auto(q, k, v)), np.asarray(blocked(q, k, v)))

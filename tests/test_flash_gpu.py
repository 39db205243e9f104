"""attention_impl="flash_gpu", our Pallas/Triton kernel: equal to dense float32 attention (values and gradients,
interpret mode on CPU) on packed rows with grouped heads, padding, a segment split in several runs, a head size
that is not a power of two and other tilings; it visits only the tiles its segments reach; its Triton lowering
is built for CUDA on this CPU host (what runs on a GPU); and on a GPU it agrees with dense within bf16 error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.layers import attention, flash_gpu
from omni_jax.layers.attention import LocalSegments, SegmentMask, dot_product_attention


def _rows(lengths_per_row, length):
  """[B, length] segment ids: each row's samples in order (ids 1, 2, ...), then padding 0."""
  seg = np.zeros((len(lengths_per_row), length), np.int32)
  for r, lengths in enumerate(lengths_per_row):
    at = 0
    for i, n in enumerate(lengths):
      seg[r, at:at + n] = i + 1
      at += n
  return jnp.asarray(seg)


def _qkv(rng, b, length, heads, kv_heads, dim, dtype=jnp.float32):
  return tuple(jnp.asarray(rng.normal(size=(b, length, h, dim)), dtype) for h in (heads, kv_heads, kv_heads))


def _check_against_dense(q, k, v, seg, causal, atol=2e-5, **kw):
  real = np.asarray(seg) > 0
  weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * real[:, :, None, None]
  dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=SegmentMask(seg, causal=causal).dense())
  ours = lambda q, k, v: flash_gpu.flash_attention(q, k, v, seg, causal=causal, interpret=True, **kw)
  for fn in (dense, ours):
    out = fn(q, k, v)
    grads = jax.grad(lambda *x: (fn(*x) * weights).sum(), argnums=(0, 1, 2))(q, k, v)
    if fn is dense:
      ref, ref_grads = out, grads
  assert np.isfinite(np.asarray(out)).all()  # padding rows too
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=atol, rtol=1e-5)
  for name, g, r in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=atol, rtol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "segments"])
def test_equals_dense_on_packed_rows_with_grouped_heads(causal):
  rng = np.random.default_rng(0)
  q, k, v = _qkv(rng, 2, 200, 6, 2, 32)  # 200: padded to the tiling's multiple; 3 query heads per KV head
  seg = _rows([[70, 9, 90, 20], [200]], 200)
  _check_against_dense(q, k, v, seg, causal)


def test_equals_dense_with_a_split_segment_an_odd_head_size_and_another_tiling():
  """A segment in two runs (its bounds are per id, not per run), head size 80 (padded to 128 with zeros;
  the scale stays 1/sqrt(80)), one KV head for 4 query heads, asymmetric tiles."""
  rng = np.random.default_rng(1)
  q, k, v = _qkv(rng, 1, 256, 4, 1, 80)
  seg = np.array(_rows([[60, 100, 40]], 256))
  seg[0, 200:230] = 1  # segment 1 again, after segments 2 and 3
  tiling = flash_gpu.Tiling(block_q=64, block_k=32, block_k_dkv=128, block_q_dkv=32, block_q_dq=32, block_k_dq=128)
  _check_against_dense(q, k, v, jnp.asarray(seg), False, tiling=tiling)


def test_through_dot_product_attention_and_vision_windows():
  """attention_impl="flash_gpu" through the layer API: a SegmentMask, and LocalSegments (vision windows),
  which the kernel takes as segments, equal the dense path."""
  rng = np.random.default_rng(2)
  q, k, v = _qkv(rng, 1, 160, 4, 2, 16)
  seg = _rows([[40, 40, 40, 30]], 160)
  for mask in (SegmentMask(seg, causal=True), LocalSegments(seg, 40)):
    ours = dot_product_attention(q, k, v, mask, implementation="flash_gpu")
    dense = dot_product_attention(q, k, v, mask, implementation=None)
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(dense)[real], atol=2e-5)


def test_segment_spans_are_per_id_and_padding_spans_itself():
  seg = jnp.asarray([[1, 1, 2, 2, 2, 1, 0, 3, 0]])
  first, last = flash_gpu.segment_spans(seg)
  assert first.tolist() == [[0, 0, 2, 2, 2, 0, 6, 7, 8]]
  assert last.tolist() == [[5, 5, 4, 4, 4, 5, 6, 7, 8]]


def test_only_the_tiles_of_each_sample_are_visited():
  """8 samples of 1024 tokens in an 8K row: the forward visits 8 causal triangles of tiles, 1/7 of the causal
  square jax's kernel (pallas_gpu) computes; the backward's key tiles see only their own sample's queries."""
  tiling = flash_gpu.Tiling()  # forward 128 x 64, backward 64 x 64
  seg = _rows([[1024] * 8], 8192)
  first, last = flash_gpu.segment_spans(seg)
  lo, hi = flash_gpu._query_tile_bounds(first, last, tiling.block_q, tiling.block_k, causal=True)
  per_sample = sum(2 * (i + 1) for i in range(1024 // 128))  # query tile i of a sample: 2 (i + 1) key tiles
  whole_row = sum(2 * (i + 1) for i in range(8192 // 128))
  assert int((hi - lo).sum()) == 8 * per_sample and whole_row / (8 * per_sample) > 7
  lo, hi = flash_gpu._key_tile_bounds(first, last, tiling.block_k_dkv, tiling.block_q_dkv, causal=True)
  # key tile j of a sample (64 tokens) is seen by the query tiles from its own to its sample's end
  assert int((hi - lo).sum()) == 8 * sum(16 - j for j in range(16))
  lo, hi = flash_gpu._query_tile_bounds(first, last, 128, 64, causal=False)
  assert int((hi - lo).sum()) == 8 * 8 * 16  # non-causal: each query tile sees its whole sample


def test_the_triton_lowering_is_built_for_cuda_on_a_cpu_host():
  """Forward and backward lower to three Triton kernels for CUDA with the 7B Thinker's heads (28 / 4 x 128),
  the vision tower's (16 x 80) and the audio tower's (20 x 64), in bf16: what a GPU compiles and runs. The
  target is an H100 named by an abstract device (jax >= 0.11 asks which GPU it lowers for when none is here)."""
  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
  h100_mesh = jax.sharding.AbstractMesh((1,), ("data",), abstract_device=h100)
  for heads, kv_heads, dim, causal in [(28, 4, 128, True), (16, 16, 80, False), (20, 20, 64, False)]:
    q = jax.ShapeDtypeStruct((2, 1024, heads, dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1024, kv_heads, dim), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 1024), jnp.int32)

    def loss(q, k, v, seg):
      return flash_gpu.flash_attention(q, k, v, seg, causal=causal).astype(jnp.float32).sum()

    with jax.sharding.use_abstract_mesh(h100_mesh):
      text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg).lower(
          lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3
    for name in ("flash_gpu_forward", "flash_gpu_dkv", "flash_gpu_dq"):
      assert name in text


def test_tiling_parses_from_the_command_line_and_names_bad_fields():
  assert flash_gpu.Tiling.parse("block_k=128,warps=8") == flash_gpu.Tiling(block_k=128, warps=8)
  with pytest.raises(ValueError, match="blocks_q"):
    flash_gpu.Tiling.parse("blocks_q=64")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled Triton kernel needs a GPU")
def test_on_a_gpu_bf16_agrees_with_dense_float32():
  rng = np.random.default_rng(3)
  q, k, v = _qkv(rng, 1, 4096, 8, 2, 128)
  seg = _rows([[1500, 700, 1200, 600]], 4096)
  weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def value_and_grads(impl, dtype):
    fn = lambda q, k, v: dot_product_attention(q, k, v, SegmentMask(seg, causal=True), implementation=impl)
    args = [a.astype(dtype) for a in (q, k, v)]
    out = fn(*args).astype(jnp.float32)
    grads = jax.grad(lambda *x: (fn(*x).astype(jnp.float32) * weights).sum(), argnums=(0, 1, 2))(*args)
    return [out] + [g.astype(jnp.float32) for g in grads]

  ref = value_and_grads("blocked", jnp.float32)
  ours = value_and_grads("flash_gpu", jnp.bfloat16)
  for name, a, r in zip(("out", "dq", "dk", "dv"), ours, ref):
    error = float(jnp.linalg.norm(a - r) / jnp.linalg.norm(r))
    assert error < 2e-2, (name, error)
  assert attention.resolve("auto", 1) == "flash_gpu"

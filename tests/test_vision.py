"""Vision encoder and Thinker-with-images parity against transformers (float32), static shapes, conversion, freezing.

The reference is model.visual of tests/hf_reference.build_thinker (2 blocks, the second with full attention,
56-pixel windows = 2 x 2 merged tokens, so every test image spans several windows). Our encoder always runs
under jax.jit on padded buffers: extra patch rows and unused grid slots, as the data pipeline builds them.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import vision_utils

import hf_reference as ref
from configs import tiny
from omni_jax.config import Runtime
from omni_jax.convert import hf
from omni_jax.errors import ConfigError
from omni_jax.input.media import patches
from omni_jax.layers.attention import LocalSegments, attention_mask, dot_product_attention
from omni_jax.models import omni
from omni_jax.models.vision import VisionConfig, VisionEncoder, layout, thinker_vision

pytestmark = pytest.mark.parity

IMAGE, VIDEO, VISION_BOS, VISION_EOS = 2, 3, 7, 8
TOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """(transformers thinker, our OmniModel converted from its checkpoint, hf dir)."""
  d = tmp_path_factory.mktemp("hf")
  hf_model = ref.build_thinker("gqa2", seed=5)
  hf_model.save_pretrained(d)
  config = hf.config_from_hf(hf.read_config(d))
  graphdef, abstract = omni.abstract_model(config)
  return hf_model, nnx.merge(graphdef, hf.load_state(str(d), abstract)), str(d)


def _pixels(rng, grids):
  return [rng.standard_normal((int(np.prod(g)), 1176)).astype(np.float32) for g in grids]


def _reference(hf_model, rows, grids):
  with torch.no_grad():
    return hf_model.model.visual(torch.tensor(np.concatenate(rows)),
                                 grid_thw=torch.tensor(np.asarray(grids))).pooler_output.numpy()


@jax.jit
def _encode(visual, pixel_values, grid_thw):
  return visual(pixel_values, grid_thw)


CASES = {
    "image": [(1, 8, 12)],  # 4 x 6 merged tokens: 2 x 3 windows
    "video": [(3, 8, 6)],  # 3 temporal groups of 2 x 2 windows (the last column of windows is partial)
    "mixed": [(1, 8, 12), (1, 6, 10), (1, 2, 2), (1, 10, 4), (2, 6, 8)],  # 4 images of other sizes + a video
}


@pytest.mark.parametrize("case", list(CASES))
def test_encoder_matches_transformers(models, case):
  hf_model, ours, _ = models
  grids = CASES[case]
  rows = _pixels(np.random.default_rng(len(case)), grids)
  expected = _reference(hf_model, rows, grids)
  total = sum(len(r) for r in rows)
  pixel_values, grid_thw = patches.pack(list(zip(rows, grids)), max_patches=total + 52, max_items=len(grids) + 2)
  got = np.asarray(_encode(ours.thinker.visual, pixel_values, grid_thw))
  assert got.shape == ((total + 52) // 4, 32)
  err = np.abs(got[:len(expected)] - expected).max()
  assert err <= TOL, f"{case}: max abs difference {err}"
  assert not np.any(got[len(expected):]), "padding rows must be zero"


def test_layout_matches_transformers_index_helpers():
  """Window order, rotary positions and both segmentations equal get_vision_window_index & co."""
  cfg = VisionConfig(depth=1, hidden_size=32, num_heads=4, intermediate_size=8, out_hidden_size=8,
                     window_size=56, fullatt_block_indexes=(0,))
  grids = np.array([[1, 8, 12], [3, 6, 10], [1, 2, 2], [2, 10, 4]])
  total = int(np.prod(grids, axis=1).sum())
  padded = np.concatenate([grids, np.zeros((2, 3), int)])
  lay = jax.jit(layout, static_argnums=(1, 2))(jnp.asarray(padded), total + 24, cfg)
  window_index, cu_windows = vision_utils.get_vision_window_index(torch.tensor(grids), 2, 56, 14)
  units = total // 4
  np.testing.assert_array_equal(np.asarray(lay.order)[:units], window_index.numpy())
  np.testing.assert_array_equal(np.asarray(lay.order)[units:], np.arange(units, units + 6))
  patch_order = (window_index.numpy()[:, None] * 4 + np.arange(4)).reshape(-1)
  positions = vision_utils.get_vision_position_ids(torch.tensor(grids), 2).numpy()[patch_order]
  np.testing.assert_array_equal(np.asarray(lay.positions)[:, :total], positions.T)
  # Segments: each id is one contiguous run whose boundaries are transformers' cumulative lengths.
  window_segments = np.asarray(lay.window_segments)
  np.testing.assert_array_equal(np.flatnonzero(np.diff(window_segments[:total])) + 1, cu_windows.numpy()[1:-1])
  full_segments = np.asarray(lay.full_segments)[np.argsort(patch_order)]  # back to buffer order
  cu = vision_utils.get_vision_cu_seqlens(torch.tensor(grids)).numpy()
  np.testing.assert_array_equal(np.flatnonzero(np.diff(full_segments)) + 1, cu[1:-1])
  assert not np.any(window_segments[total:]) and not np.any(np.asarray(lay.full_segments)[total:])
  assert np.asarray(lay.valid).sum() == units


def test_local_segments_equal_the_dense_segment_mask():
  """Block-local attention (windows after reordering) == dense segment-mask attention, GQA and padding too."""
  rng = np.random.default_rng(6)
  lengths = [16, 3, 16, 9, 1, 12, 16, 5]  # contiguous segments of at most block = 16 positions, then padding
  segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(7, int)])[None]
  shifted = np.concatenate([np.zeros((1, 11), int), segments[:, :-11]], axis=1)  # other alignment to the blocks
  segments = np.concatenate([segments, shifted])
  q = jnp.asarray(rng.standard_normal((2, segments.shape[1], 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, segments.shape[1], 2, 8)), jnp.float32) for _ in range(2))
  dense = dot_product_attention(q, k, v, attention_mask(jnp.asarray(segments), causal=False))
  local = dot_product_attention(q, k, v, LocalSegments(jnp.asarray(segments), 16))
  real = segments > 0
  np.testing.assert_allclose(np.asarray(local)[real], np.asarray(dense)[real], atol=1e-6)


def test_one_compilation_per_bucket_and_per_sample_buffers(models):
  """New image sizes in the same buffer shapes reuse the compiled program; per-sample buffers [B, P, ...]
  give each sample the features of the flat layout."""
  hf_model, ours, _ = models
  traces = []

  @jax.jit
  def encode(visual, pixel_values, grid_thw):
    traces.append(1)
    return visual(pixel_values, grid_thw)

  rng = np.random.default_rng(1)
  samples = [[(1, 4, 6), (2, 4, 4)], [(1, 8, 8)], [(1, 2, 4), (1, 6, 2), (1, 4, 4)]]
  flat = []
  for grids in samples:
    rows = _pixels(rng, grids)
    buf = patches.pack(list(zip(rows, grids)), max_patches=128, max_items=3)
    flat.append((buf, len(_reference(hf_model, rows, grids)), _reference(hf_model, rows, grids)))
    got = np.asarray(encode(ours.thinker.visual, *buf))
    assert np.abs(got[:flat[-1][1]] - flat[-1][2]).max() <= TOL
  assert len(traces) == 1, "a new image size within the bucket must not recompile"
  batched = np.asarray(_encode(ours.thinker.visual, np.stack([b[0][0] for b in flat]),
                               np.stack([b[0][1] for b in flat])))
  for row, (_, n, expected) in zip(batched, flat):
    assert np.abs(row[:n] - expected).max() <= TOL and not np.any(row[n:])


def _twin(visual, cfg=None, rt=None):
  """`visual`'s weights in an encoder built with another config or runtime."""
  cfg, rt = cfg or visual.cfg, rt or visual.rt
  return nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: VisionEncoder(cfg, rt, rngs=nnx.Rngs(0)))), nnx.state(visual))


def test_unscanned_remat_and_bfloat16(models):
  _, ours, _ = models
  visual = ours.thinker.visual
  rows = _pixels(np.random.default_rng(2), CASES["mixed"])
  total = sum(map(len, rows))
  buf = patches.pack(list(zip(rows, CASES["mixed"])), max_patches=total + 52, max_items=7)
  base = np.asarray(_encode(visual, *buf))
  unrolled = _twin(visual, rt=Runtime(scan_layers=False, remat_policy="full"))
  np.testing.assert_allclose(np.asarray(_encode(unrolled, *buf)), base, atol=1e-5)
  got = np.asarray(_encode(_twin(visual, rt=Runtime(dtype=jnp.bfloat16)), *buf).astype(jnp.float32))
  assert np.abs(got - base).max() <= 0.05 * np.abs(base).max()


def test_a_kernel_that_reads_windows_as_segments_attends_both_ways_in_one_call(models):
  """flash_gpu (interpret mode here) reads windows as segments: each block's flag picks the segment ids of one
  kernel call instead of a conditional (which a GPU runs by reading its branch index back to the host). The
  encoder and its weights' gradients equal the dense path's, and only the dense path's program branches."""
  _, ours, _ = models
  visual = ours.thinker.visual
  rows = _pixels(np.random.default_rng(4), CASES["mixed"])
  buf = patches.pack(list(zip(rows, CASES["mixed"])), max_patches=sum(map(len, rows)) + 52, max_items=7)
  programs, results = {}, {}
  for impl in ("flash_gpu", "xla"):
    graphdef, state = nnx.split(_twin(visual, rt=Runtime(attention_impl=impl)))
    loss = lambda state: jnp.sum(nnx.merge(graphdef, state)(*buf) ** 2)  # noqa: E731
    programs[impl] = str(jax.make_jaxpr(loss)(state))
    results[impl] = jax.jit(jax.value_and_grad(loss))(state)
  assert " cond[" not in programs["flash_gpu"] and " cond[" in programs["xla"]
  (flash_loss, flash_grads), (dense_loss, dense_grads) = results["flash_gpu"], results["xla"]
  np.testing.assert_allclose(float(flash_loss), float(dense_loss), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(flash_grads), jax.tree.leaves(dense_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


def _prompt(segments):
  """Token ids from [("text", n) | ("image", tokens) | ("video", tokens)]; text ids are random >= 10."""
  rng = np.random.default_rng(len(segments))
  ids = []
  for kind, n in segments:
    if kind == "text":
      ids += list(rng.integers(10, 200, size=n))
    else:
      ids += [VISION_BOS] + [IMAGE if kind == "image" else VIDEO] * n + [VISION_EOS]
  return ids


def test_thinker_logits_with_images_and_videos_match_transformers(models):
  """Two prompts (one left-padded) with 3 images and 2 videos; positions from transformers' get_rope_index."""
  hf_model, ours, _ = models
  images = [(1, 8, 12), (1, 4, 6), (1, 6, 4)]
  videos = [(2, 4, 8), (3, 4, 4)]
  tokens = lambda g: int(np.prod(g)) // 4
  rows = [_prompt([("text", 3), ("image", tokens(images[0])), ("text", 2), ("video", tokens(videos[0])),
                   ("text", 4)]),
          _prompt([("text", 2), ("image", tokens(images[1])), ("video", tokens(videos[1])), ("text", 1),
                   ("image", tokens(images[2])), ("text", 3)])]
  length = max(map(len, rows)) + 3
  ids = np.zeros((2, length), np.int64)
  mask = np.zeros((2, length), np.int64)
  for b, r in enumerate(rows):  # left padding
    ids[b, length - len(r):], mask[b, length - len(r):] = r, 1
  rng = np.random.default_rng(3)
  image_rows, video_rows = _pixels(rng, images), _pixels(rng, videos)
  second_per_grid = torch.tensor([1.0, 0.5])
  positions, _ = hf_model.get_rope_index(torch.tensor(ids), torch.tensor(images), torch.tensor(videos),
                                         torch.tensor(mask), second_per_grids=second_per_grid)
  with torch.no_grad():
    expected = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=positions,
                        pixel_values=torch.tensor(np.concatenate(image_rows)), image_grid_thw=torch.tensor(images),
                        pixel_values_videos=torch.tensor(np.concatenate(video_rows)),
                        video_grid_thw=torch.tensor(videos), video_second_per_grid=second_per_grid).logits.numpy()

  @jax.jit
  def logits(thinker, ids, positions, mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
    return thinker(ids, positions, mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                   pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw)

  # Images in one buffer per sample [B, P, ...], videos in one flat buffer for the batch (placeholder order).
  per_sample = [patches.pack([(image_rows[0], images[0])], 112, 2),
                patches.pack([(image_rows[1], images[1]), (image_rows[2], images[2])], 112, 2)]
  image_buffers = np.stack([p[0] for p in per_sample]), np.stack([p[1] for p in per_sample])
  video_buffers = patches.pack(list(zip(video_rows, videos)), max_patches=128, max_items=3)
  got = np.asarray(logits(ours.thinker, ids, positions.numpy(), mask, *image_buffers, *video_buffers))
  err = np.abs(got - expected)[mask.astype(bool)].max()
  assert err <= TOL, f"max abs logit difference {err}"


def test_vision_tensors_round_trip_bit_exact(models, tmp_path):
  _, ours, hf_dir = models
  config = hf.config_from_hf(hf.read_config(hf_dir))
  before = {k: v for k, v in load_file(f"{hf_dir}/model.safetensors").items() if k.startswith("visual.")}
  state = nnx.state(ours)
  for cfg in (config, None):  # without a config the Conv3d layout defaults to the released (3, 2, 14, 14)
    after = {k[len("thinker."):]: v for k, v in hf.state_to_tensors(state, config=cfg).items()
             if k.startswith("thinker.visual.")}
    assert set(after) == set(before) and len(before) == 6 + 2 * 16
    for k in before:
      assert after[k].dtype == before[k].dtype and np.array_equal(after[k], before[k]), k
  hf.save(str(tmp_path), config, state)
  saved = load_file(tmp_path / "model.safetensors")
  assert all(np.array_equal(saved[k], v) for k, v in before.items())
  written = hf.config_to_hf(config)["vision_config"]
  original = hf.read_config(hf_dir)["vision_config"]
  assert {k: original[k] for k in written} == written
  assert hf.config_from_hf(hf.config_to_hf(config)).model.thinker.vision == config.model.thinker.vision


def _tiny(**vision):
  config = tiny.get_config()
  config.model.thinker.vision.update(vision)
  return config


def _small_tiny(**vision):
  """configs/tiny.py with a 256-token vocabulary (placeholder ids of the test models) and no audio tower."""
  config = _tiny(**vision)
  config.model.thinker.text.vocab_size = 256
  config.model.thinker.update(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_BOS,
                              vision_end_token_id=VISION_EOS)
  config.model.thinker.audio = None
  return config


def test_freeze_stops_gradients_at_the_encoder_output(models):
  grids = [(1, 4, 4)]
  rows = _pixels(np.random.default_rng(4), grids)
  pixel_values, grid_thw = patches.pack(list(zip(rows, grids)), 16, 1)

  assert thinker_vision(_tiny(freeze=True)).freeze and not thinker_vision(_tiny()).freeze
  base = models[1].thinker.visual

  def vision_grad_norm(freeze):
    visual = _twin(base, cfg=dataclasses.replace(base.cfg, freeze=freeze))
    graphdef, params, rest = nnx.split(visual, nnx.Param, ...)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(pixel_values, grid_thw) ** 2)
    return sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(jax.jit(jax.grad(loss))(params)))

  assert vision_grad_norm(True) == 0.0
  assert vision_grad_norm(False) > 0.0


def test_text_only_config_builds_no_encoder():
  config = _small_tiny()
  del config.model.thinker["vision"]
  assert thinker_vision(config) is None
  thinker = nnx.eval_shape(lambda: omni.OmniModel(config, rngs=nnx.Rngs(0))).thinker
  assert thinker.visual is None
  with pytest.raises(ValueError, match="no model.thinker.vision section"):
    thinker.merge_vision(None, np.zeros((1, 3), np.int32), IMAGE, np.zeros((4, 1176), np.float32),
                         np.zeros((1, 3), np.int32))


@pytest.mark.parametrize("edit, key", [
    (dict(num_heads=3), "model.thinker.vision.num_heads"),
    (dict(window_size=50), "model.thinker.vision.window_size"),
    (dict(fullatt_block_indexes=(2,)), "model.thinker.vision.fullatt_block_indexes"),
    (dict(hidden_act="swish9"), "model.thinker.vision.hidden_act"),
    (dict(out_hidden_size=48), "model.thinker.vision.out_hidden_size"),
    (dict(spatial_merge_size=1), "model.thinker.vision.spatial_merge_size"),
    (dict(depth=0), "model.thinker.vision.depth"),
])
def test_config_errors_name_the_key(edit, key):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    thinker_vision(_tiny(**edit))


def test_unknown_config_key_is_rejected():
  config = tiny.get_config()
  config.model.thinker.vision.embed_dim = 32
  with pytest.raises(ConfigError, match=r"model\.thinker\.vision: unknown keys \['embed_dim'\]"):
    thinker_vision(config)


def test_released_sizes():
  from configs import qwen2_5_omni_3b, qwen2_5_omni_7b
  for module, width in ((qwen2_5_omni_7b, 3584), (qwen2_5_omni_3b, 2048)):
    cfg = thinker_vision(module.get_config())
    assert dataclasses.astuple(cfg)[:11] == (32, 1280, 3420, 16, 3, 14, 2, 2, 112, width, (7, 15, 23, 31))
    assert cfg.head_dim == 80 and cfg.window_units == 4
  assert isinstance(tiny.get_config().model.thinker.vision, ml_collections.ConfigDict)

"""The Qwen2.5-VL vision encoder of the Thinker, with static shapes.

Input: a padded buffer of patch rows [P, C*T*p*p] (or [B, P, ...], one buffer per sample) holding the
images/videos one after another, as omni_jax.input.media.patches.pack lays them out, plus their grids
[N, 3] (or [B, N, 3]); grid rows of zeros are unused slots. Output: [P / m^2, out_hidden_size] merged tokens,
image after image, in the order of the IMAGE / VIDEO placeholders; rows past the real tokens are zero.

All index arithmetic (which image, temporal group, merged row/column and window a patch belongs to, its
rotary position and the window order) is computed inside jit from the grids with fixed-size array ops, so
any mix of image sizes that fits the buffer reuses one compiled program.

Attention: full-attention blocks see one temporal group of one image (a dense segment mask over the
buffer); the others one window of window_size^2 pixels. The encoder reorders the merge units window by
window (as transformers does) before the blocks and restores the order after the merger, so every window is
a contiguous run of at most (window_size / patch_size)^2 patches and windowed attention is computed block by
block against neighbouring blocks only (layers.LocalSegments): O(P * window) instead of O(P^2). The blocks
run as one scan; a per-layer flag picks the attention with lax.cond, so only one kind runs per block, or, where
the kernel reads windows as segments (flash_gpu), picks the segment ids of one kernel call.
"""

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from omni_jax import sharding, sizes
from omni_jax.config import Runtime, from_config_dict, require_positive_ints
from omni_jax.errors import ConfigError
from omni_jax.layers.attention import Attention, LocalSegments, SegmentMask, reads_windows_as_segments, resolve
from omni_jax.layers.linear import Linear
from omni_jax.layers.mlp import GatedMLP, activation
from omni_jax.layers.norms import RMSNorm
from omni_jax.layers.rotary import inv_frequencies, mrope_cos_sin
from omni_jax.models.scan import create_stacked, run_stacked

ACT = ("activation_batch", "activation_length", "activation_embed")
EPS = 1e-6  # transformers hard-codes the vision RMSNorm epsilon


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Qwen2_5OmniVisionEncoderConfig fields (transformers' names; 7B values as defaults, except hidden_size,
  whose transformers default 3584 is wrong for every checkpoint) + `freeze` (stop gradients at the output)."""
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  out_hidden_size: int = 3584
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  hidden_act: str = "silu"
  rope_theta: float = 10000.0
  freeze: bool = False

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, key: str) -> "VisionConfig":
    return from_config_dict(cls, cfg, key)

  def validate(self, key: str):
    require_positive_ints(self, ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels",
                                 "patch_size", "temporal_patch_size", "spatial_merge_size", "window_size",
                                 "out_hidden_size"), key)
    if self.hidden_size % self.num_heads:
      raise ConfigError(f"config.{key}.num_heads: hidden_size={self.hidden_size} is not divisible by "
                        f"{self.num_heads} heads")
    if self.head_dim % 4:
      raise ConfigError(f"config.{key}.num_heads: head_dim={self.head_dim} must be a multiple of 4 (2-D rotary "
                        "embeddings split it into height and width halves)")
    if self.window_size % (self.patch_size * self.spatial_merge_size):
      raise ConfigError(f"config.{key}.window_size: {self.window_size} pixels is not a multiple of patch_size * "
                        f"spatial_merge_size = {self.patch_size * self.spatial_merge_size}")
    bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
    if bad:
      raise ConfigError(f"config.{key}.fullatt_block_indexes: {bad} are not block indexes of depth {self.depth}")
    try:
      activation(self.hidden_act)
    except ValueError as e:
      raise ConfigError(f"config.{key}.hidden_act: {e}") from None
    if not self.rope_theta > 0:
      raise ConfigError(f"config.{key}.rope_theta: must be positive, got {self.rope_theta!r}")
    if not isinstance(self.freeze, bool):
      raise ConfigError(f"config.{key}.freeze: must be a bool, got {self.freeze!r}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Values per patch row: (C, T, p, p)."""
    return sizes.patch_dim(self.in_channels, self.temporal_patch_size, self.patch_size)

  @property
  def merge_unit(self) -> int:
    """Patches per merged token (a spatial_merge_size^2 block)."""
    return self.spatial_merge_size ** 2

  @property
  def window_units(self) -> int:
    """Window side in merged tokens."""
    return self.window_size // self.spatial_merge_size // self.patch_size


def thinker_vision(config: ml_collections.ConfigDict) -> Optional[VisionConfig]:
  """The vision tower's config, or None when config.model.thinker has no `vision` section.

  Also checks it against the Thinker: merged tokens must have the LM's width, and the placeholder counts
  and TMRoPE positions (model.thinker.spatial_merge_size) must use the encoder's merge size.
  """
  thinker = config.model.thinker
  if "vision" not in thinker or thinker.vision is None:
    return None
  cfg = VisionConfig.from_config(thinker.vision, "model.thinker.vision")
  if "text" in thinker and cfg.out_hidden_size != thinker.text.hidden_size:
    raise ConfigError(f"config.model.thinker.vision.out_hidden_size: {cfg.out_hidden_size} must equal the "
                      f"language model's hidden_size {thinker.text.hidden_size}")
  if thinker.get("spatial_merge_size", cfg.spatial_merge_size) != cfg.spatial_merge_size:
    raise ConfigError(f"config.model.thinker.vision.spatial_merge_size: {cfg.spatial_merge_size} differs from "
                      f"model.thinker.spatial_merge_size {thinker.spatial_merge_size} (used for positions)")
  return cfg


# --------------------------------------------------------------------------------------- index arithmetic


class Layout(NamedTuple):
  """Where each patch goes, for one buffer. Arrays over patches are in window order."""
  order: jax.Array  # [U] merge units in window order: order[i] = original unit index
  positions: jax.Array  # [2, P] (row, column) of each patch in its image, for the 2-D rotary embedding
  full_segments: jax.Array  # [P] 1 + index of the (image, temporal group); 0 = padding
  window_segments: jax.Array  # [P] 1 + index of the window; 0 = padding
  valid: jax.Array  # [U] bool, original unit order: the unit belongs to an image


def layout(grid_thw: jax.Array, num_patches: int, cfg: VisionConfig) -> Layout:
  """Jittable from the grids [N, 3] (unused rows 0); num_patches is static. Matches transformers'
  get_vision_position_ids / get_vision_attention_seqlens / get_vision_window_index."""
  m, ws = cfg.spatial_merge_size, cfg.window_units
  grid = grid_thw.astype(jnp.int32)
  t, lh, lw = grid[:, 0], grid[:, 1] // m, grid[:, 2] // m
  units = t * lh * lw
  ends = jnp.cumsum(units)
  num_units = num_patches // cfg.merge_unit
  u = jnp.arange(num_units, dtype=jnp.int32)
  item = jnp.searchsorted(ends, u, side="right")  # the image/video holding unit u (N: padding)
  valid = item < grid.shape[0]
  i = jnp.minimum(item, grid.shape[0] - 1)
  local = u - (ends - units)[i]
  per_frame = jnp.maximum(lh[i] * lw[i], 1)
  frame, rest = local // per_frame, local % per_frame
  row, col = rest // jnp.maximum(lw[i], 1), rest % jnp.maximum(lw[i], 1)
  # Full attention: one segment per (image, temporal group).
  groups = jnp.cumsum(t) - t
  full = jnp.where(valid, groups[i] + frame + 1, 0)
  # Windows of ws x ws merged tokens, row-major per temporal group; partial windows at the right/bottom edge.
  win_h, win_w = -(-lh // ws), -(-lw // ws)
  win_count = t * win_h * win_w
  window = (jnp.cumsum(win_count) - win_count)[i] + (frame * win_h[i] + row // ws) * win_w[i] + col // ws
  window = jnp.where(valid, window + 1, 0)
  # Window order: window by window, row-major inside a window; padding units last.
  key = jnp.where(valid, (window * ws + row % ws) * ws + col % ws, jnp.iinfo(jnp.int32).max)
  order = jnp.argsort(key, stable=True)
  # Per patch (the m x m patches of a unit are consecutive rows of the buffer).
  k = jnp.arange(cfg.merge_unit, dtype=jnp.int32)
  pos_h = (row[:, None] * m + k // m).reshape(-1)
  pos_w = (col[:, None] * m + k % m).reshape(-1)
  per_patch = lambda a: jnp.repeat(a, cfg.merge_unit, total_repeat_length=num_patches)
  patch_order = (order[:, None] * cfg.merge_unit + k).reshape(-1)
  return Layout(order=order,
                positions=jnp.stack([pos_h, pos_w])[:, patch_order],
                full_segments=per_patch(full)[patch_order],
                window_segments=per_patch(window)[patch_order],
                valid=valid)


# --------------------------------------------------------------------------------------- modules


class PatchEmbed(nnx.Module):
  """transformers' Conv3d with kernel = stride = (T, p, p) and no bias is a Linear over the (C, T, p, p) row."""

  def __init__(self, cfg: VisionConfig, rt: Runtime, *, rngs: nnx.Rngs):
    self.proj = Linear(cfg.patch_dim, cfg.hidden_size, use_bias=False, names=("vision_patch", "embed"), rngs=rngs,
                       dtype=rt.dtype, param_dtype=rt.param_dtype)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    return self.proj(pixels)


class VisionBlock(nnx.Module):
  """Pre-norm ViT block: RMSNorm, attention with 2-D rotary (q/k rotated in float32), RMSNorm, SwiGLU; all
  projections with bias."""

  def __init__(self, cfg: VisionConfig, rt: Runtime, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, param_dtype=rt.param_dtype)
    self.norm1 = RMSNorm(cfg.hidden_size, eps=EPS, **kw)
    self.attn = Attention(cfg.hidden_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads,
                          head_dim=cfg.head_dim, bias=(True, True, True, True), dtype=rt.dtype,
                          implementation=rt.attention_impl, rotary_dtype=jnp.float32, **kw)
    self.norm2 = RMSNorm(cfg.hidden_size, eps=EPS, **kw)
    self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, use_bias=True,
                        dtype=rt.dtype, **kw)
    self.window_patches = cfg.window_units ** 2 * cfg.merge_unit

  def __call__(self, x, full_mask, window_segments, cos, sin, full_attention):
    """full_mask: SegmentMask over each image's patches; window_segments [B, P] (contiguous windows);
    full_attention: this block's flag."""
    attend = lambda mask, h: self.attn(h, mask, rotary=(cos, sin))
    b, p, _ = x.shape
    if reads_windows_as_segments(resolve(self.attn.implementation, b * self.attn.num_heads * p * p)):
      # One kernel attends both ways: the flag picks the segments. No conditional, which a GPU runs by reading
      # its branch index back to the host, and whose backward pass would keep the rotary tables per layer.
      segments = jnp.where(full_attention, full_mask.q_segments, window_segments)
      h = attend(SegmentMask(segments, causal=False), self.norm1(x))
    else:
      windows = LocalSegments(window_segments, self.window_patches)
      h = jax.lax.cond(full_attention, lambda h: attend(full_mask, h), lambda h: attend(windows, h), self.norm1(x))
    x = sharding.constrain(x + h, ACT)
    x = x + self.mlp(self.norm2(x))
    return sharding.constrain(x, ACT)


class PatchMerger(nnx.Module):
  """RMSNorm per patch, then an MLP over each merge unit's m^2 concatenated patches (checkpoint: merger.ln_q,
  merger.mlp.0 = fc1, merger.mlp.2 = fc2; exact GELU between)."""

  def __init__(self, cfg: VisionConfig, rt: Runtime, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=rt.dtype, param_dtype=rt.param_dtype)
    width = cfg.hidden_size * cfg.merge_unit
    self.ln_q = RMSNorm(cfg.hidden_size, eps=EPS, rngs=rngs, param_dtype=rt.param_dtype)
    self.fc1 = Linear(width, width, use_bias=True, names=("embed", "mlp"), **kw)
    self.fc2 = Linear(width, cfg.out_hidden_size, use_bias=True, names=("mlp", "embed"), **kw)
    self.merge_unit = cfg.merge_unit

  def __call__(self, x: jax.Array) -> jax.Array:
    b, p, d = x.shape
    x = self.ln_q(x).reshape(b, p // self.merge_unit, d * self.merge_unit)
    return self.fc2(activation("gelu")(self.fc1(x)))


class VisionEncoder(nnx.Module):
  """patch_embed -> blocks (stacked, scanned) -> merger. Attribute names follow the checkpoint (thinker.visual.*)."""

  def __init__(self, cfg: VisionConfig, rt: Runtime, *, rngs: nnx.Rngs):
    self.cfg, self.rt = cfg, rt
    self.patch_embed = PatchEmbed(cfg, rt, rngs=rngs)
    self.blocks = create_stacked(lambda r: VisionBlock(cfg, rt, rngs=r), cfg.depth, rngs)
    self.merger = PatchMerger(cfg, rt, rngs=rngs)

  def __call__(self, pixel_values: jax.Array, grid_thw: jax.Array) -> jax.Array:
    """pixel_values [P, patch_dim] + grid_thw [N, 3] -> [P / m^2, out_hidden_size]; or with a leading batch
    axis on both (one buffer per sample: attention never crosses samples, and the batch axis shards over data).
    """
    cfg = self.cfg
    batched = pixel_values.ndim == 3
    if not batched:
      pixel_values, grid_thw = pixel_values[None], grid_thw[None]
    b, num_patches, dim = pixel_values.shape
    if dim != cfg.patch_dim or num_patches % cfg.merge_unit:
      raise ValueError(f"pixel_values {pixel_values.shape}: rows must have {cfg.patch_dim} values and the "
                       f"buffer a multiple of {cfg.merge_unit} rows")
    lay = jax.vmap(lambda g: layout(g, num_patches, cfg))(grid_thw)
    patch_order = (lay.order[:, :, None] * cfg.merge_unit + jnp.arange(cfg.merge_unit)).reshape(b, num_patches)
    pixels = jnp.take_along_axis(pixel_values, patch_order[..., None], axis=1)
    x = sharding.constrain(self.patch_embed(pixels.astype(self.rt.dtype)), ACT)
    # 2-D rotary: the first half of the frequencies reads the row, the second half the column.
    inv = inv_frequencies(cfg.head_dim // 2, cfg.rope_theta)
    half = inv.shape[0]
    cos, sin = mrope_cos_sin(jnp.moveaxis(lay.positions, 1, 0), jnp.concatenate([inv, inv]), (half, half))
    full_mask = SegmentMask(lay.full_segments, causal=False)
    is_full = jnp.asarray([i in cfg.fullatt_block_indexes for i in range(cfg.depth)])
    x = run_stacked(self.blocks, x, full_mask, lay.window_segments, cos, sin, per_layer=(is_full,),
                    scan=self.rt.scan_layers, remat_policy=self.rt.remat_policy)
    merged = self.merger(x)  # [B, U, out] in window order
    inverse = jnp.argsort(lay.order, axis=1)
    out = jnp.take_along_axis(merged, inverse[..., None], axis=1)
    out = jnp.where(lay.valid[..., None], out, 0).astype(self.rt.dtype)
    if cfg.freeze:
      out = jax.lax.stop_gradient(out)
    return out if batched else out[0]

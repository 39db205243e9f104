"""Vision encoder forward throughput (patches/s) of ours (jitted) vs transformers' on the same config (CPU, float32).

  .venv/bin/python bench/bench_vision.py [--size tiny|7b-2layer|7b-8layer|7b|all] [--images N] [--side PX]

Both encoders hold identical weights (ours are imported from the transformers module through the converter
tables) and see the same patch rows: `images` images of side x side pixels (window attention active: 112-px
windows on the 7B shapes, 56-px on the tiny config). The 7b sizes have the released encoder's shapes (hidden
1280, 16 heads, MLP 3420, merger to 3584): "7b-2layer" = one windowed + one full-attention block,
"7b-8layer" = 7 windowed + 1 full (the released 7:1 mix), "7b" = all 32 blocks ("all" skips it: slow).
Iterations of the two alternate, so load from other processes hits both alike; medians are reported as
patches/s and the ratio (ours / transformers: > 1 means we are faster), plus the max output difference as
a check that both did the same work.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniVisionEncoderConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniVisionEncoder

from omni_jax.config import Runtime
from omni_jax.convert import hf
from omni_jax.input.media import patches
from omni_jax.models.vision import VisionConfig, VisionEncoder

from common import time_alternating  # bench/common.py

SIZES = {
    "tiny": dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, window_size=56,
                 fullatt_block_indexes=(1,)),
    "7b-2layer": dict(depth=2, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      window_size=112, fullatt_block_indexes=(1,)),
    "7b-8layer": dict(depth=8, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      window_size=112, fullatt_block_indexes=(7,)),
    "7b": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
               window_size=112, fullatt_block_indexes=(7, 15, 23, 31)),
}


def build(size: str):
  cfg = VisionConfig(**SIZES[size])
  theirs = Qwen2_5OmniVisionEncoder(Qwen2_5OmniVisionEncoderConfig(
      **dict(SIZES[size], fullatt_block_indexes=list(cfg.fullatt_block_indexes)))).eval()
  torch.manual_seed(0)
  with torch.no_grad():
    for p in theirs.parameters():
      p.normal_(0, 0.02)
  ours = VisionEncoder(cfg, Runtime(), rngs=nnx.Rngs(0))
  tensors = {"thinker.visual." + k: v.numpy() for k, v in theirs.state_dict().items()}
  graphdef, state = nnx.split(ours)
  flat = []
  for path, var in nnx.to_flat_state(state):
    dotted = "thinker.visual." + ".".join(map(str, path))
    stacked = dotted.startswith("thinker.visual.blocks.")
    keys, rule = hf.disk_keys(dotted, cfg.depth if stacked else 0)
    values = [rule.from_disk(tensors[k]) for k in keys]
    flat.append((path, var.replace(jnp.asarray(np.stack(values) if stacked else values[0]))))
  return theirs, nnx.merge(graphdef, nnx.from_flat_state(flat))


def run(size: str, images: int, side: int, iters: int):
  theirs, ours = build(size)
  grid = (1, side // 14, side // 14)
  n = int(np.prod(grid))
  rows = np.random.default_rng(0).standard_normal((images * n, 1176)).astype(np.float32)
  grids = np.array([grid] * images)
  pixel_values, grid_thw = patches.pack([(rows[i * n:(i + 1) * n], grid) for i in range(images)], images * n, images)
  encode = jax.jit(lambda m, p, g: m(p, g))
  out = None

  def ours_step():
    nonlocal out
    out = jax.block_until_ready(encode(ours, pixel_values, grid_thw))

  expected = None

  def theirs_step():
    nonlocal expected
    with torch.no_grad():
      expected = theirs(torch.tensor(rows), grid_thw=torch.tensor(grids)).pooler_output

  t_ours, t_theirs = time_alternating([ours_step, theirs_step], iters)
  diff = float(np.abs(np.asarray(out) - expected.numpy()).max())
  params = sum(p.numel() for p in theirs.parameters())
  print(f"{size}: params={params / 1e6:.1f}M  {images} images x {side}x{side} px = {images * n} patches  "
        f"devices={jax.devices()[0].platform} torch_threads={torch.get_num_threads()}")
  print(f"  omni_jax: {images * n / t_ours:,.0f} patches/s ({t_ours * 1e3:.1f} ms)  transformers: "
        f"{images * n / t_theirs:,.0f} patches/s ({t_theirs * 1e3:.1f} ms)  ratio (omni_jax/transformers): "
        f"{t_theirs / t_ours:.2f}x  max |diff| {diff:.1e}")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", default="all", choices=sorted(SIZES) + ["all"])
  p.add_argument("--images", type=int, default=None, help="default: 8 (tiny), 2 (7b-2layer)")
  p.add_argument("--side", type=int, default=None, help="pixels, a multiple of 28; default: 224 (tiny), 448 (7b)")
  p.add_argument("--iters", type=int, default=5)
  args = p.parse_args()
  for size in ["tiny", "7b-2layer", "7b-8layer"] if args.size == "all" else [args.size]:
    tiny = size == "tiny"
    run(size, args.images or (8 if tiny else 2), args.side or (224 if tiny else 448), args.iters)


if __name__ == "__main__":
  main()

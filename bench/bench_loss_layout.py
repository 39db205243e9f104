"""The train step on SFT-shaped rows with the LM head everywhere vs chunked vs on labelled positions only, each
differentiated by JAX or fused (the head computing its gradient in its forward pass).

  .venv/bin/python bench/bench_loss_layout.py                 # tiny (151,936-token head), 4 x 288, 4% labels
  .venv/bin/python bench/bench_loss_layout.py --seq 1024 --labels 0.04 --iters 5

Same model, same batch, same real train step (omni_jax.train.step); only config.train.loss_chunk_size /
label_budget / fused_head_loss differ. Prints the median step time of each layout (timed alternately) and the
compiled step's temporary memory (XLA memory analysis), as ratios to the every-position layout (differentiated
by JAX). Figures: docs/performance.md.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import tiny  # noqa: E402
from omni_jax import batch as batch_lib  # noqa: E402
from omni_jax import sharding  # noqa: E402
from omni_jax.input.synthetic import SyntheticSource  # noqa: E402
from omni_jax.train import state as state_lib  # noqa: E402
from omni_jax.train import step as step_lib  # noqa: E402

LAYOUTS = {"every position": dict(loss_chunk_size=0, label_budget=0, fused=False),
           "chunks of 64": dict(loss_chunk_size=64, label_budget=0, fused=False),
           "chunks of 64, fused": dict(loss_chunk_size=64, label_budget=0, fused=True),
           "labelled (budget)": dict(loss_chunk_size=0, label_budget=None, fused=False),
           "labelled, fused": dict(loss_chunk_size=0, label_budget=None, fused=True)}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=288)
  p.add_argument("--labels", type=float, default=0.04, help="fraction of positions with a label")
  p.add_argument("--iters", type=int, default=5)
  args = p.parse_args()
  host = SyntheticSource(batch_size=args.batch, seq_len=args.seq, vocab_size=4096).batch(0)
  rng = np.random.default_rng(0)
  host["labels"] = np.where(rng.random(host["labels"].shape) < args.labels, host["labels"],
                            batch_lib.IGNORE).astype(np.int32)
  most = int((host["labels"] != batch_lib.IGNORE).sum(axis=1).max())
  budget = max(8, -(-2 * most // 8) * 8)  # twice the fullest row, rounded up to 8
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  steps, temps, states = {}, {}, {}
  for name, layout in LAYOUTS.items():
    c = tiny.get_config()
    del c.model.thinker["vision"], c.model.thinker["audio"], c.model["talker"]
    c.train.objectives = {"thinker_text": 1.0}
    c.train.batch_size, c.train.seq_len = args.batch, args.seq
    c.train.loss_chunk_size = layout["loss_chunk_size"]
    c.train.label_budget = budget if layout["label_budget"] is None else layout["label_budget"]
    c.train.fused_head_loss = layout["fused"]
    setup = state_lib.Setup(c, mesh)
    states[name] = setup.init()
    step = step_lib.jit_train_step(setup)
    batch = {k: jax.device_put(v) for k, v in host.items()}
    states[name], _ = step(states[name], batch)  # compile
    lowered = jax.jit(step_lib.make_train_step(setup)).lower(states[name], batch)
    temps[name] = lowered.compile().memory_analysis().temp_size_in_bytes
    steps[name] = (step, batch)
  times = {name: [] for name in LAYOUTS}
  for _ in range(args.iters):
    for name, (step, batch) in steps.items():
      start = time.perf_counter()
      states[name], m = step(states[name], batch)
      jax.block_until_ready(m["loss"])
      times[name].append(time.perf_counter() - start)
  base = np.median(times["every position"])
  print(f"tiny Thinker, {args.batch} x {args.seq} tokens, {args.labels:.0%} labelled (fullest row {most}, "
        f"budget {budget}), {jax.devices()[0].platform}")
  for name in LAYOUTS:
    t = np.median(times[name])
    print(f"  {name:20s} step {t * 1e3:8.1f} ms  ({base / t:4.2f}x faster)   temporaries "
          f"{temps[name] / 2**20:8.1f} MiB ({temps[name] / temps['every position']:.2f} of every-position)")


if __name__ == "__main__":
  main()

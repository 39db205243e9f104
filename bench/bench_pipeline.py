"""Input-pipeline throughput on the demo corpus, beside what the tiny train step consumes.

  python bench/bench_pipeline.py                      # 0 and 2 workers, then the tiny train step
  python bench/bench_pipeline.py --workers 0 --no-train

Prints samples/s and real tokens/s of the pipeline (configs/tiny.py data section, data.source = "demo") for
each worker count, the train step's consumption rate on the same batches, and their ratio (> 1: the
pipeline keeps up). Timings start after warm-up batches (worker start-up, first compilation per bucket).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pipeline_rate(config, workers: int, batches: int, warmup: int) -> dict:
  from omni_jax.input import pipeline

  it = pipeline.make_iterator(config, worker_count=workers)
  for _ in range(warmup):
    next(it)
  before = it.metrics()
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  elapsed = time.perf_counter() - start
  after = it.metrics()
  it.close()
  d = {k: after.get(k, 0) - before.get(k, 0) for k in ("samples", "tokens", "slots", "batches")}
  return dict(workers=workers, seconds=elapsed, samples_per_s=d["samples"] / elapsed,
              tokens_per_s=d["tokens"] / elapsed, batches_per_s=d["batches"] / elapsed,
              fill=d["tokens"] / max(d["slots"], 1), samples_per_batch=d["samples"] / max(d["batches"], 1))


def train_rate(config, steps: int) -> dict:
  """Steps/s of the tiny train step on demo batches (compiled once per bucket before timing)."""
  import jax
  import numpy as np

  from omni_jax import sharding
  from omni_jax.input import pipeline
  from omni_jax.train import data as data_lib
  from omni_jax.train import state as state_lib
  from omni_jax.train import step as step_lib

  mesh = sharding.make_mesh(config.mesh)
  setup = state_lib.Setup(config, mesh)
  state = setup.init()
  it = pipeline.make_iterator(config, worker_count=0)
  hosts = [next(it) for _ in range(steps + 4)]
  it.close()
  b = config.train.batch_size
  step = None
  compiled = set()
  for host in hosts[:4]:  # warm-up: compile every bucket seen
    batch = data_lib.to_global(host, mesh, config.sharding_rules, b)
    step = step or step_lib.jit_train_step(setup)
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compiled.add(host["input_ids"].shape)
  timed = [h for h in hosts[4:] if h["input_ids"].shape in compiled]
  start = time.perf_counter()
  samples = tokens = 0
  for host in timed:
    state, m = step(state, data_lib.to_global(host, mesh, config.sharding_rules, b))
    samples += int(sum(int(r.max(initial=0)) for r in host["segment_ids"]))
    tokens += int(np.sum(host["segment_ids"] > 0))
  jax.block_until_ready(m)
  elapsed = time.perf_counter() - start
  return dict(steps=len(timed), seconds=elapsed, step_time=elapsed / max(len(timed), 1),
              samples_per_s=samples / elapsed, tokens_per_s=tokens / elapsed, loss=float(m["loss"]))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  parser.add_argument("--batches", type=int, default=30)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--train_steps", type=int, default=10)
  parser.add_argument("--no-train", dest="train", action="store_false")
  parser.add_argument("--demo_dir", default=None)
  args = parser.parse_args(argv)

  from configs import tiny
  from data import demo_corpus  # noqa: F401 - registers config.data.source = "demo"

  config = tiny.get_config()
  config.data.source = "demo"
  config.data.prefetch = 0
  if args.demo_dir:
    config.data.demo_dir = args.demo_dir
  shapes = [(b["seq_len"], config.train.batch_size) for b in config.data.buckets]
  print(f"cpu cores: {os.cpu_count()}; buckets (tokens, rows): {shapes}")
  rates = []
  for w in args.workers:
    r = pipeline_rate(config, w, args.batches, args.warmup + (2 if w else 0))
    rates.append(r)
    print(f"pipeline, {w} workers: {r['samples_per_s']:7.1f} samples/s  {r['tokens_per_s']:8.0f} tokens/s  "
          f"{r['batches_per_s']:5.2f} batches/s  fill {r['fill']:.2f}  {r['samples_per_batch']:.1f} samples/batch")
  if args.train:
    t = train_rate(config, args.train_steps)
    print(f"tiny train step: {t['step_time']:.2f} s/step  {t['samples_per_s']:7.1f} samples/s  "
          f"{t['tokens_per_s']:8.0f} tokens/s  (loss {t['loss']:.2f}, {t['steps']} timed steps)")
    for r in rates:
      print(f"ratio pipeline ({r['workers']} workers) / train step: {r['samples_per_s'] / t['samples_per_s']:.2f}")
  else:
    print("train step not measured (--no-train): pipeline figures only")


if __name__ == "__main__":
  main()

"""A model's init program: every parameter drawn by its own sampling loop and compiled at XLA's default level (the
reference), against omni.create_sharded's program (like parameters drawn a group at a time, compiled with
omni_jax.xla_options' init options for the platform). Both programs' values must be the same bits.

  .venv/bin/python bench/bench_init.py                                        # configs/demo_token2wav.py
  .venv/bin/python bench/bench_init.py --config configs/recipes/new_voice.py:dir=VOICE_DIR
  .venv/bin/python bench/bench_init.py --config configs/qwen2_5_omni_7b.py --topology v5p:1x1x1   # compile only

Prints seconds to trace + compile and to run each program, and the ratio. --topology compiles for a TPU
topology (libtpu; no TPU is opened) and runs nothing.
"""

import argparse
import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from omni_jax import sharding, xla_options  # noqa: E402
from omni_jax.layers import grouped_init  # noqa: E402
from omni_jax.models import omni  # noqa: E402


def load_config(arg: str):
  path, _, option = arg.partition(":")
  spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(option) if option else module.get_config()


def timed_init(config, mesh, shardings, grouped: bool, options: dict, run: bool = True):
  """(trace + compile seconds, run seconds, leaves) of one init program (not run: None, None)."""

  @jax.jit(out_shardings=shardings)
  def init():
    with grouped_init.grouped() if grouped else grouped_init.suspended():
      return nnx.split(omni.OmniModel(config, rngs=nnx.Rngs(0)))[1]

  with sharding.activate(mesh, config.sharding_rules):
    t = time.perf_counter()
    compiled = init.lower().compile(compiler_options=options)
    compile_s = time.perf_counter() - t
    if not run:
      return compile_s, None, None
    t = time.perf_counter()
    state = jax.block_until_ready(compiled())
  return compile_s, time.perf_counter() - t, jax.tree.leaves(state)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/demo_token2wav.py", help="a config file, optionally path:argument")
  p.add_argument("--topology", default=None, help="compile for this TPU topology (e.g. v5p:1x1x1), run nothing")
  args = p.parse_args()
  config = load_config(args.config)
  if args.topology:
    from omni_jax.aot import compile as compile_lib, hardware  # noqa: PLC0415

    devices = compile_lib.devices_for(hardware.parse(args.topology))
  else:
    devices = jax.devices()[:1]
  mesh = sharding.make_mesh({"data": 1}, devices[:1])
  _, abstract = omni.abstract_model(config)
  shardings = sharding.state_shardings(abstract, mesh, config.sharding_rules)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  options = xla_options.for_program("init", devices[0].platform) or {}
  run = not args.topology
  ref_compile, ref_run, ref = timed_init(config, mesh, shardings, False, {}, run)
  ours_compile, ours_run, ours = timed_init(config, mesh, shardings, True, options, run)
  same = run and len(ref) == len(ours) and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ref, ours))
  print(f"{args.config}: {count / 1e6:.2f} M parameters in {len(jax.tree.leaves(abstract))} arrays on "
        f"{args.topology or devices[0].device_kind}; " + (f"the same bits: {same}" if run else "compiled only"))
  seconds = lambda s: "-" if s is None else f"{s:.2f}"  # noqa: E731
  print("| program | trace + compile (s) | run (s) |\n| --- | --- | --- |")
  print(f"| one draw per parameter, default compile | {ref_compile:.1f} | {seconds(ref_run)} |")
  print(f"| grouped draws, compiled with {options or 'default options'} | {ours_compile:.1f} | {seconds(ours_run)} |")
  print(f"compile: {ref_compile / ours_compile:.2f}x faster")
  if run and not same:
    sys.exit("the two programs' values differ")


if __name__ == "__main__":
  main()

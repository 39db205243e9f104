"""Thinker text generation vs transformers' generate: time to first token and decode tokens/s (same run).

  .venv/bin/python bench/bench_generate.py [--size tiny|100m|7b] [--batch 1 4] [--prompt 128] [--new 64]
      [--dtype float32|bfloat16] [--no-reference] [--cache_len 4096] [--aot v5p:1x1x1]

--dtype bfloat16 stores our weights and computes in bf16 (transformers stays float32: its CPU bf16 kernels are
slow), so that row measures what serving in bf16 gains, not a like-for-like ratio.

Both sides get identical weights (ours imported from the transformers model), the same prompts, greedy
decoding without an eos (every row runs max_new_tokens). Ours is the library's path (the conversation engine,
as OmniChat.chat_batch drives it: each prompt prefilled alone, the replies decoded together in one slot per
row); transformers gets them as one left-padded batch. Time to first token = a reply of one new token; decode
tokens/s = rows * (new - 1) / (time(new) - time(1)), the median over --iters interleaved rounds of the round's
difference (after a warm-up: compilation excluded); time to first token, the median of its runs. Prints each
side and the ratios (ours / transformers: > 1 means we are faster).
--size 7b builds the 7B-shaped Thinker LM with random weights for a GPU (our side only: --no-reference).
--layer_buffers split|stacked|auto sets config.generate.layer_buffers (default auto: split on a GPU): "stacked"
decodes over the stacked [layers, ...] weights, whose per-layer slices a GPU copies before each matmul, "split"
over one buffer per layer (the layers unrolled).
--aot TOPOLOGY compiles the decode program for a topology instead (a TPU's, through libtpu, on any host; a GPU's,
h200:1, through jax's CUDA plugin: PYTHONPATH=.venv/gpu-aot) and prints the HBM bytes one step moves by kernel
family against the weights and cache window it must read.
--cache_len N also decodes the same replies in conversations of N cache slots each (as OmniSession and the
server keep them; OmniChat sizes its cache to the prompt and reply) and prints its decode rate against the
tight cache's: a decode step reads the slots a call may reach only (Engine.cache_windows), so ~1.0x is right.
Figures are recorded in docs/performance.md.
"""

import argparse
import os
import sys

if any(a.startswith("--aot") for a in sys.argv):  # compile-only: no backend may try to open a device
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import left_padded_prompts, median_difference, reference_thinker, timings_alternating  # noqa: E402
import reply_testlib  # noqa: E402  (tests/, on sys.path through common)
from omni_jax import sharding  # noqa: E402
from omni_jax.convert import hf  # noqa: E402
from omni_jax.generate import Generator  # noqa: E402
from omni_jax.generate import model as model_lib  # noqa: E402
from omni_jax.models import omni, scan  # noqa: E402

SIZES = {
    "tiny": dict(vocab_size=2048, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, mrope=[2, 3, 3]),
    "100m": dict(vocab_size=16384, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, mrope=[16, 8, 8]),
    # Two 7B-wide layers: a decode step's GEMMs at the 7B's shapes, compiled in seconds (--aot checks).
    "7b-2l": dict(vocab_size=8192, hidden_size=3584, intermediate_size=18944, num_hidden_layers=2,
                  num_attention_heads=28, num_key_value_heads=4, mrope=[16, 24, 24]),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, mrope=[16, 24, 24]),
}


def ours_from_config(config):
  """A Generator with random weights on all devices (no reference needed)."""
  mesh = sharding.make_mesh({"data": -1})
  graphdef, state, shardings = omni.create_sharded(config, mesh)
  return Generator(graphdef, state, config, mesh, shardings)


def lm_config(size: str, dtype: str, layer_buffers: str = "auto"):
  """The config of a text-only Thinker of SIZES[size] (random weights: no reference model)."""
  import ml_collections  # noqa: PLC0415
  from configs import tiny  # noqa: PLC0415

  s = dict(SIZES[size])
  mrope = s.pop("mrope")
  c = tiny.get_config()
  with c.unlocked():
    for k in ("audio", "vision"):
      if k in c.model.thinker:
        del c.model.thinker[k]
  c.model.thinker.text = ml_collections.ConfigDict(dict(
      s, head_dim=s["hidden_size"] // s["num_attention_heads"], mrope_section=tuple(mrope), rope_theta=1e6,
      hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False))
  c.model.thinker.update(pad_token_id=0, eos_token_ids=(), user_token_id=0)
  c.model.dtype = c.model.param_dtype = dtype
  c.generate.layer_buffers = layer_buffers
  return c


def build(size: str, dtype: str, reference: bool, layer_buffers: str = "auto"):
  if not reference:
    return None, ours_from_config(lm_config(size, dtype, layer_buffers))
  import torch  # noqa: PLC0415

  torch.set_num_threads(os.cpu_count())
  model, config, d = reference_thinker(SIZES[size])
  config.model.dtype = config.model.param_dtype = dtype  # bfloat16: weights stored and read in bf16
  config.generate.layer_buffers = layer_buffers
  graphdef, abstract = omni.abstract_model(config)
  mesh = sharding.make_mesh({"data": -1})
  shardings = sharding.state_shardings(abstract, mesh, config.sharding_rules)
  state = jax.device_put(hf.load_state(d, abstract), shardings)
  return model, Generator(graphdef, state, config, mesh, shardings)


def print_aot(args, parser):
  """--aot: the engine's generate program compiled for a topology (no device, no weights): the HBM bytes of one
  decode step by kernel family (a 2-step program's minus a 1-step one's), against the weights and the cache
  window a step must read; and what a call moves outside its loop (the window's copies, layout changes)."""
  import functools  # noqa: PLC0415

  from omni_jax.aot import compile as compile_lib, hardware, hlo  # noqa: PLC0415
  from omni_jax.generate import engine as engine_lib  # noqa: PLC0415

  try:
    devices = compile_lib.devices_for(hardware.parse(args.aot))
  except (hardware.TopologyError, compile_lib.TpuUnavailable) as e:
    parser.error(f"--aot: {e}")
  config = lm_config(args.size, args.dtype, args.layer_buffers)
  mesh = sharding.make_mesh({"data": -1}, devices)
  graphdef, abstract = omni.abstract_model(config)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                        sharding.state_shardings(abstract, mesh, config.sharding_rules))
  split = model_lib.splits_layers(config, mesh)
  if split:  # as Generator holds them
    params = scan.split_layers(params, model_lib.decoder_stacks())
  weights = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract))
  mib = lambda x: f"{x / 2**20:,.1f}"  # noqa: E731
  print(f"{args.aot}: {args.size} Thinker decode, {args.dtype}, weights {mib(weights)} MiB, layer weights "
        f"{'split' if split else 'stacked'}; MiB by kernel family")
  for rows in args.batch:
    max_len = args.cache_len or engine_lib.bucket(args.prompt + args.new, 256)
    window = min(engine_lib.bucket(args.prompt + args.new, engine_lib.WINDOW_LEAST), max_len)
    engine = engine_lib.Engine(graphdef, params, config, mesh, num_slots=rows, max_len=max_len)
    slots = jax.eval_shape(functools.partial(engine._idle_slots, rows, SIZES[args.size]["vocab_size"]))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    slots = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), slots)
    programs = [hlo.parse(engine.programs.generate.lower(params, slots, steps, window, window).compile().as_text(),
                          len(devices)) for steps in (1, 2)]
    moved = [program.bytes_by_family for program in programs]
    step = {k: moved[1][k] - moved[0][k] for k in moved[0]}
    launches = {f: programs[1].launches(f) - programs[0].launches(f) for f in hlo.FAMILIES}
    outside = sum(moved[0].values()) - sum(step.values())
    cache_bytes = 2 * sum(k.size * k.dtype.itemsize for k in jax.tree.leaves(slots.cache.k)) * window / max_len
    print(f"batch {rows}, {max_len} cache slots, window {window}: per step "
          + ", ".join(f"{f} {mib(b)}" for f, b in step.items())
          + f" = {mib(sum(step.values()))} (weights + window {mib(weights + cache_bytes)}); "
          f"per call outside the loop {mib(outside)}; kernels per step "
          + " / ".join(f"{f} {n:,}" for f, n in launches.items()), flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", default="100m", choices=sorted(SIZES))
  p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
  p.add_argument("--prompt", type=int, default=128)
  p.add_argument("--new", type=int, default=64)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--no-reference", dest="reference", action="store_false")
  p.add_argument("--layer_buffers", default="auto", choices=scan.LAYER_BUFFERS,
                 help="config.generate.layer_buffers: the stacked weights as one buffer per layer (split) or not")
  p.add_argument("--cache_len", type=int, default=None, help="also decode in conversations of this many slots")
  p.add_argument("--aot", metavar="TOPOLOGY", default=None,
                 help="compile the decode program for a topology (python -m omni_jax.aot's --topology, e.g. "
                      "v5p:1x1x1) and print the bytes one step moves by kernel family instead of running it")
  args = p.parse_args()
  if args.aot:
    return print_aot(args, p)
  torch_model, gen = build(args.size, args.dtype, args.reference, layer_buffers=args.layer_buffers)
  n_params = sum(np.size(x) for x in jax.tree.leaves(gen.params))
  print(f"size {args.size} ({n_params / 1e6:.1f} M params), {args.dtype}, devices {jax.devices()[0].platform} "
        f"x{jax.device_count()}, prompt {args.prompt}, new {args.new}, "
        f"layer weights {'split' if gen.split_layers else 'stacked'}")
  chat = reply_testlib.chat(gen, eos_token_ids=())
  for rows in args.batch:
    batch = left_padded_prompts(rows, args.prompt, 10, SIZES[args.size]["vocab_size"])
    samples = [reply_testlib.text_sample(ids[seg > 0]) for ids, seg in zip(batch["input_ids"], batch["segment_ids"])]

    def ours(n, max_len=None):
      return lambda: [r.tokens for r in reply_testlib.replies(chat, samples, max_new_tokens=n, max_len=max_len)]

    if args.cache_len:
      t1, tn, s1, sn = timings_alternating([ours(1), ours(args.new), ours(1, args.cache_len),
                                            ours(args.new, args.cache_len)], args.iters)
      tight = rows * (args.new - 1) / median_difference(tn, t1)
      session = rows * (args.new - 1) / median_difference(sn, s1)
      print(f"batch {rows}: decode {tight:.1f} tok/s with a cache of the prompt and reply, {session:.1f} tok/s "
            f"with {args.cache_len} slots per conversation: {session / tight:.2f}x", flush=True)
    elif torch_model is None:
      t1, tn = timings_alternating([ours(1), ours(args.new)], args.iters)
      print(f"batch {rows}: ours TTFT {np.median(t1) * 1e3:.1f} ms, decode "
            f"{rows * (args.new - 1) / median_difference(tn, t1):.1f} tok/s", flush=True)
    else:
      import torch  # noqa: PLC0415

      inputs = dict(input_ids=torch.tensor(batch["input_ids"].astype(np.int64)),
                    attention_mask=torch.tensor(batch["segment_ids"].astype(np.int64)))

      def theirs(n):
        def run():
          with torch.no_grad():
            return torch_model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                        pad_token_id=0, eos_token_id=None)
        return run

      t1, tn, h1, hn = timings_alternating([ours(1), ours(args.new), theirs(1), theirs(args.new)], args.iters)
      ours_tps = rows * (args.new - 1) / median_difference(tn, t1)
      hf_tps = rows * (args.new - 1) / median_difference(hn, h1)
      t1, h1 = float(np.median(t1)), float(np.median(h1))
      check = theirs(args.new)()[:, args.prompt:].numpy()
      same = np.array_equal(check, ours(args.new)()) if args.dtype == "float32" else "n/a (bf16)"
      print(f"batch {rows}: ours TTFT {t1 * 1e3:.1f} ms, decode {ours_tps:.1f} tok/s"
            f" | transformers TTFT {h1 * 1e3:.1f} ms, decode {hf_tps:.1f} tok/s | TTFT ratio "
            f"{h1 / t1:.2f}x, decode ratio {ours_tps / hf_tps:.2f}x | same tokens: {same}", flush=True)


if __name__ == "__main__":
  main()

"""Token2Wav codes -> 24 kHz speech (DiT + BigVGAN): real-time factor vs transformers, and streaming latency.

  .venv/bin/python bench/bench_token2wav.py [--size tiny] [--seconds 10] [--method rk4] [--iters 3]
  .venv/bin/python bench/bench_token2wav.py --size 7b --dtype bfloat16 --method euler --no-reference   # on a GPU

Both sides synthesise the same random codes for the same voice with the same weights (transformers'
Qwen2_5OmniToken2WavModel with perturbed random init; ours converted from it: tests/torch_weights.py's load_dit
and load_bigvgan), float32, transformers' sampler (10 time points, guidance 0.5, sway -1; RK4, the
only method transformers has). RTF = synthesis wall time / audio seconds (< 1: faster than real time); medians
of --iters interleaved runs after a warm-up (compilation excluded). The ratio is transformers' time / ours
(> 1: we are faster).

Streaming (token2wav.streaming, config.generate.token2wav.streaming defaults or the flags): all codes pushed at
once; "first chunk" is the time from push() to the first audio chunk (one DiT window + one vocoder window), the
latency a listener sees once the first chunk's codes are in, against the whole utterance's time. It also prints
the chunked audio's largest difference from the whole utterance's (same noise), relative to its peak.

--size 7b: the released Token2Wav shapes (DiT 22 layers x 1024, BigVGAN 1536 channels), random weights
(our init, parameters perturbed), our side only unless a reference is asked for (slow on CPU).

--aot TOPOLOGY compiles the whole-utterance programs (the DiT sampler, BigVGAN) for a topology instead, with
abstract weights (a GPU's, h200:1, through jax's CUDA plugin: PYTHONPATH=.venv/gpu-aot; no GPU, so no
autotuning), and prints each one's compile time, kernels and HBM bytes by family, and its cuDNN convolutions
(the calls a GPU compiler autotunes).
Figures: docs/performance.md ("Token2Wav").
"""

import argparse
import copy
import os
import sys
import time

if any(a.startswith("--aot") for a in sys.argv):  # compile-only: no backend may try to open a device
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import common  # noqa: E402  (puts the repository and tests/ on sys.path; time_alternating)
import tiny_shapes  # noqa: E402
from omni_jax.config import Runtime  # noqa: E402
from omni_jax.models.bigvgan import BigVGANConfig  # noqa: E402
from omni_jax.models.dit import DiTConfig  # noqa: E402
from omni_jax.token2wav.tower import Token2Wav, Token2WavView  # noqa: E402
from omni_jax.models import scan  # noqa: E402
from omni_jax.token2wav import sampling, synthesis, vocoding, voice  # noqa: E402
from omni_jax.token2wav.sampling import SamplerConfig, sample  # noqa: E402
from omni_jax.token2wav.streaming import StreamingConfig, StreamingSynthesizer  # noqa: E402

SIZES = ("tiny", "7b")
VOICE = {"tiny": (8, 12), "7b": (192, 300)}  # (cond width, reference mel frames)


def hf_sizes(size: str) -> tuple[dict, dict]:
  """(transformers dit_config, bigvgan_config) overrides of the released values. tiny: the tests' tiny Token2Wav
  (tests/tiny_shapes.py) with the released 24-frame blocks, so that the streaming windows have the released
  geometry (its 4-frame blocks would give the vocoder 4 frames of look-ahead only)."""
  if size == "7b":
    return {}, {}
  tiny = copy.deepcopy(tiny_shapes.TOKEN2WAV)  # fresh lists: a config built from them must not share ours
  return dict(tiny["dit_config"], block_size=24), tiny["bigvgan_config"]


def abstract_token2wav(size: str, dtype):
  """Our Token2Wav of `size` without weights (nnx.eval_shape), its parameters in `dtype` as the server holds a
  bfloat16 voice (voice.with_dtype)."""
  dit_kw, vocoder_kw = hf_sizes(size)
  view = Token2WavView(DiTConfig.from_hf(dit_kw), BigVGANConfig.from_hf(vocoder_kw),
                       Runtime(dtype=dtype, param_dtype=dtype))
  return nnx.eval_shape(lambda: Token2Wav(view, rngs=nnx.Rngs(0)))


def reference_and_ours(size: str, dtype, with_reference: bool):
  """(transformers Token2Wav or None, our Token2Wav with the same weights)."""
  dit_kw, vocoder_kw = hf_sizes(size)
  if not with_reference:
    # Random weights drawn on the host (no torch model to build): jax's initializers would compile a program
    # per parameter shape (~500: 13 s at the tiny size on a CPU). Matrices ~ N(0, 1 / fan-in), the rest
    # (biases, SnakeBeta's log-scale alpha / beta) small noise around their zero init.
    graphdef, state = nnx.split(abstract_token2wav(size, dtype))
    rng = np.random.default_rng(1)

    def draw(path, x):
      matrix = any(k in jax.tree_util.keystr(path) for k in ("kernel", "embedding"))
      scale = 1 / np.sqrt(max(1, int(np.prod(x.shape[:-1])))) if matrix else 0.05
      return (scale * rng.standard_normal(x.shape, np.float32)).astype(x.dtype)
    return None, nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))
  import torch  # noqa: PLC0415
  from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniToken2WavConfig  # noqa: PLC0415
  from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniToken2WavModel  # noqa: PLC0415

  import hf_reference as ref  # noqa: PLC0415
  import torch_weights  # noqa: PLC0415

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  hf_config = Qwen2_5OmniToken2WavConfig(dit_config=dit_kw, bigvgan_config=vocoder_kw)
  hf_model = ref.perturb(Qwen2_5OmniToken2WavModel(hf_config).eval(), 1)
  state_dict = hf_model.state_dict()
  t2w = abstract_token2wav(size, dtype)
  torch_weights.load_dit(t2w.code2wav_dit_model, state_dict, prefix="code2wav_dit_model.")
  torch_weights.load_bigvgan(t2w.code2wav_bigvgan_model, {k: v.numpy() for k, v in state_dict.items()},
                             disk_prefix="code2wav_bigvgan_model.")
  return hf_model, t2w


def layer_buffers(mode: str) -> ml_collections.ConfigDict:
  """The config.generate.layer_buffers a Voicer would read (voice.with_layer_buffers)."""
  return ml_collections.ConfigDict(dict(generate=dict(layer_buffers=mode)))


def print_aot(args, parser):
  """--aot: the whole-utterance DiT sampler and BigVGAN of `args.size` compiled for a topology's first device."""
  from omni_jax.aot import compile as compile_lib, hardware, hlo  # noqa: PLC0415

  try:
    device = compile_lib.devices_for(hardware.parse(args.aot))[0]
  except (hardware.TopologyError, compile_lib.TpuUnavailable) as e:
    parser.error(f"--aot: {e}")
  t2w = abstract_token2wav(args.size, jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
  placed = jax.sharding.SingleDeviceSharding(device)
  spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=placed)  # noqa: E731
  cfg = t2w.code2wav_dit_model.cfg
  width, ref_frames = VOICE[args.size]
  n = int(round(args.seconds * 50))
  frames = n * cfg.repeats
  sway = SamplerConfig().sway_coefficient
  programs = {
      "DiT sampler": lambda gd, st: sampling._flow.lower(  # noqa: SLF001 - the one compiled sampler program
          gd, st, spec((1, ref_frames, cfg.mel_dim)), spec((1, width)), spec((1, n), jnp.int32),
          spec((1, frames, cfg.mel_dim)), spec((), jnp.int32) if args.window else None, args.num_steps, 0.5, sway,
          args.method),
      "BigVGAN": lambda gd, st: vocoding._bigvgan.lower(gd, st, spec((1, frames, cfg.mel_dim))),  # noqa: SLF001
  }
  modules = {"DiT sampler": t2w.code2wav_dit_model, "BigVGAN": t2w.code2wav_bigvgan_model}
  split = scan.splits_on(args.layer_buffers, device.platform)
  print(f"{args.aot}: Token2Wav {args.size}, {args.dtype}, {n} codes ({frames} mel frames"
        f"{', a streaming window' if args.window else ''}), {args.method} x {args.num_steps} points, DiT layers "
        f"{'split' if split else 'stacked'}")
  for name, lower in programs.items():
    graphdef, state = nnx.split(modules[name])
    state = jax.tree.map(lambda a: spec(a.shape, a.dtype), state)
    if split and name == "DiT sampler":  # as voice.with_layer_buffers holds them
      state = scan.split_layers(state)
    start = time.perf_counter()
    text = lower(graphdef, state).compile().as_text()
    seconds = time.perf_counter() - start
    program = hlo.parse(text, 1)
    convolutions = text.count('custom_call_target="__cudnn$conv')
    print(f"{name}: compiled in {seconds:.1f} s; kernels "
          + ", ".join(f"{f} {program.launches(f)}" for f in hlo.FAMILIES) + "; MiB "
          + ", ".join(f"{f} {b / 2**20:,.0f}" for f, b in program.bytes_by_family.items())
          + f"; cuDNN convolutions {convolutions}", flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", choices=SIZES, default="tiny")
  p.add_argument("--seconds", type=float, default=10.0, help="utterance length (50 codes per second)")
  p.add_argument("--method", choices=("rk4", "euler"), default="rk4")
  p.add_argument("--num_steps", type=int, default=10)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--no-reference", dest="reference", action="store_false", help="skip transformers")
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--first_chunk_blocks", type=int, default=StreamingConfig.first_chunk_blocks)
  p.add_argument("--chunk_blocks", type=int, default=StreamingConfig.chunk_blocks)
  p.add_argument("--layer_buffers", default="auto", choices=scan.LAYER_BUFFERS,
                 help="config.generate.layer_buffers: the DiT's layers one buffer each (split; GPUs' auto) or not")
  p.add_argument("--window", action="store_true",
                 help="--aot: the DiT as a streaming window's program (its real frames a traced argument)")
  p.add_argument("--aot", metavar="TOPOLOGY", default=None,
                 help="compile the DiT sampler and BigVGAN for a topology (python -m omni_jax.aot's --topology, "
                      "e.g. h200:1 or v5e:1x1) instead of running them")
  args = p.parse_args()
  if args.aot:
    return print_aot(args, p)
  if args.reference and (args.method != "rk4" or args.dtype != "float32"):
    p.error("transformers' Token2Wav runs RK4 in float32 only: use --method rk4 --dtype float32, or --no-reference")

  hf_model, t2w = reference_and_ours(args.size, jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32,
                                     args.reference)
  t2w = voice.with_layer_buffers(t2w, layer_buffers(args.layer_buffers))  # as a Voicer holds it
  cfg = t2w.code2wav_dit_model.cfg
  width, ref_frames = VOICE[args.size]
  rng = np.random.default_rng(0)
  n = int(round(args.seconds * 50))
  codes = rng.integers(0, cfg.num_embeds, (1, n)).astype(np.int32)
  cond = rng.normal(size=(1, width)).astype(np.float32)
  ref_mel = rng.normal(-4.0, 2.0, size=(1, ref_frames, cfg.mel_dim)).astype(np.float32)
  seconds = n * cfg.repeats * t2w.code2wav_bigvgan_model.cfg.hop_length / vocoding.SAMPLE_RATE
  sampler = SamplerConfig(num_steps=args.num_steps, method=args.method)
  streaming = StreamingConfig(first_chunk_blocks=args.first_chunk_blocks, chunk_blocks=args.chunk_blocks)
  print(f"Token2Wav {args.size} ({jax.devices()[0].platform}), {n} codes = {seconds:.2f} s of speech, "
        f"{args.method} x {args.num_steps} points, guidance 0.5, {args.dtype}")

  probe = StreamingSynthesizer(t2w, cond, ref_mel, sampler=sampler, streaming=streaming, seed=0)
  noise = probe.noise(n * cfg.repeats)
  first = []

  def ours_whole():
    synthesis.synthesize(t2w, codes, cond, ref_mel, noise=noise, sampler=sampler)

  def ours_chunked():
    synth = StreamingSynthesizer(t2w, cond, ref_mel, sampler=sampler, streaming=streaming, noise=noise)
    synth.push(codes)
    synth.finish()
    first.append(synth.first_chunk_latency)

  dit, vocoder = t2w.code2wav_dit_model, nnx.split(t2w.code2wav_bigvgan_model)
  mel = sample(dit, jnp.asarray(codes), jnp.asarray(cond), jnp.asarray(ref_mel), noise=jnp.asarray(noise),
               sampler=sampler)

  def ours_dit():
    jax.block_until_ready(sample(dit, jnp.asarray(codes), jnp.asarray(cond), jnp.asarray(ref_mel),
                                 noise=jnp.asarray(noise), sampler=sampler))

  def ours_vocoder():
    jax.block_until_ready(vocoding.vocode(vocoder, mel))

  fns = [ours_whole, ours_chunked, ours_dit, ours_vocoder]
  if hf_model is not None:
    import torch  # noqa: PLC0415

    hf_in = (torch.from_numpy(codes).long(), torch.from_numpy(cond), torch.from_numpy(ref_mel))

    def reference():
      with torch.no_grad():
        hf_model(*hf_in, num_steps=args.num_steps, guidance_scale=0.5, sway_coefficient=-1.0)

    fns.append(reference)
  start = time.perf_counter()
  times = common.time_alternating(fns, args.iters)
  print(f"  (warm-up and {args.iters} interleaved runs: {time.perf_counter() - start:.0f} s)")
  whole, chunked = times[0], times[1]
  print(f"ours, whole utterance: {whole:.3f} s  RTF {whole / seconds:.4f} (DiT {times[2]:.3f} s, BigVGAN "
        f"{times[3]:.3f} s)")
  print(f"ours, chunked ({streaming.first_chunk_blocks} then {streaming.chunk_blocks} blocks, context "
        f"{streaming.past_blocks}/{streaming.future_blocks} blocks): {chunked:.3f} s  RTF {chunked / seconds:.4f}; "
        f"first chunk after {np.median(first[1:]):.3f} s = {np.median(first[1:]) / whole:.3f} x the whole utterance")
  if hf_model is not None:
    print(f"transformers, whole utterance: {times[4]:.3f} s  RTF {times[4] / seconds:.4f}  "
          f"-> ours is {times[4] / whole:.1f}x faster (whole), {times[4] / np.median(first[1:]):.0f}x sooner to "
          f"first audio (chunked)")
  synth = StreamingSynthesizer(t2w, cond, ref_mel, sampler=sampler, streaming=streaming, noise=noise)
  got = np.concatenate(synth.push(codes) + synth.finish(), axis=-1)
  want = synthesis.synthesize(t2w, codes, cond, ref_mel, noise=noise, sampler=sampler).audio
  print(f"chunked vs whole utterance (same noise): max |diff| {np.abs(got - want).max():.2e}, relative to the "
        f"peak {np.abs(got - want).max() / np.abs(want).max():.2e}")


if __name__ == "__main__":
  main()

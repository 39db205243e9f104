"""Measured MFU of the real train step on an accelerator: a ~1B dense Thinker in bfloat16 at sequence 8192,
text-only and with a multimodal batch (images + audio through the encoders), and, where PyTorch with CUDA is
present, transformers' forward + backward + AdamW on the same text model in the same run (a ratio).

  .venv/bin/python bench/bench_mfu.py                      # 1b, seq 8192, batch 2, both batches (+ torch on CUDA)
  .venv/bin/python bench/bench_mfu.py --batch 4 --remat dots_with_no_batch_dims --iters 20
  .venv/bin/python bench/bench_mfu.py --smoke              # tiny config, a few steps on CPU (CI runs this)
  .venv/bin/python bench/bench_mfu.py --attention blocked --no-reference   # another attention; ours only
  .venv/bin/python bench/bench_mfu.py --loss_chunk 0 --no-reference   # head + loss at once: no recompute
  .venv/bin/python bench/bench_mfu.py --plain_head --no-reference      # the head + loss differentiated by JAX
  .venv/bin/python bench/bench_mfu.py --aot v5p:1x1x1   # no device: compile for a TPU chip, print what the
                                                        # step moves through HBM by kernel family
  PYTHONPATH=.venv/gpu-aot .venv/bin/python bench/bench_mfu.py --aot h200:1   # the same through XLA:GPU (jax's
                                                        # CUDA plugin, omni_jax.aot.hardware): kernels per step too
  .venv/bin/python bench/bench_mfu.py --unrolled --no-reference   # layers unrolled (config.model.scan_layers)

MFU = the documented FLOPs formula (omni_jax.train.metrics.FlopCounter, docs/training.md "MFU"; encoder FLOPs
counted for the multimodal batch) / (median step time x devices x peak bf16 FLOP/s of the device:
omni_jax.datasheets.PEAK_FLOPS, or --peak; on CPU the best measured bfloat16-free float32 matmul rate).
Rematerialised FLOPs are not counted (model FLOPs, not hardware FLOPs). All local devices form one data x fsdp mesh.
Attention: config.model.attention_impl = --attention ("auto": the platform's fused kernel; dense None would ask
for the [B, heads, L, L] scores of every layer at 8192). Prints one line per batch kind, and the transformers
ratio (ours / theirs, tokens/s); --no-reference leaves transformers out (bench/accelerator_suite.py runs it in
a process of its own: here it would share the GPU memory JAX holds).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
if any(a.startswith("--aot") for a in sys.argv):  # compile-only: no backend may try to open a device
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import qwen2_5_omni_3b, tiny  # noqa: E402
from omni_jax import aot, datasheets, sharding  # noqa: E402
from omni_jax.train import data as data_lib  # noqa: E402
from omni_jax.train import metrics as metrics_lib  # noqa: E402
from omni_jax.train import state as state_lib  # noqa: E402
from omni_jax.train import step as step_lib  # noqa: E402

# ~1.2B parameters: a Qwen2.5 decoder of 12 layers at width 2048 (0.54B in the blocks, 0.62B in the untied
# 151,936-token embedding and LM head); the multimodal batch adds the released vision and audio encoders (the
# text batch trains the language model alone, as a text-only model's MFU is measured).
DENSE_1B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
                num_attention_heads=16, num_key_value_heads=4, head_dim=128, hidden_act="silu", rms_norm_eps=1e-6,
                rope_theta=1e6, mrope_section=(16, 24, 24), max_position_embeddings=32768, tie_word_embeddings=False)


KINDS = ("text", "multimodal")  # the batches: text only (the language model alone), images + audio + text


def make_config(smoke: bool, seq: int, batch: int, remat: str, media: bool):
  if smoke:
    c = tiny.get_config()
    c.model.thinker.text.vocab_size = 4096  # keeps the CPU smoke run to seconds
  else:
    c = qwen2_5_omni_3b.get_config()  # the released encoders at width 2048
    c.model.thinker.text.update(DENSE_1B)
    c.model.dtype = "bfloat16"
  if "talker" in c.model:  # the Thinker alone (and the Talker's objective with it)
    c = aot.without_towers(c, ["talker"])
  if not media:  # the language model alone: a text step would otherwise update the encoders' idle weights
    with c.unlocked():
      for encoder in ("vision", "audio"):
        if encoder in c.model.thinker:
          del c.model.thinker[encoder]
  if smoke:  # special ids inside the small vocabulary (as tests/train_testlib.py's SMALL_IDS)
    c.model.thinker.update(dict(audio_token_id=1, image_token_id=2, video_token_id=3, audio_start_token_id=4,
                                audio_end_token_id=5, vision_start_token_id=7, vision_end_token_id=8,
                                pad_token_id=0, user_token_id=6, eos_token_ids=(9,)))
  c.model.remat_policy, c.model.scan_layers = remat, True
  c.train.update(dict(batch_size=batch, seq_len=seq, warmup_steps=10, lr=1e-4, steps=1000))
  c.mesh.update(dict(data=1, fsdp=-1))
  s = c.data.synthetic
  s.vocab_size = min(32768, c.model.thinker.text.vocab_size)
  s.min_segment_len = seq // 4
  if media:
    s.kinds = ("image", "audio")
    s.image_grid = (1, 8, 8) if smoke else (1, 32, 32)  # 16 / 256 image tokens
    s.audio_frames = 200 if smoke else 3000  # 2 s / 30 s of audio
  return c


def cpu_matmul_peak(n: int = 1024, iters: int = 3) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(iters):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / jax.local_device_count()


def bench_ours(config, iters: int) -> dict:
  mesh = sharding.make_mesh(config.mesh, devices=jax.local_devices())
  setup = state_lib.Setup(config, mesh)
  state = setup.init()
  t = config.train
  rows = data_lib.process_rows(mesh, config.sharding_rules, t.batch_size, t.seq_len)
  source = data_lib.make_source(config, "train", t.batch_size, rows)
  host = next(source)
  batch = data_lib.to_global(host, mesh, config.sharding_rules, t.batch_size)
  step = step_lib.jit_train_step(setup)
  state, m = step(state, batch)  # compile
  jax.block_until_ready(m)
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - start)
  from flax import traverse_util

  counter = metrics_lib.FlopCounter(config, setup.frozen, tuple(traverse_util.flatten_dict(setup.abstract_params)))
  seconds = float(np.median(times))
  return dict(seconds=seconds, flops=counter.step_flops(host), tokens=int(np.sum(host["segment_ids"] > 0)),
              rows=t.batch_size, seq=t.seq_len, params=setup.num_params(), loss=float(m["loss"]),
              devices=mesh.size, media=sorted(k for k in host if k not in ("input_ids", "labels", "segment_ids",
                                                                            "kind", "use_audio_in_video")))


def bench_transformers(config, iters: int) -> dict | None:
  """transformers' Qwen2.5-Omni Thinker LM (same text config), bf16 autocast, fused AdamW, on CUDA."""
  try:
    import torch
  except ImportError:
    return None
  if not torch.cuda.is_available():
    return None
  from transformers import Qwen2_5OmniThinkerForConditionalGeneration
  from transformers.models.qwen2_5_omni import configuration_qwen2_5_omni as hf_config

  t = dict(config.model.thinker.text)
  section = t.pop("mrope_section")
  text = hf_config.Qwen2_5OmniTextConfig(**{k: v for k, v in t.items() if k != "head_dim"},
                                         rope_scaling={"mrope_section": list(section), "type": "default",
                                                       "rope_type": "default"})
  text.head_dim = t["head_dim"]
  cfg = hf_config.Qwen2_5OmniThinkerConfig(text_config=text.to_dict())
  cfg._attn_implementation = "sdpa"
  model = Qwen2_5OmniThinkerForConditionalGeneration(cfg).cuda().train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
  b, l, vocab = config.train.batch_size, config.train.seq_len, t["vocab_size"]
  ids = torch.randint(16, min(vocab, 32768), (b, l), device="cuda")

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
      hidden = model.model(input_ids=ids).last_hidden_state
      logits = model.lm_head(hidden)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), ids[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  step()
  torch.cuda.synchronize()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
  return dict(seconds=float(np.median(times)), tokens=b * l, device=torch.cuda.get_device_name())


def step_config(args, seq: int, batch: int, kind: str):
  """make_config for one batch kind with the command line's attention and loss layout."""
  config = make_config(args.smoke, seq, batch, args.remat, media=(kind == "multimodal"))
  config.model.attention_impl = None if args.attention == "none" else args.attention
  if args.loss_chunk is not None:
    config.train.loss_chunk_size = args.loss_chunk
  config.train.fused_head_loss = not args.plain_head
  config.model.scan_layers = not args.unrolled
  return config


def print_aot_reports(args, parser):
  """The AOT report of each kind's step (no device needed): what the step moves through HBM, by kernel family."""
  from omni_jax.aot import compile as compile_lib, hardware, report

  try:
    topology = hardware.parse(args.aot)
    devices = compile_lib.devices_for(topology)
  except (hardware.TopologyError, compile_lib.TpuUnavailable) as e:
    parser.error(f"--aot: {e}")
  seq, batch = args.seq or (128 if args.smoke else 8192), args.batch or 2 * len(devices)  # as on a device
  for kind in args.kinds.split(","):
    config = step_config(args, seq, batch, kind)
    compiled = compile_lib.compile_train_step(config, devices, media=(kind == "multimodal"))
    print(f"## {kind}\n{report.format_text(report.build(compiled, topology))}", flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true", help="tiny config, seq 128, a few steps (CPU, CI)")
  p.add_argument("--seq", type=int, default=None, help="default 8192 (smoke: 128)")
  p.add_argument("--batch", type=int, default=None, help="global rows (default 2 per device; smoke: 2)")
  p.add_argument("--remat", default="none", help="config.model.remat_policy")
  p.add_argument("--iters", type=int, default=None, help="timed steps (default 10; smoke: 2)")
  p.add_argument("--kinds", default=",".join(KINDS), help="the batches to step, comma-separated")
  p.add_argument("--peak", type=float, default=None, help="peak FLOP/s per device (default: the device table)")
  p.add_argument("--attention", default="auto", help="config.model.attention_impl (\"none\": dense)")
  p.add_argument("--loss_chunk", type=int, default=None,
                 help="config.train.loss_chunk_size (default: the config's 1024; 0: the logits at once, kept for "
                      "the backward pass instead of recomputed)")
  p.add_argument("--plain_head", action="store_true",
                 help="train.fused_head_loss=False: JAX differentiates the chunked head + loss (each chunk's logits "
                      "recomputed in the backward pass) instead of the fused head computing its gradient forward")
  p.add_argument("--unrolled", action="store_true",
                 help="config.model.scan_layers=False: the layers unrolled (no stacked residuals, no scan)")
  p.add_argument("--no-reference", dest="reference", action="store_false", help="skip transformers' step")
  p.add_argument("--aot", metavar="TOPOLOGY", default=None,
                 help="compile each kind's step for a topology (python -m omni_jax.aot's --topology, e.g. "
                      "v5p:1x1x1) and print its report (memory, bytes by kernel family) instead of running it")
  args = p.parse_args()
  unknown = sorted(set(args.kinds.split(",")) - set(KINDS))
  if unknown:
    p.error(f"--kinds: {', '.join(unknown)} not among {', '.join(KINDS)}")
  if args.aot:
    return print_aot_reports(args, p)
  seq = args.seq or (128 if args.smoke else 8192)
  batch = args.batch or 2 * (1 if args.smoke else jax.local_device_count())
  iters = args.iters or (2 if args.smoke else 10)
  device = jax.devices()[0]
  peak = args.peak or datasheets.PEAK_FLOPS.get(device.device_kind)
  source = "given" if args.peak else "table"
  if peak is None:
    peak, source = cpu_matmul_peak(), "measured float32 matmul (no table entry)"
  print(f"device {device.device_kind} x{jax.local_device_count()}, peak {peak / 1e12:.3g} TFLOP/s per device "
        f"({source}); seq {seq}, batch {batch}, remat {args.remat}, attention {args.attention}"
        + (f", loss chunk {args.loss_chunk}" if args.loss_chunk is not None else "")
        + (", plain head" if args.plain_head else "") + (", layers unrolled" if args.unrolled else ""), flush=True)
  ours_text = None
  for kind in args.kinds.split(","):
    r = bench_ours(step_config(args, seq, batch, kind), iters)
    mfu = r["flops"] / r["seconds"] / r["devices"] / peak
    print(f"{kind}: {r['params'] / 1e9:.3f}B params, {r['rows']}x{r['seq']} ({', '.join(r['media']) or 'text'}), "
          f"{r['flops'] / 1e9:,.2f} GFLOP/step, {r['seconds'] * 1e3:.1f} ms/step, "
          f"{r['tokens'] / r['seconds']:,.0f} tokens/s, MFU {100 * mfu:.1f}%, loss {r['loss']:.3f}", flush=True)
    if kind == "text":
      ours_text = r
  if ours_text is not None and args.reference and not args.smoke:
    theirs = bench_transformers(make_config(False, seq, batch, args.remat, media=False), iters)
    if theirs is None:
      print("transformers: skipped (needs torch with CUDA)")
    else:
      ratio = (ours_text["tokens"] / ours_text["seconds"]) / (theirs["tokens"] / theirs["seconds"])
      print(f"transformers ({theirs['device']}): {theirs['seconds'] * 1e3:.1f} ms/step, "
            f"{theirs['tokens'] / theirs['seconds']:,.0f} tokens/s; ratio omni_jax/transformers {ratio:.2f}x")


if __name__ == "__main__":
  main()

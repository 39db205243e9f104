"""One command that measures this project on one accelerator (an NVIDIA H100 / H200, or a TPU) in under 8 minutes,
compiles included: one markdown table (what, figure, unit, target, note) printed and written, and JSON.

  python bench/accelerator_suite.py                         # accelerator_suite.json, .md and _logs.txt
  python bench/accelerator_suite.py --out $OUT/suite.json --only decode,profile   # some of the jobs (names below)
  JAX_PLATFORMS=cpu python bench/accelerator_suite.py --smoke --out /tmp/suite.json   # tiny sizes on CPU (CI)

Each job is a process of its own with its own timeout, so that a hang or an out-of-memory costs its rows only
(they say "timeout" / "failed" with the end of its stderr) and transformers' step never shares the GPU memory
JAX preallocates; this process never touches the accelerator, and a job may take 90% of its memory
(XLA_PYTHON_CLIENT_MEM_FRACTION, unless set). The jobs, most important first, and their timeouts on an
accelerator:

  mfu           bench_mfu.py: 1.2B dense Thinker, bf16, seq 8192, attention "auto"; text and multimodal   150 s
  attention     bench_attention.py: fwd+bwd at 8K and 32K tokens, 28/4 heads x 128, bf16, samples <= 2048,
                per implementation and flash_gpu tiling; each one's error against float32 dense at 4K         90 s
  decode        bench_generate.py --size 7b --dtype bfloat16 --batch 1 32: Thinker decode tokens/s         75 s
  decode_stacked  the same at batch 1 over the stacked weights (GPUs decode over one buffer per layer)      60 s
  decode_cache  bench_decode_cache.py --size 7b: the decoder stack's step alone at batch 1 / 32 and 256 / 8K
                cache slots (weights and KV cache, without sampling, loop or host)                        75 s
  profile_train / profile_decode: ms and kernels per step by kernel family, GEMM / attention / other (below),
                and the slowest "other" kernels by name (where the elementwise time goes)           40 s each
  transformers  transformers' train step on the text config where torch has CUDA: ours / theirs        45 s
  talker        bench_talker.py --size 7b --no-reference: Talker codes/s at batch 1, alone and in the
                conversation engine's loop (what a spoken reply runs after its text)                      90 s
  token2wav     the released Token2Wav (bench_token2wav's model), euler x 10: compile time and RTF        90 s
  stream        bench_stream.py --size 7b --no-reference: the released shape (no vision tower), random
                weights, through OmniSession: first text / first audio of a spoken question             120 s
  decode_session  bench_generate.py --cache_len 4096: batch 32 in conversations of 4,096 cache slots (as the
                server and OmniSession keep them) against a cache of the prompt and reply                 60 s
  mfu_saved_dots  bench_mfu.py --remat dots_and_attention: both steps keeping the matmuls' outputs and the
                attention kernels' residuals, the elementwise work recomputed in the backward pass          150 s
  mfu_unrolled  bench_mfu.py --kinds text --unrolled: the text step with the layers unrolled             90 s
  mfu_unrolled_multimodal  the same for the multimodal step                                         150 s

plus a device probe (30 s). --budget (460 s) bounds them all: a job gets min(its timeout, what is left), one
that would get under 15 s is skipped, so the suite ends inside 8 minutes even when jobs time out (run the
rest with --only in a second call). The jobs share a persistent XLA compilation cache (a temporary one unless
JAX_COMPILATION_CACHE_DIR is set), so the profile processes load what the mfu and decode jobs compiled.

Helper entries the suite starts (each prints one `SUITE_RESULT {json}` line):
  --probe device        jax.devices()[0].device_kind, platform, versions
  --probe transformers  bench_mfu.bench_transformers on the text config (JAX kept on the CPU)
  --probe token2wav     bench_token2wav's model: the first whole-utterance synthesis (compile + run) vs the next
  --profile train       bench_mfu's text train step, 3 steps under jax.profiler
  --profile decode      bench_generate's Thinker at batch 1, a 1-token and a 48-token reply traced: their
                        difference / 47 is one decode step (the prefill cancels out)
kernel_families() reads the trace's perfetto JSON (*trace.json.gz): device events (GPU stream kernels; TPU
"XLA Ops"; without a device, the host's XLA ops), innermost only, by name: attention (mha, flash, attention,
splash, fmha, cudnn, sdpa), else GEMM (gemm, cublas, nvjet, matmul, dot, cutlass, convolution), else other.

On a lent H100 / H200 whose image has jax, flax, optax, orbax, torch and transformers, carry wheels of what it
lacks, in setup.cfg's ranges (not flax or optax: a flax wheel built for another jax fails to import there;
dashscope carries the Qwen BPE ranks that OmniSession's tokenizer reads, found without importing it). With
these, every job ran (--smoke; transformers' step skipped: no torch) on a Python 3.12 CPU host that had only
jax 0.11.2, flax 0.12.10, optax, orbax and transformers. Here, once:
  mkdir -p .whl   # ignored by git
  P="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  for p in "ml-collections>=1.0,<2" "grain>=0.2.18,<0.3" portpicker cloudpickle "array-record>=0.5,<1" dm-tree \\
           "tensorboardX>=2.6" "soundfile>=0.12" cffi pycparser "jiwer>=3.0,<5" rapidfuzz "librosa>=0.10,<0.12" \\
           audioread "soxr>=0.3" pooch decorator platformdirs importlib_resources "pillow>=10" dashscope; do
    python3 -m pip download -q --no-deps --only-binary=:all: $P -d .whl "$p"; done
then one call with carry [".whl"] and timeout_s 600:
  rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
  export PYTHONPATH=/tmp/site && timeout 500 python3 bench/accelerator_suite.py --out $OUT/suite.json
$OUT/suite.json, suite.md (the table) and suite_logs.txt (each job's command and output) come back (they are
rewritten after every job, so a cut-short run keeps its rows). The table goes in docs/performance.md.
"""

import argparse
import collections
import dataclasses
import datetime
import functools
import glob
import gzip
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULT = "SUITE_RESULT "
TARGETS_CHIP = "NVIDIA H200"  # the decode targets are the issue's figures for it; other chips' scale with bandwidth


def _datasheets():
  """omni_jax.datasheets (jax-free: this process never touches the accelerator)."""
  _paths()
  from omni_jax import datasheets  # noqa: PLC0415

  return datasheets


ATTENTION_IMPLS = {"gpu": ["blocked", "pallas_gpu", "flash_gpu", "cudnn"], "tpu": ["blocked", "splash"],
                   "cpu": ["blocked", "flash_gpu"]}
# Other tilings of flash_gpu, measured beside its default (on a GPU; the CPU smoke run checks that they parse and
# run in interpret mode): wider key tiles with 8 warps, and the backward's tiles shaped as Triton's tutorial's.
FLASH_TILINGS = "wide:block_k=128,warps=8;tall:block_k_dkv=128,block_q_dkv=32,block_q_dq=128,block_k_dq=32,warps_backward=8"
FLASH_TILING_IMPLS = [f"flash_gpu:{t.split(':')[0]}" for t in FLASH_TILINGS.split(";")]  # their rows' impl names

# ---------------------------------------------------------------------------------------------------------------
# Profile traces: ms per step by kernel family.

ATTENTION_WORDS = ("mha", "flash", "attention", "splash", "fmha", "cudnn", "sdpa")
GEMM_WORDS = ("gemm", "cublas", "nvjet", "matmul", "dot", "cutlass", "convolution")  # TPU matmuls: convolution
FAMILIES = ("gemm", "attention", "other")
TOP_OTHER = 12  # the slowest "other" kernels a profile row lists (in its JSON; the first three in its note)


def kernel_family(name: str) -> str:
  """attention / gemm / other by a kernel's (or XLA op's) name; attention first (a cuDNN or flash kernel may name
  a GEMM inside)."""
  n = name.lower()
  if any(w in n for w in ATTENTION_WORDS):
    return "attention"
  if any(w in n for w in GEMM_WORDS):
    return "gemm"
  return "other"


def trace_file(trace_dir: str) -> str:
  """The newest perfetto / trace-viewer JSON under a jax.profiler.trace folder."""
  files = glob.glob(os.path.join(trace_dir, "**", "*trace.json.gz"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no *trace.json.gz under {trace_dir}")
  return max(files, key=lambda f: (os.path.getmtime(f), "perfetto" in os.path.basename(f)))


def _device_events(events: list) -> tuple[list, str]:
  """The events that are device work, and where they came from."""
  process, thread = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      process[e.get("pid")] = str(e.get("args", {}).get("name", ""))
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      thread[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", ""))
  spans = [e for e in events if e.get("ph") == "X" and float(e.get("dur", 0) or 0) > 0]
  devices = {pid for pid, name in process.items() if name.startswith("/device:")}
  if devices:
    chosen = set()
    for pid in devices:  # GPU: the streams' kernels; TPU: the "XLA Ops" line (not "XLA Modules": they hold ops)
      names = {tid: n for (p, tid), n in thread.items() if p == pid}
      streams = {tid for tid, n in names.items() if n.startswith("Stream")}
      ops = {tid for tid, n in names.items() if n == "XLA Ops"}
      rest = {tid for tid, n in names.items() if n not in ("XLA Modules", "Steps") and not n.startswith("Framework")}
      chosen |= {(pid, tid) for tid in (streams or ops or rest)}
    picked = [e for e in spans if (e.get("pid"), e.get("tid")) in chosen]
    if picked:
      return picked, "device"
  ops = [e for e in spans if "hlo_op" in (e.get("args") or {})]  # CPU: XLA's thunks on the host's threads
  if ops:
    return ops, "host XLA ops"
  return [e for e in spans if not str(e.get("name", "")).startswith("$")], "host events"  # "$": Python frames


def _innermost(events: list) -> list:
  """Events that hold no other event of their thread (a while loop's thunk holds its body's)."""
  out = []
  by_thread = {}
  for e in events:
    by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
  for evs in by_thread.values():
    evs.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
    for i, e in enumerate(evs):
      end = float(e["ts"]) + float(e["dur"])
      if i + 1 < len(evs) and float(evs[i + 1]["ts"]) < end:
        continue
      out.append(e)
  return out


def kernel_families(trace_dir: str, steps: int = 1) -> dict:
  """ms per step of GEMM, attention and other device work in the trace under trace_dir (jax.profiler.trace(...,
  create_perfetto_trace=True)), kernels per step of each (`launches`: against the compiled program's count,
  omni_jax.aot's "kernels per step"), the trace's event source and event count."""
  with gzip.open(trace_file(trace_dir), "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  picked, source = _device_events(events)
  picked = _innermost(picked)
  total, launches = dict.fromkeys(FAMILIES, 0.0), dict.fromkeys(FAMILIES, 0.0)
  other = collections.Counter()  # ms of each "other" kernel: where the elementwise time goes
  for e in picked:
    name = str(e.get("name", ""))
    family = kernel_family(name)
    total[family] += float(e["dur"]) / 1e3  # trace times are microseconds
    launches[family] += 1 / steps
    if family == "other":
      other[name] += float(e["dur"]) / 1e3 / steps
  top = {name: ms for name, ms in other.most_common(TOP_OTHER)}
  return dict({k: v / steps for k, v in total.items()}, source=source, events=len(picked), top_other=top,
              launches=launches)


# ---------------------------------------------------------------------------------------------------------------
# Helper entries: measurements the benches do not print, each in its own process.

def _emit(result: dict):
  print(RESULT + json.dumps(result), flush=True)


def _paths():
  for p in (ROOT, HERE, os.path.join(ROOT, "tests")):
    if p not in sys.path:
      sys.path.insert(0, p)


def probe_device():
  import jax  # noqa: PLC0415
  import jaxlib  # noqa: PLC0415

  d = jax.devices()[0]
  _emit(dict(device_kind=d.device_kind, platform=d.platform, device_count=jax.device_count(), jax=jax.__version__,
             jaxlib=jaxlib.__version__, python=sys.version.split()[0]))


def probe_transformers(smoke: bool, seq: int, batch: int, iters: int):
  """transformers' forward + backward + AdamW (bench_mfu.bench_transformers) on the text config."""
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    return _emit(dict(skipped="no torch"))
  if not torch.cuda.is_available():
    return _emit(dict(skipped="no torch CUDA"))
  _paths()
  import bench_mfu  # noqa: PLC0415

  r = bench_mfu.bench_transformers(bench_mfu.make_config(smoke, seq, batch, "none", media=False), iters)
  _emit(dict(r, batch=batch, seq=seq))


def probe_token2wav(smoke: bool, seconds: float, iters: int):
  """The released (smoke: tiny) Token2Wav, our random weights: the first whole-utterance synthesis (compiles the
  DiT sampler and BigVGAN) against the median of the next ones."""
  _paths()
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  import bench_token2wav as b  # noqa: PLC0415
  from omni_jax.token2wav import synthesis, vocoding  # noqa: PLC0415
  from omni_jax.token2wav.sampling import SamplerConfig  # noqa: PLC0415

  size = "tiny" if smoke else "7b"
  dtype = jnp.float32 if smoke else jnp.bfloat16
  t0 = time.perf_counter()
  _, t2w = b.reference_and_ours(size, dtype, False)
  t2w = b.voice.with_layer_buffers(t2w, b.layer_buffers("auto"))  # as a Voicer holds it (split on GPUs)
  build = time.perf_counter() - t0
  cfg = t2w.code2wav_dit_model.cfg
  width, ref_frames = b.VOICE[size]
  rng = np.random.default_rng(0)
  n = int(round(seconds * 50))
  codes = rng.integers(0, cfg.num_embeds, (1, n)).astype(np.int32)
  cond = rng.normal(size=(1, width)).astype(np.float32)
  ref_mel = rng.normal(-4.0, 2.0, size=(1, ref_frames, cfg.mel_dim)).astype(np.float32)
  audio_s = n * cfg.repeats * t2w.code2wav_bigvgan_model.cfg.hop_length / vocoding.SAMPLE_RATE
  sampler = SamplerConfig(num_steps=10, method="euler")

  def run():
    t = time.perf_counter()
    synthesis.synthesize(t2w, codes, cond, ref_mel, sampler=sampler, seed=0)  # returns numpy: synchronous
    return time.perf_counter() - t

  first = run()
  steady = float(np.median([run() for _ in range(iters)]))
  _emit(dict(compile_s=first - steady, first_s=first, steady_s=steady, audio_s=audio_s, rtf=steady / audio_s,
             build_s=build, size=size, dtype=str(jnp.dtype(dtype))))


def profile_train(smoke: bool, trace_dir: str, steps: int):
  """bench_mfu's text train step (attention "auto"), `steps` steps traced after a compile and a warm-up step."""
  _paths()
  import jax  # noqa: PLC0415

  import bench_mfu  # noqa: PLC0415
  from omni_jax import sharding  # noqa: PLC0415
  from omni_jax.train import data as data_lib  # noqa: PLC0415
  from omni_jax.train import state as state_lib  # noqa: PLC0415
  from omni_jax.train import step as step_lib  # noqa: PLC0415

  seq, batch = (128, 2) if smoke else (8192, 2 * jax.local_device_count())  # bench_mfu's defaults
  config = bench_mfu.make_config(smoke, seq, batch, "none", media=False)
  config.model.attention_impl = "auto"
  mesh = sharding.make_mesh(config.mesh, devices=jax.local_devices())
  setup = state_lib.Setup(config, mesh)
  state = setup.init()
  rows = data_lib.process_rows(mesh, config.sharding_rules, batch, seq)
  host = next(data_lib.make_source(config, "train", batch, rows))
  batch_arrays = data_lib.to_global(host, mesh, config.sharding_rules, batch)
  step = step_lib.jit_train_step(setup)
  for _ in range(2):  # compile (or load from the shared cache), then one warm step
    state, m = step(state, batch_arrays)
    jax.block_until_ready(m)
  t = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      state, m = step(state, batch_arrays)
      jax.block_until_ready(m)
  wall = (time.perf_counter() - t) / steps
  _emit(dict(kernel_families(trace_dir, steps), wall_ms=wall * 1e3, steps=steps, seq=seq, batch=batch))


def profile_decode(smoke: bool, trace_dir: str, new: int):
  """bench_generate's Thinker (7B bf16; smoke: tiny float32) at batch 1: a 1-token and a `new`-token reply are
  traced; their difference / (new - 1) is one decode step (the prefill cancels out, as in bench_generate)."""
  _paths()
  import jax  # noqa: PLC0415

  import bench_generate as g  # noqa: PLC0415
  import common  # noqa: PLC0415
  import reply_testlib  # noqa: PLC0415

  size, dtype, prompt = ("tiny", "float32", 16) if smoke else ("7b", "bfloat16", 128)
  _, gen = g.build(size, dtype, False)
  chat = reply_testlib.chat(gen, eos_token_ids=())
  b = common.left_padded_prompts(1, prompt, 10, g.SIZES[size]["vocab_size"])
  samples = [reply_testlib.text_sample(ids[seg > 0]) for ids, seg in zip(b["input_ids"], b["segment_ids"])]

  def reply(n):
    return [r.tokens for r in reply_testlib.replies(chat, samples, max_new_tokens=n)]

  reply(1)  # compile (or load from the shared cache) both engines' programs
  reply(new)
  fam = {}
  for n in (1, new):
    with jax.profiler.trace(os.path.join(trace_dir, f"new{n}"), create_perfetto_trace=True):
      reply(n)
    fam[n] = kernel_families(os.path.join(trace_dir, f"new{n}"), 1)
  per_step = {k: max(0.0, (fam[new][k] - fam[1][k]) / (new - 1)) for k in FAMILIES}
  launches = {k: max(0.0, (fam[new]["launches"][k] - fam[1]["launches"][k]) / (new - 1)) for k in FAMILIES}
  top = {name: (ms - fam[1]["top_other"].get(name, 0.0)) / (new - 1) for name, ms in fam[new]["top_other"].items()}
  top = dict(sorted(((n, ms) for n, ms in top.items() if ms > 0), key=lambda kv: -kv[1]))
  _emit(dict(per_step, source=fam[new]["source"], events=fam[new]["events"], new=new, size=size, dtype=dtype,
             top_other=top, launches=launches))


# ---------------------------------------------------------------------------------------------------------------
# Jobs: one process each, its rows parsed from what it prints.

@dataclasses.dataclass
class Job:
  name: str
  cmd: list
  timeout: float
  rows: list  # planned rows: dicts of key, what, unit, target (and goal: (">=" | "<=", value) or None)
  parse: Callable  # (stdout, job) -> {key: {figure, note, ...}}; keys missing from it fail with the process
  env: dict = dataclasses.field(default_factory=dict)
  skip: Optional[str] = None  # a reason not to run it at all


def row(key, what, unit, target="-", goal=None):
  return dict(key=key, what=what, unit=unit, target=target, goal=goal)


def _num(s: str) -> float:
  return float(s.replace(",", ""))


def _result(stdout: str) -> Optional[dict]:
  for line in reversed(stdout.splitlines()):
    if line.startswith(RESULT):
      return json.loads(line[len(RESULT):])
  return None


def parse_mfu(stdout, job):
  out = {}
  for kind, params, fields, gflop, ms, tps, mfu in re.findall(
      r"^(text|multimodal): ([\d.]+)B params, \S+ \(([^)]*)\), ([\d,.]+) GFLOP/step, ([\d.]+) ms/step, ([\d,]+) "
      r"tokens/s, MFU ([\d.]+)%", stdout, re.M):
    flop = f"{_num(gflop) / 1e3:,.1f} TFLOP" if _num(gflop) >= 1e3 else f"{_num(gflop):.3g} GFLOP"
    out[f"mfu.{kind}"] = dict(figure=float(mfu), tokens_per_s=_num(tps), ms_per_step=float(ms),
                              gflop_per_step=_num(gflop), batch_fields=fields.split(", "),
                              note=f"{float(ms):.1f} ms/step, {_num(tps):,.0f} tokens/s, {flop}/step, {params}B "
                                   "params")
  peak = re.search(r"peak ([\d.]+) TFLOP/s per device \((.*?)\); seq", stdout)
  for r in out.values():
    if peak:
      r["note"] += f"; peak {peak.group(1)} TFLOP/s ({peak.group(2)})"
  return out


def parse_attention(stdout, job):
  """bench_attention's markdown tables, by their headers' column names: times, then errors against dense."""
  out, cols = {}, None
  for line in stdout.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if "impl" in cells and ("fwd+bwd ms" in cells or "check tokens" in cells):
      cols = {name: i for i, name in enumerate(cells)}
      continue
    if not cols or not line.startswith("|") or not cells[0].isdigit() or len(cells) < len(cols):
      continue
    impl = cells[cols["impl"]]
    if "check tokens" in cols:
      key = f"attention.error.{impl}"
      if key in {r["key"] for r in job.rows}:
        try:
          errors = {name: float(cells[cols[name]]) for name in ("out", "dq", "dk", "dv")}
          out[key] = dict(figure=max(errors.values()), note=", ".join(f"{n} {e:.1e}" for n, e in errors.items()) +
                          f" at {cells[0]} tokens")
        except ValueError:
          out[key] = dict(status="failed", note=cells[cols["out"]])
      continue
    length, value = cells[cols["tokens"]], cells[cols["fwd+bwd ms"]]
    key = f"attention.{length}.{impl}"
    if key not in {r["key"] for r in job.rows}:
      continue
    mem = cells[cols["temp memory (MiB)"]] if "temp memory (MiB)" in cols else "?"
    try:
      out[key] = dict(figure=float(value), note=f"temp memory {mem} MiB")
    except ValueError:
      out[key] = dict(status="failed", note=value)
  return out


def parse_decode(stdout, job):
  out = {}
  params = re.search(r"\(([\d.]+) M params\), (\w+)", stdout)
  planned = {r["batch"]: r for r in job.rows}
  bw = job.env.get("_hbm")
  for batch, ttft, tps in re.findall(r"^batch (\d+): ours TTFT ([\d.]+) ms, decode (-?[\d.]+) tok/s", stdout, re.M):
    if int(batch) not in planned:
      continue
    r = dict(figure=float(tps), note=f"TTFT {ttft} ms")
    goal = planned[int(batch)].get("goal")
    if goal and bw:  # decode is bandwidth-bound: the targets are an H200's, scaled for other chips
      reference = _datasheets().HBM_BANDWIDTH[TARGETS_CHIP]
      scaled = goal[1] * float(bw) / reference
      r.update(target=f"{goal[0]} {scaled:.0f} ({goal[1]:g} at {reference / 1e12:g} TB/s)", _goal=(goal[0], scaled))
    if params and int(batch) == 1:
      weights = float(params.group(1)) * 1e6 * (2 if params.group(2) == "bfloat16" else 4)
      r["weight_bytes"] = weights
      if bw:
        bound = float(bw) / weights
        r["bound_tokens_per_s"] = bound
        r["note"] += f"; {100 * float(tps) / bound:.0f}% of the HBM bound ({bound:.0f} tokens/s: "
        r["note"] += f"{weights / 1e9:.1f} GB of weights / {float(bw) / 1e12:.2f} TB/s)"
      else:
        r["note"] += f"; {weights / 1e9:.2f} GB of weights (no HBM bandwidth entry for this device)"
    out[planned[int(batch)]["key"]] = r
  return out


def parse_decode_session(stdout, job):
  m = re.search(r"^batch (\d+): decode ([\d.]+) tok/s with a cache of the prompt and reply, ([\d.]+) tok/s "
                r"with (\d+) slots per conversation: ([\d.]+)x", stdout, re.M)
  if not m:
    return {}
  return {"decode.session": dict(figure=float(m.group(5)), note=f"{m.group(3)} vs {m.group(2)} tokens/s")}


def parse_decode_cache(stdout, job):
  """bench_decode_cache's table: ms per step of the stack alone, and the bytes it must read (weights + cache)
  as a share of the HBM bandwidth."""
  weights = re.search(r"weights (\d+) MiB", stdout)
  bw = job.env.get("_hbm")
  out = {}
  for batch, slots, mib, ms in re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) \|", stdout, re.M):
    key = f"decode_cache.b{batch}.{slots}"
    note = f"cache {int(mib):,} MiB"
    if weights:
      moved = (int(weights.group(1)) + int(mib)) * 2**20
      note += f"; weights + cache {moved / 1e9:.1f} GB"
      if bw:
        note += f" = {100 * moved / float(bw) / (float(ms) / 1e3):.0f}% of the HBM bandwidth"
    out[key] = dict(figure=float(ms), note=note)
  return out


def parse_talker(stdout, job):
  m = re.search(r"batch 1: ours (-?[\d.]+) codes/s(.*)", stdout)
  if not m:
    return {}
  params = re.search(r"\(Talker ([\d.]+) M params\)", stdout)
  extra = m.group(2).split("|")[0].strip(" ()")  # 7b: "(N per row; first code M ms)"; tiny: "| transformers..."
  note = "; ".join(x for x in (f"Talker {params.group(1)} M params" if params else "", extra) if x)
  out = {"talker.b1": dict(figure=float(m.group(1)), note=note)}
  engine = re.search(r"batch 1: engine (-?[\d.]+) codes/s", stdout)
  if engine:
    out["talker.engine.b1"] = dict(figure=float(engine.group(1)), note="the engine's loop after the text ended")
  return out


def parse_stream(stdout, job):
  m = re.search(r"ours first text (\d+) ms, first code (\d+) ms, first audio (\d+) ms, RTF (\S+)", stdout)
  if not m:
    return {}
  size = re.search(r"^size (\S+) \((\d+) M params\)", stdout, re.M)
  what = f"{size.group(1)}, {size.group(2)} M params" if size else "?"
  note = f"{what}; first code {m.group(2)} ms, RTF {m.group(4)}"
  return {"stream.first_text": dict(figure=float(m.group(1)), note=note),
          "stream.first_audio": dict(figure=float(m.group(3)), note=note)}


def parse_result(make: Callable):
  """A parser of a helper's SUITE_RESULT line: make(result) -> {key: row}."""
  def parse(stdout, job):
    r = _result(stdout)
    if r is None:
      return {}
    if "skipped" in r:
      return {k["key"]: dict(status="skipped", note=r["skipped"]) for k in job.rows}
    return make(r)
  return parse


def _profile_row(key):
  def make(r):
    total = sum(r[k] for k in FAMILIES)
    note = (f"GEMM {r['gemm']:.2f}, attention {r['attention']:.2f}, other {r['other']:.2f} ms "
            f"({r['source']}, {r['events']} events)")
    if "wall_ms" in r:
      note += f"; wall {r['wall_ms']:.1f} ms/step"
    launches = r.get("launches", {})
    if launches:
      note += "; kernels per step " + " / ".join(f"{k} {launches[k]:,.0f}" for k in FAMILIES)
    top = r.get("top_other", {})
    if top:
      note += "; slowest other: " + ", ".join(f"{n} {ms:.2f}" for n, ms in list(top.items())[:3])
    return {key: dict(figure=total, note=note, families={k: r[k] for k in FAMILIES}, source=r["source"],
                      top_other=top, launches=launches)}
  return make


def _token2wav_rows(r):
  what = f"{r['audio_s']:.1f} s of speech, {r['dtype']}; first call {r['first_s']:.1f} s, model built in " \
         f"{r['build_s']:.1f} s"
  return {"token2wav.compile": dict(figure=r["compile_s"], note=what),
          "token2wav.rtf": dict(figure=r["rtf"], note=f"{r['steady_s']:.3f} s for {r['audio_s']:.1f} s of speech")}


def _transformers_row(r, devices):
  tps = r["tokens"] / r["seconds"]
  return {"transformers.text": dict(figure=tps, theirs_tokens_per_s=tps, devices=devices, note=(
      f"theirs {r['seconds'] * 1e3:.1f} ms/step, {tps:,.0f} tokens/s on {r['device']} (batch {r['batch']} x "
      f"{r['seq']})"))}


def plan(args, device: dict) -> list:
  """The jobs, most important first."""
  py = [sys.executable]
  me = py + [os.path.abspath(__file__)]
  bench = lambda name: py + [os.path.join(HERE, name)]  # noqa: E731
  smoke = ["--smoke"] if args.smoke else []
  s = args.smoke
  platform = device.get("platform", "cpu")
  t = lambda accelerator: 120 if s else accelerator  # noqa: E731  timeouts (smoke: generous, CI's CPU is shared)
  jobs = []

  size = "tiny, seq 128" if s else "1.2B dense, bf16, seq 8192"
  jobs.append(Job("mfu", bench("bench_mfu.py") + smoke + ["--attention", "auto", "--no-reference"], t(150),
                  [row("mfu.text", f"train step MFU, text ({size}, attention auto)", "%", ">= 50", (">=", 50)),
                   row("mfu.multimodal", f"train step MFU, images + audio ({size}, attention auto)", "%", ">= 45",
                       (">=", 45))], parse_mfu))

  lengths = [256, 1024] if s else [8192, 32768]
  shape = ["--heads", "4", "--kv_heads", "2", "--dim", "32", "--segment", "256", "--dtype", "float32"] if s else \
      ["--heads", "28", "--kv_heads", "4", "--dim", "128", "--segment", "2048", "--dtype", "bfloat16"]
  impls = ATTENTION_IMPLS.get(platform, ["blocked"])
  tilings = FLASH_TILING_IMPLS if "flash_gpu" in impls else []
  rows = [row(f"attention.{n}.{impl}", f"attention fwd+bwd, {n} tokens, {impl}", "ms",
              *(("<= 1.7", ("<=", 1.7)) if n == 8192 else ("-", None))) for n in lengths for impl in impls + tilings]
  check = 512 if s else 4096
  rows += [row(f"attention.error.{impl}", f"attention error vs float32 dense, {check} tokens, {impl}", "rel. L2",
               "<= 0.02", ("<=", 0.02)) for impl in impls if impl != "blocked"]
  jobs.append(Job("attention", bench("bench_attention.py") + shape + [
      "--impls", ",".join(impls), "--lengths", ",".join(map(str, lengths)), "--iters", "2" if s else "5",
      "--max_dense_gib", "1", "--check", str(check)] + (["--tilings", FLASH_TILINGS] if tilings else []), t(90),
                  rows, parse_attention))
  if platform not in ("gpu", "tpu"):
    jobs.append(Job("attention_fused", [], 0, [row("attention.fused", "attention fwd+bwd, fused kernels "
                                                   "(pallas_gpu, cudnn / splash)", "ms")],
                    lambda o, j: {}, skip=f"no GPU or TPU ({platform})"))

  decode = ["--size", "tiny", "--dtype", "float32", "--batch", "1", "4", "--prompt", "16", "--new", "64",
            "--iters", "3"] if s else ["--size", "7b", "--dtype", "bfloat16", "--batch", "1", "32", "--prompt", "128",
                                       "--new", "48", "--iters", "3"]
  big = 4 if s else 32
  name = "tiny float32" if s else "7B bf16"
  hbm = next((v for k, v in sorted(_datasheets().HBM_BANDWIDTH.items(), key=lambda kv: -len(kv[0]))
              if device.get("device_kind", "").startswith(k)), None)
  jobs.append(Job("decode", bench("bench_generate.py") + decode + ["--no-reference"], t(75),
                  [dict(row("decode.batch1", f"Thinker decode, {name}, batch 1", "tokens/s", ">= 190", (">=", 190)),
                        batch=1),
                   dict(row("decode.batched", f"Thinker decode, {name}, batch {big}", "tokens/s", ">= 6000",
                            (">=", 6000)), batch=big)],
                  parse_decode, env={"_hbm": hbm} if hbm else {}))

  # The same at batch 1 over the stacked weights (config.generate.layer_buffers=stacked; GPUs default to one
  # buffer per layer): XLA:GPU copies each layer's slice of a stack before its matmuls, about twice the weight
  # bytes of a step (docs/performance.md, "as XLA:GPU compiles them"). The ratio of the two rows is the split's.
  one = decode[:decode.index("--batch")] + ["--batch", "1"] + decode[decode.index("--prompt"):]
  jobs.append(Job("decode_stacked", bench("bench_generate.py") + one + ["--no-reference", "--layer_buffers",
                                                                        "stacked"], t(60),
                  [dict(row("decode.stacked", f"Thinker decode, {name}, batch 1, stacked layer weights", "tokens/s"),
                        batch=1)],
                  parse_decode, env={"_hbm": hbm} if hbm else {}))

  # The decoder stack alone (no sampling, no loop, no host): what the weights and the KV cache cost per step.
  cache_args = ["--size", "tiny", "--dtype", "float32", "--slots", "128,1024", "--batch", "1,2", "--steps", "3",
                "--iters", "1"] if s else ["--size", "7b", "--dtype", "bfloat16", "--slots", "256,8192",
                                           "--batch", "1,32", "--steps", "10", "--iters", "3"]
  slots, rows_ = cache_args[cache_args.index("--slots") + 1], cache_args[cache_args.index("--batch") + 1]
  jobs.append(Job("decode_cache", bench("bench_decode_cache.py") + cache_args, t(75),
                  [dict(row(f"decode_cache.b{b}.{n}", f"decoder stack step, {name}, batch {b}, {n} cache slots",
                            "ms/step"), batch=int(b)) for b in rows_.split(",") for n in slots.split(",")],
                  parse_decode_cache, env={"_hbm": hbm} if hbm else {}))

  trace_root = args.trace_dir
  jobs.append(Job("profile_train", me + smoke + ["--profile", "train", "--trace_dir",
                                                 os.path.join(trace_root, "train")], t(40),
                  [row("profile.train", f"train step by kernel family (text, {size})", "ms/step")],
                  parse_result(_profile_row("profile.train"))))
  jobs.append(Job("profile_decode", me + smoke + ["--profile", "decode", "--trace_dir",
                                                  os.path.join(trace_root, "decode")], t(40),
                  [row("profile.decode", f"decode step by kernel family ({name}, batch 1)", "ms/step")],
                  parse_result(_profile_row("profile.decode"))))

  devices = int(device.get("device_count", 1))
  seq = 128 if s else 8192
  jobs.append(Job("transformers", me + smoke + ["--probe", "transformers", "--seq", str(seq), "--batch", "2"],
                  t(45), [row("transformers.text", f"transformers' train step, text ({size}): ours / theirs "
                                  "tokens/s per device", "x", "-")],
                  parse_result(functools.partial(_transformers_row, devices=devices)),
                  env={"JAX_PLATFORMS": "cpu"}))  # JAX stays off the GPU: torch gets it whole

  # Codes/s is a difference of two timings: enough codes and rounds that a shared CPU's noise cannot flip its sign.
  talker = ["--size", "tiny", "--batch", "1", "--prompt", "16", "--reply", "4", "--new", "96", "--iters", "3"] if s \
      else ["--size", "7b", "--dtype", "bfloat16", "--batch", "1", "--new", "96", "--iters", "2"]
  which = "tiny float32" if s else "released size (7B), bf16"
  jobs.append(Job("talker", bench("bench_talker.py") + talker + ["--no-reference"], t(90),
                  [row("talker.b1", f"Talker decode, {which}, batch 1 (the Talker alone)", "codes/s", ">= 200",
                       (">=", 200)),
                   row("talker.engine.b1", f"Talker decode, {which}, batch 1, in the conversation engine", "codes/s",
                       ">= 200", (">=", 200))], parse_talker))

  jobs.append(Job("token2wav", me + smoke + ["--probe", "token2wav", "--seconds", "1" if s else "10"], t(90),
                  [row("token2wav.compile", f"Token2Wav compile ({'tiny' if s else 'released size, bf16'}, euler x 10)",
                       "s", "< 60", ("<=", 60)),
                   row("token2wav.rtf", f"Token2Wav RTF ({'tiny' if s else 'released size, bf16'}, euler x 10)", "x")],
                  parse_result(_token2wav_rows)))

  stream = ["--size", "tiny", "--seconds", "1", "--reply", "4", "--codes", "16", "--iters", "1"] if s else \
      ["--size", "7b", "--dtype", "bfloat16", "--seconds", "4", "--reply", "16", "--codes", "96", "--iters", "2"]
  label = "tiny" if s else "7B-shaped, bf16"
  jobs.append(Job("stream", bench("bench_stream.py") + stream + ["--no-reference"], t(120),
                  [row("stream.first_text", f"OmniSession first text ({label})", "ms"),
                   row("stream.first_audio", f"OmniSession first audio ({label})", "ms")], parse_stream))

  # A served conversation's cache is sized for the longest it may grow (the server's prompt + reply budget, a
  # session's max_len): its decode steps read the slots in use only (the engine's cache windows).
  session_len = 1024 if s else 4096
  session = decode[:decode.index("--batch")] + ["--batch", str(big)] + decode[decode.index("--prompt"):]
  jobs.append(Job("decode_session", bench("bench_generate.py") + session + ["--no-reference", "--cache_len",
                                                                           str(session_len)], t(60),
                  [row("decode.session", f"Thinker decode, {name}, batch {big}, {session_len:,} cache slots per "
                       "conversation / a cache of the prompt and reply", "x", ">= 0.9", (">=", 0.9))],
                  parse_decode_session))

  # Scanned layers under remat "dots_and_attention": the matmuls' outputs and the attention kernels' residuals
  # kept, the elementwise work recomputed in the backward pass (fewer per-layer stacks; XLA:GPU's compile: text
  # 155.6 -> 143.8 GiB of other bytes, multimodal 279.5 -> 265.2, 4-9 GiB fewer temporaries).
  jobs.append(Job("mfu_saved_dots", bench("bench_mfu.py") + smoke + ["--attention", "auto", "--no-reference",
                                                                     "--remat", "dots_and_attention"], t(150),
                  [row(f"mfu.{kind}_saved_dots", f"train step MFU, {what} ({size}, attention auto), remat "
                       "dots_and_attention", "%", target, (">=", goal))
                   for kind, what, target, goal in (("text", "text", ">= 50", 50),
                                                    ("multimodal", "images + audio", ">= 45", 45))],
                  lambda stdout, job: {f"{key}_saved_dots": r for key, r in parse_mfu(stdout, job).items()}))
  # The text step with the layers unrolled: XLA:GPU's own compile drops a third of the step's elementwise bytes
  # and half its kernels (the scan's stacked residuals: copies in and out, zero fills); this measures it.
  jobs.append(Job("mfu_unrolled", bench("bench_mfu.py") + smoke + ["--attention", "auto", "--no-reference",
                                                                   "--kinds", "text", "--unrolled"], t(90),
                  [row("mfu.text_unrolled", f"train step MFU, text ({size}, attention auto), layers unrolled", "%",
                       ">= 50", (">=", 50))],
                  lambda stdout, job: {"mfu.text_unrolled": r} if (r := parse_mfu(stdout, job).get("mfu.text"))
                  else {}))
  # The same for the whole Thinker: the encoders' 64 scanned layers are most of the multimodal step's kernels
  # (dynamic slices in and out of their residual stacks), which unrolled layers do not run.
  jobs.append(Job("mfu_unrolled_multimodal", bench("bench_mfu.py") + smoke + [
      "--attention", "auto", "--no-reference", "--kinds", "multimodal", "--unrolled"], t(150),
                  [row("mfu.multimodal_unrolled", f"train step MFU, multimodal ({size}, attention auto), layers "
                       "unrolled", "%", ">= 45", (">=", 45))],
                  lambda stdout, job: {"mfu.multimodal_unrolled": r}
                  if (r := parse_mfu(stdout, job).get("mfu.multimodal")) else {}))
  return jobs


def _tail(text: str, lines: int = 8) -> str:
  return "\n".join(text.strip().splitlines()[-lines:])


_RUNNING = []  # the job process now running: a SIGTERM / Ctrl-C of the suite ends it too


def _kill(proc):
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:  # it ended meanwhile
    pass


def _stop(signum, frame):  # noqa: ARG001
  for proc in _RUNNING:
    _kill(proc)
  raise SystemExit(128 + signum)


def run_job(job: Job, timeout: float, env: dict) -> tuple:
  """(returncode or None on timeout, stdout, stderr, seconds): the job's process in a session of its own, so that
  a timeout kills it with its children."""
  t = time.perf_counter()
  proc = subprocess.Popen(job.cmd, cwd=ROOT, env=dict(env, **{k: str(v) for k, v in job.env.items()
                                                               if not k.startswith("_")}),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
  _RUNNING.append(proc)
  try:
    out, err = proc.communicate(timeout=timeout)
    code = proc.returncode
  except subprocess.TimeoutExpired:
    _kill(proc)
    out, err = proc.communicate()
    code = None
  finally:
    _RUNNING.remove(proc)
  return code, out or "", err or "", time.perf_counter() - t


def finish_rows(job: Job, parsed: dict, code, stderr: str, seconds: float, smoke: bool) -> list:
  rows = []
  for planned in job.rows:
    r = {k: v for k, v in planned.items() if k not in ("goal", "batch")}
    r.update(job=job.name, seconds=round(seconds, 1))
    got = parsed.get(planned["key"])
    if job.skip:
      r.update(status="skipped", figure=None, note=job.skip)
    elif got is None:
      r.update(status="timeout" if code is None else "failed", figure=None,
               note=(f"timed out after {seconds:.0f} s" if code is None else f"exit code {code}" if code else
                     "no figure in its output"),
               stderr_tail=_tail(stderr))
    else:
      r.update({k: v for k, v in got.items() if not k.startswith("_")})
      r.setdefault("status", "ok")
      r.setdefault("figure", None)
      if r["status"] == "ok" and not (isinstance(r.get("figure"), (int, float)) and math.isfinite(r["figure"])
                                      and r["figure"] > 0):
        r.update(status="failed", note=f"figure {r.get('figure')} is not positive (timing noise?); " + r["note"])
      goal = got.get("_goal", planned.get("goal"))
      if r["status"] == "ok" and goal and not smoke:  # targets are for the accelerator sizes
        r["meets_target"] = r["figure"] >= goal[1] if goal[0] == ">=" else r["figure"] <= goal[1]
    rows.append(r)
  return rows


def link_ratio(rows: list):
  """transformers' row (its figure so far: theirs tokens/s) becomes ours (the mfu text row's tokens/s per device) /
  theirs."""
  by = {r["key"]: r for r in rows}
  ours, theirs = by.get("mfu.text"), by.get("transformers.text")
  if not theirs or theirs["status"] != "ok":
    return
  if not ours or ours["status"] != "ok":
    theirs.update(status="failed", note="no text MFU row to compare with; " + theirs["note"])
    return
  per_device = ours["tokens_per_s"] / theirs.pop("devices", 1)
  theirs.update(figure=per_device / theirs["theirs_tokens_per_s"], status="ok")
  theirs["note"] = f"ours {per_device:,.0f} tokens/s per device; " + theirs["note"]


def _figure(r: dict) -> str:
  x = r.get("figure")
  if r["status"] != "ok" or x is None:
    return r["status"]
  return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}" if abs(x) >= 0.01 else f"{x:.2e}"


def markdown(report: dict) -> str:
  head = (f"Device: {report['device']} x{report.get('device_count', '?')} ({report.get('platform', '?')}), "
          f"jax {report.get('jax', '?')}, {report['date']}, commit {report['commit']}"
          f"{', smoke (tiny sizes)' if report['smoke'] else ''}; {report['wall_s']:.0f} s in all.\n\n")
  lines = ["| what | figure | unit | target | note |", "| --- | --- | --- | --- | --- |"]
  for r in report["rows"]:
    note = r.get("note", "")
    if "meets_target" in r:
      note = ("meets the target; " if r["meets_target"] else "below the target; ") + note
    if r.get("stderr_tail"):
      note += ": " + r["stderr_tail"].splitlines()[-1][:200]
    note = note.replace("|", "/").replace("\n", " ")
    lines.append(f"| {r['what']} | {_figure(r)} | {r['unit']} | {r['target']} | {note} |")
  return head + "\n".join(lines) + "\n"


def git_commit() -> str:
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True, timeout=10).stdout.strip()
    return commit + (" (with local changes)" if dirty else "") if commit else "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def suite(args):
  start = time.perf_counter()
  signal.signal(signal.SIGTERM, _stop)  # `timeout` ends the suite: its job goes too (the rows so far are saved)
  signal.signal(signal.SIGINT, _stop)
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  # One job holds the accelerator at a time, so it may take more than JAX's default 75% of it: the multimodal
  # train step asks for ~53 GiB, close to an 80 GB card's 75% once the libraries' workspaces are out.
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  own_cache = "JAX_COMPILATION_CACHE_DIR" not in env
  if own_cache:  # shared by the jobs: the profile processes load what the mfu and decode processes compiled
    env["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="suite_xla_cache_")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the smoke run's programs compile in under 1 s
  own_traces = args.trace_dir is None
  args.trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="suite_traces_")
  base = os.path.splitext(args.out)[0]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  try:
    with open(base + "_logs.txt", "w") as logs:
      report = run_jobs(args, env, start, base, logs)
  finally:
    if own_cache:
      shutil.rmtree(env["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    if own_traces:
      shutil.rmtree(args.trace_dir, ignore_errors=True)
  print()
  print(markdown(report))
  print(f"wrote {args.out} and {base}.md ({report['wall_s']:.0f} s)")


def run_jobs(args, env: dict, start: float, base: str, logs) -> dict:
  """The device probe, then every planned job; the JSON and the table are rewritten after each."""
  code, out, err, _ = run_job(Job("device", [sys.executable, os.path.abspath(__file__), "--probe", "device"], 30,
                                  [], None), 30, env)
  device = _result(out) or {}
  logs.write(f"== device (exit {code})\n{out}\n{_tail(err, 20)}\n")
  if args.smoke and device.get("platform") == "cpu" and "optimization_level" not in env.get("XLA_FLAGS", ""):
    # Tiny programs: compiling is most of the smoke run's time (Token2Wav's eager init compiles ~250 of them)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  report = dict(device=device.get("device_kind", "unknown"), platform=device.get("platform"),
                device_count=device.get("device_count"), jax=device.get("jax"), jaxlib=device.get("jaxlib"),
                python=device.get("python"), date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"), commit=git_commit(), smoke=args.smoke, budget_s=args.budget, rows=[])
  only = set(args.only.split(",")) if args.only else None

  def save():
    report["wall_s"] = round(time.perf_counter() - start, 1)
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
    with open(base + ".md", "w") as f:
      f.write(markdown(report))

  for job in plan(args, device):
    if only and not any(job.name == o or job.name.startswith(o + "_") for o in only):
      continue
    timeout = min(job.timeout, args.budget - (time.perf_counter() - start))
    if not job.skip and timeout < 15:
      job.skip = f"time budget spent ({args.budget:.0f} s)"
    if job.skip:
      code, out, err, seconds = 0, "", "", 0.0
    else:
      print(f"[suite] {job.name}: {' '.join(job.cmd[1:])} (timeout {timeout:.0f} s)", flush=True)
      code, out, err, seconds = run_job(job, timeout, env)
    try:
      parsed = job.parse(out, job)
    except Exception as e:  # noqa: BLE001 - an unexpected print format fails the job's rows, not the suite
      parsed, err = {}, err + f"\nparsing its output failed: {type(e).__name__}: {e}"
    rows = finish_rows(job, parsed, code, err, seconds, args.smoke)
    report["rows"].extend(rows)
    if job.name == "transformers":
      link_ratio(report["rows"])
    logs.write(f"== {job.name}: {' '.join(job.cmd)}\nexit {code}, {seconds:.1f} s\n{_tail(out, 40)}\n"
               f"-- stderr\n{_tail(err, 40)}\n")
    logs.flush()
    for r in rows:
      print(f"[suite]   {r['key']}: {r['status']} {_figure(r)} {r['unit']}  {r.get('note', '')[:160]}", flush=True)
    save()
  save()
  return report


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, the same processes and parsing (CI)")
  p.add_argument("--out", default="accelerator_suite.json", help="the JSON; the markdown table goes beside it (.md)")
  p.add_argument("--budget", type=float, default=None, help="seconds for all jobs (default 460; smoke 400)")
  p.add_argument("--only", default=None, help="comma-separated job names (mfu, attention, decode, profile, ...)")
  p.add_argument("--trace_dir", default=None, help="keep the profile traces here (default: a temporary folder)")
  p.add_argument("--probe", choices=["device", "transformers", "token2wav"], help="a helper entry (see above)")
  p.add_argument("--profile", choices=["train", "decode"], help="a helper entry (see above)")
  p.add_argument("--seq", type=int, default=8192, help="--probe transformers: sequence length")
  p.add_argument("--batch", type=int, default=2, help="--probe transformers: rows")
  p.add_argument("--seconds", type=float, default=10.0, help="--probe token2wav: seconds of speech")
  args = p.parse_args()
  if args.probe == "device":
    probe_device()
  elif args.probe == "transformers":
    probe_transformers(args.smoke, args.seq, args.batch, 3 if args.smoke else 5)
  elif args.probe == "token2wav":
    probe_token2wav(args.smoke, args.seconds, 2 if args.smoke else 3)
  elif args.profile == "train":
    profile_train(args.smoke, args.trace_dir, 2 if args.smoke else 3)
  elif args.profile == "decode":
    profile_decode(args.smoke, args.trace_dir, 64 if args.smoke else 48)  # the decode job's --new: its programs
  else:
    args.budget = args.budget or (400.0 if args.smoke else 460.0)
    suite(args)


if __name__ == "__main__":
  main()

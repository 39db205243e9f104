"""bench/accelerator_suite.py: its CPU smoke run (every job a process, parsed into rows, a table and JSON), the
kernel-family summary of profile traces, and the parsers on outputs of the accelerator sizes."""

import gzip
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(ROOT, "bench"))

import accelerator_suite as suite  # noqa: E402  (standard library only at import: no JAX in the parent)
import xla_env  # noqa: E402

# The rows of a CPU smoke run: measured ones, and the GPU-only ones it may skip (with a reason).
MEASURED = ["mfu.text", "mfu.multimodal", "decode.batch1", "decode.stacked", "decode.batched", "profile.train",
            "profile.decode", "talker.b1", "talker.engine.b1", "token2wav.compile", "token2wav.rtf", "stream.first_text",
            "stream.first_audio", "attention.error.flash_gpu", "decode.session", "mfu.text_unrolled",
            "mfu.multimodal_unrolled", "mfu.text_saved_dots", "mfu.multimodal_saved_dots"]
MEASURED += [f"attention.{n}.{impl}" for n in (256, 1024)
             for impl in ["blocked", "flash_gpu"] + suite.FLASH_TILING_IMPLS]
MEASURED += [f"decode_cache.b{b}.{n}" for b in (1, 2) for n in (128, 1024)]
GPU_ONLY = ["transformers.text", "attention.fused"]
HEADER = "| what | figure | unit | target | note |"


@pytest.mark.slow
def test_smoke_run(tmp_path):
  env = xla_env.env(1, own_opt_level=True, JAX_PLATFORMS="cpu")  # the smoke run compiles at -O0 itself
  out = tmp_path / "suite.json"
  p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "accelerator_suite.py"), "--smoke", "--out",
                      str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["device"] == "cpu" and report["platform"] == "cpu" and report["smoke"] is True
  assert report["jax"] and report["date"] and report["commit"]
  rows = {r["key"]: r for r in report["rows"]}
  assert sorted(rows) == sorted(MEASURED + GPU_ONLY), sorted(rows)
  for key in MEASURED:
    r = rows[key]
    assert r["status"] == "ok" and r["figure"] > 0, {k: r.get(k) for k in ("key", "status", "figure", "note",
                                                                          "stderr_tail")}
  for key in GPU_ONLY:  # skipped here (torch has no CUDA, no fused kernel on a CPU), measured where they can be
    r = rows[key]
    assert (r["status"] == "skipped" and r["note"]) or (r["status"] == "ok" and r["figure"] > 0), r
  for key in ("profile.train", "profile.decode"):
    families = rows[key]["families"]
    assert sorted(families) == ["attention", "gemm", "other"]
    assert all(v >= 0 for v in families.values()) and sum(families.values()) > 0, families
    assert rows[key]["figure"] == pytest.approx(sum(families.values()))
    assert all(ms > 0 for ms in rows[key]["top_other"].values()), rows[key]["top_other"]
    assert sorted(rows[key]["launches"]) == ["attention", "gemm", "other"] and rows[key]["launches"]["other"] > 0
  assert len(rows["profile.train"]["top_other"]) == suite.TOP_OTHER  # the slowest "other" kernels, by name
  assert rows["profile.decode"]["top_other"]  # the decode loop's own: more of them in the longer reply
  assert "meets_target" not in rows["mfu.text"]  # targets are judged at the accelerator sizes only
  # bench_mfu's multimodal step carries images and audio, and the encoders' FLOPs are counted
  text, multimodal = rows["mfu.text"], rows["mfu.multimodal"]
  assert {"pixel_values", "audio_features"} <= set(multimodal["batch_fields"]) and text["batch_fields"] == ["text"]
  assert multimodal["gflop_per_step"] > text["gflop_per_step"] > 0
  md = out.with_suffix(".md").read_text()
  assert HEADER in md and HEADER in p.stdout
  for r in report["rows"]:
    assert f"| {r['what']} |" in md
  assert (tmp_path / "suite_logs.txt").exists()


def _trace(directory, events, name="host.trace.json.gz"):
  folder = directory / "plugins" / "profile" / "2026_01_01_00_00_00"
  folder.mkdir(parents=True)
  with gzip.open(folder / name, "wt") as f:
    json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)
  return str(directory)


def _meta(pid, process, threads):
  out = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": process}}]
  out += [{"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": n}} for tid, n in threads.items()]
  return out


def _x(pid, tid, name, ts, dur, **args):
  return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur, "args": args}


def test_kernel_families_gpu_trace(tmp_path):
  """The GPU streams' kernels only (not the derived "XLA Ops" line, not the host), per step, by name."""
  events = _meta(1, "/device:GPU:0", {10: "Stream #14(Compute)", 11: "XLA Ops"}) + _meta(2, "/host:CPU", {20: "py"})
  events += [_x(1, 10, "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", 0, 3000),
             _x(1, 10, "mha_forward", 3000, 1000), _x(1, 10, "mha_backward", 4000, 2000),
             _x(1, 10, "loop_add_fusion", 6000, 500), _x(1, 10, "cutlass_80_wmma_tensorop_bf16_s161616gemm", 6500, 500),
             _x(1, 10, "cudnn_generated_fort_native_sdpa_sm90_knob_7", 7000, 1000),
             _x(1, 10, "loop_convert_fusion_3", 8000, 300), _x(1, 10, "loop_add_fusion", 8300, 100),
             _x(1, 11, "fusion.1", 0, 10000), _x(2, 20, "dot.1", 0, 9999, hlo_op="dot.1")]
  got = suite.kernel_families(_trace(tmp_path, events), steps=2)
  assert got["source"] == "device" and got["events"] == 8
  assert got["gemm"] == pytest.approx(1.75) and got["attention"] == pytest.approx(2.0)
  assert got["other"] == pytest.approx(0.45)
  assert got["launches"] == pytest.approx({"gemm": 1.0, "attention": 1.5, "other": 1.5})  # kernels per step
  # where the elementwise time goes: each "other" kernel's ms per step, slowest first
  assert list(got["top_other"]) == ["loop_add_fusion", "loop_convert_fusion_3"]
  assert got["top_other"]["loop_add_fusion"] == pytest.approx(0.3)


def test_kernel_families_tpu_trace(tmp_path):
  """TPU: the "XLA Ops" line (its modules line holds the same time); matmuls are convolutions there."""
  events = _meta(3, "/device:TPU:0", {1: "XLA Modules", 2: "XLA Ops", 3: "Steps"})
  events += [_x(3, 1, "jit_train_step(123)", 0, 5000), _x(3, 3, "0", 0, 5000),
             _x(3, 2, "convolution.1", 0, 2000), _x(3, 2, "splash_mha_fwd_residuals", 2000, 1000),
             _x(3, 2, "fusion.7", 3000, 500)]
  got = suite.kernel_families(_trace(tmp_path, events, "perfetto_trace.json.gz"))
  assert (got["gemm"], got["attention"], got["other"]) == pytest.approx((2.0, 1.0, 0.5))


def test_kernel_families_cpu_trace(tmp_path):
  """No device: the host's XLA ops, innermost only (a while loop's thunk holds its body's ops); Python frames out."""
  events = _meta(7, "/host:CPU", {1: "tf_XLAPjRtCpuClient", 2: "python"})
  events += [_x(7, 1, "while.3", 0, 1000, hlo_op="while.3"), _x(7, 1, "dot.3", 10, 300, hlo_op="dot.3"),
             _x(7, 1, "fusion.2", 400, 200, hlo_op="fusion.2"), _x(7, 1, "fusion.9", 2000, 100, hlo_op="fusion.9"),
             _x(7, 2, "$profiler.py:307 trace", 0, 5000)]
  got = suite.kernel_families(_trace(tmp_path, events))
  assert got["source"] == "host XLA ops" and got["events"] == 3
  assert (got["gemm"], got["attention"], got["other"]) == pytest.approx((0.3, 0.0, 0.3))


def test_parsers_on_accelerator_output():
  """The benches' lines at the accelerator sizes: the decode row's HBM bound, a failed attention kernel, MFU."""
  jobs = {j.name: j for j in suite.plan(suite.argparse.Namespace(smoke=False, trace_dir="/tmp/t"),
                                        dict(device_kind="NVIDIA H200", platform="gpu", device_count=1))}
  decode = suite.parse_decode("size 7b (7615.6 M params), bfloat16, devices gpu x1, prompt 128, new 48\n"
                              "batch 1: ours TTFT 16.1 ms, decode 90.8 tok/s\nbatch 32: ours TTFT 99.3 ms, decode "
                              "2554.0 tok/s\n", jobs["decode"])
  assert decode["decode.batch1"]["figure"] == 90.8 and decode["decode.batched"]["figure"] == 2554.0
  assert decode["decode.batch1"]["bound_tokens_per_s"] == pytest.approx(4.8e12 / (7615.6e6 * 2))
  assert "29% of the HBM bound" in decode["decode.batch1"]["note"]
  # Decode is bandwidth-bound: the targets (190 / 6,000 tokens/s on an H200) scale with a chip's bandwidth.
  h100 = {j.name: j for j in suite.plan(suite.argparse.Namespace(smoke=False, trace_dir="/tmp/t"),
                                        dict(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", device_count=1))}
  for job, rates, bars in ((jobs["decode"], (190, 6000), (190, 6000)), (h100["decode"], (140, 4000), (133, 4188))):
    got = suite.parse_decode(f"size 7b (7615.6 M params), bfloat16\nbatch 1: ours TTFT 16 ms, decode {rates[0]} tok/s"
                             f"\nbatch 32: ours TTFT 99 ms, decode {rates[1]} tok/s\n", job)
    rows = {r["key"]: r for r in suite.finish_rows(job, got, 0, "", 30.0, smoke=False)}
    assert rows["decode.batch1"]["target"] == f">= {bars[0]} (190 at 4.8 TB/s)"
    assert rows["decode.batched"]["target"] == f">= {bars[1]} (6000 at 4.8 TB/s)"
    assert rows["decode.batch1"]["meets_target"] and rows["decode.batched"]["meets_target"] is (job is jobs["decode"])
  slow = suite.parse_decode("size 7b (7615.6 M params), bfloat16\nbatch 1: ours TTFT 16 ms, decode 180 tok/s\n",
                            jobs["decode"])
  assert not suite.finish_rows(jobs["decode"], slow, 0, "", 30.0, smoke=False)[0]["meets_target"]
  stacked = suite.parse_decode("size 7b (7615.6 M params), bfloat16\nbatch 1: ours TTFT 16 ms, decode 80 tok/s\n",
                               jobs["decode_stacked"])
  stacked = suite.finish_rows(jobs["decode_stacked"], stacked, 0, "", 30.0, smoke=False)[0]
  assert stacked["target"] == "-" and "meets_target" not in stacked and "25% of the HBM bound" in stacked["note"]
  stack = suite.parse_decode_cache(
      "NVIDIA H200: 7b-shaped stack (28 layers, 28/4 heads x 128), bfloat16, weights 12800 MiB, one token per row "
      "per step\n| rows | cache slots | cache MiB | ms/step | bytes accessed MiB |\n| --- | --- | --- | --- | --- |\n"
      "| 1 | 256 | 14 | 3.10 | 0 |\n| 32 | 8192 | 14336 | 9.00 | 0 |\n", jobs["decode_cache"])
  assert stack["decode_cache.b1.256"]["figure"] == 3.1 and stack["decode_cache.b32.8192"]["figure"] == 9.0
  assert "= 90% of the HBM bandwidth" in stack["decode_cache.b1.256"]["note"]  # (12800 + 14) MiB in 3.1 ms
  table = ("device NVIDIA H200; heads 28/4 x 128, bfloat16, packed samples of <= 2048 tokens\n"
           "| tokens | impl | temp memory (MiB) | memory vs dense | fwd+bwd ms | time vs dense |\n"
           "| --- | --- | --- | --- | --- | --- |\n"
           "| 8192 | dense | >= 30720 (estimate; not compiled) | 1 | not run | 1 |\n"
           "| 8192 | blocked | 300.0 | 102.4x less | 11.2 | - |\n"
           "| 8192 | pallas_gpu | 100.0 | 307.2x less | 6.7 | - |\n"
           "| 8192 | cudnn | - | - | failed (XlaRuntimeError: RESOURCE_EXHAUSTED) | - |\n"
           "| 8192 | flash_gpu:wide | 100.0 | 307.2x less | 1.6 | - |\n"
           "\nerrors against float32 dense at 4096 tokens (bfloat16; relative L2 over real tokens)\n"
           "| check tokens | impl | out | dq | dk | dv |\n| --- | --- | --- | --- | --- | --- |\n"
           "| 4096 | pallas_gpu | 4.60e-03 | 2.60e-03 | 6.60e-03 | 3.10e-03 |\n"
           "| 4096 | flash_gpu | failed (ValueError: x) | - | - | - |\n")
  att = suite.parse_attention(table, jobs["attention"])
  assert att["attention.8192.flash_gpu:wide"]["figure"] == 1.6  # a tiling's row, not overwritten by the errors
  error = att["attention.error.pallas_gpu"]
  assert error["figure"] == 6.6e-3 and "dk 6.6e-03" in error["note"]
  assert att["attention.error.flash_gpu"]["status"] == "failed"
  assert att["attention.8192.pallas_gpu"]["figure"] == 6.7 and att["attention.8192.blocked"]["figure"] == 11.2
  cudnn = att["attention.8192.cudnn"]
  assert cudnn["status"] == "failed" and "RESOURCE_EXHAUSTED" in cudnn["note"]
  rows = suite.finish_rows(jobs["attention"], att, None, "killed", 75.0, smoke=False)
  by = {r["key"]: r for r in rows}
  assert by["attention.8192.pallas_gpu"]["meets_target"] is False  # 6.7 ms against <= 1.7 ms
  assert by["attention.32768.blocked"]["status"] == "timeout"  # the process died before printing 32K
  mfu = suite.parse_mfu("device NVIDIA H200 x1, peak 989 TFLOP/s per device (table); seq 8192, batch 2, remat none, "
                        "attention auto\ntext: 1.187B params, 2x8192 (text), 103,600.00 GFLOP/step, 297.7 ms/step, "
                        "50,748 tokens/s, MFU 35.2%, loss 12.000\n", jobs["mfu"])
  assert mfu["mfu.text"]["figure"] == 35.2 and mfu["mfu.text"]["tokens_per_s"] == 50748
  assert mfu["mfu.text"]["gflop_per_step"] == 103600 and mfu["mfu.text"]["batch_fields"] == ["text"]
  # The spoken question goes to the released shape (random weights, no transformers) in bf16.
  assert jobs["stream"].cmd[-1] == "--no-reference" and "7b" in jobs["stream"].cmd and "bfloat16" in jobs["stream"].cmd
  stream = suite.parse_stream("size 7b (10060 M params), 4 s question, 16 tokens, 96 codes (1.92 s of speech), GPU: "
                              "ours first text 80 ms, first code 95 ms, first audio 210 ms, RTF 0.12\n", jobs["stream"])
  assert stream["stream.first_text"]["figure"] == 80 and stream["stream.first_audio"]["figure"] == 210
  assert stream["stream.first_audio"]["note"] == "7b, 10060 M params; first code 95 ms, RTF 0.12"


def test_bench_generate_compiles_the_decode_program_ahead_of_time():
  """bench_generate.py --aot: the engine's generate program compiled for a topology (here cpu:1) without
  weights; one step's bytes (a 2-step program's minus a 1-step one's) read the layers' weights at least."""
  import re  # noqa: PLC0415

  env = xla_env.env(1, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_generate.py"), "--size", "tiny",
                      "--no-reference", "--batch", "4", "--prompt", "16", "--new", "32", "--cache_len", "1024",
                      "--aot", "cpu:1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  weights = float(re.search(r"weights ([\d,.]+) MiB", p.stdout).group(1).replace(",", ""))
  m = re.search(r"^batch 4, 1024 cache slots, window 256: per step gemm ([\d.,]+), attention ([\d.,]+), other "
                r"([\d.,]+) = ([\d.,]+) \(weights \+ window ([\d.,]+)\)", p.stdout, re.M)
  assert m, p.stdout
  gemm, attention, other, total, bound = (float(x.replace(",", "")) for x in m.groups())
  assert total == pytest.approx(gemm + attention + other, abs=0.2) and bound > weights > 0
  assert total > 0.5 * weights, p.stdout  # every layer's weights and the LM head (the embedding is gathered)


def test_bench_mfu_compiles_ahead_of_time_and_reports_bytes_by_kernel_family():
  """bench_mfu.py --aot: the steps it would time, compiled for a topology without running (here cpu:1); the text
  step trains the language model alone, the multimodal one the whole Thinker."""
  env = xla_env.env(1, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_mfu.py"), "--smoke", "--aot", "cpu:1",
                      "--kinds", "text"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  sections = dict(s.split("\n", 1) for s in p.stdout.split("## ")[1:])
  assert sorted(sections) == ["text"] and "pixel_values" not in sections["text"]
  family = next(line for line in sections["text"].splitlines() if line.startswith("bytes accessed by kernel family"))
  gib = {name: float(v) for name, v in (part.split()[:2] for part in family.split(": ", 1)[1].split(", "))}
  assert sorted(gib) == ["attention", "gemm", "other"] and gib["gemm"] > 0 and gib["other"] > 0, family
  bad = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_mfu.py"), "--aot", "v9z:1x1"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and "--aot: --topology 'v9z:1x1': unknown TPU generation" in bad.stderr, bad.stderr
  import bench_mfu
  text, media = (bench_mfu.make_config(True, 128, 2, "none", media=m) for m in (False, True))
  assert "vision" not in text.model.thinker and "audio" not in text.model.thinker
  assert "vision" in media.model.thinker and "audio" in media.model.thinker

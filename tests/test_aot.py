"""Ahead-of-time compilation of the real train step for TPU topologies (omni_jax.aot) on this CPU host."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import train_testlib as tl
from configs import tiny
from configs.recipes import dpo as dpo_recipe
from configs.recipes import lora as lora_recipe
from omni_jax import aot
from omni_jax import config as config_lib
from omni_jax import xla_options
from omni_jax.aot import compile as compile_lib
from omni_jax.aot import hardware, hlo, report
from omni_jax.layers import lora
from omni_jax.models.talker import talker_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]'); "
                                  "TPU topologies cannot be described without it")
# The tiny config's per-chip figures on TPU and on CPU: arguments (the sharded train state and batch) are the
# same buffers, so they agree within 10%; the total (plus temporaries, which each backend's fusion and
# scheduling decide) within a factor of 2.
ARGUMENT_TOLERANCE, TOTAL_FACTOR = 0.10, 2.0
# A Thinker MLP of 8M units: ~35 GiB of state per chip, more than a v5e chip's 16 GiB.
TOO_LARGE = ["--config.model.thinker.text.intermediate_size=8000000"]


def _aot(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "omni_jax.aot", "--config", os.path.join(ROOT, "configs", "tiny.py"), *args]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tpu_report():
  """The command's report on the tiny config for v5e:2x2 (one TPU compile, ~30 s, shared by the tests below)."""
  if not HAVE_LIBTPU:
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]')")
  out = _aot("--topology", "v5e:2x2", "--json")
  assert out.returncode == 0, out.stderr[-3000:]
  return report.Report(**json.loads(out.stdout))


@needs_libtpu
def test_command_compiles_tiny_for_v5e_and_prints_memory_and_cost(tpu_report):
  text = report.format_text(tpu_report)  # what the command prints without --json
  assert "topology v5e:2x2: 4 chips" in text
  for line in ("memory per chip: arguments", "cost per chip:", "collectives per chip per step: all-reduce",
               "roofline: compute", "estimated MFU"):
    assert line in text, text


@needs_libtpu
def test_report_figures(tpu_report):
  r = tpu_report
  assert r.fits and r.chips == 4 and r.mesh["data"] == 4
  m = r.memory
  assert m["capacity"] == hardware.CHIPS["v5e"].hbm_bytes
  assert 0 < m["total"] < m["capacity"] and m["alias"] > 0  # the donated state aliases the new one
  # Loop-aware compiled FLOPs cover the documented formula (plus what it leaves out: norms, softmax, ...).
  assert 0.9 * r.model_flops / r.chips <= r.cost["flops"] <= 2.0 * r.model_flops / r.chips
  # Data parallel over 4 chips: the gradients are all-reduced, about the size of the float32 parameters.
  params = sum(b for name, b in r.largest_arguments if name.startswith("params."))
  assert r.collectives["all-reduce"]["bytes"] >= params
  assert 0 < r.roofline["mfu"] < 1 and r.roofline["step_s"] >= r.roofline["compute_s"]
  # "auto" compiles splash for the TPU: its FLOPs, invisible to the HLO count, are estimated and timed.
  config = tiny.get_config()
  decoders = [(config_lib.thinker_text(config), r.batch["input_ids"])]
  if "talker_segment_ids" in r.batch:
    decoders.append((talker_config(config).text, r.batch["talker_segment_ids"]))
  causal = sum(rows * seq ** 2 * t.num_hidden_layers * 2 * t.num_attention_heads * t.head_dim
               for t, (rows, seq) in decoders)
  assert r.cost["kernel_flops"] * r.chips == pytest.approx(3.5 * causal)  # remat none: forward + 2.5x backward
  peak = hardware.CHIPS["v5e"].peak_flops
  assert r.roofline["compute_s"] == pytest.approx((r.cost["flops"] + r.cost["kernel_flops"]) / peak)
  json.dumps(r.to_json())


@needs_libtpu
def test_tpu_memory_agrees_with_the_cpu_compile(tpu_report):
  cpu = aot.analyse(tiny.get_config(), "cpu:4")  # conftest: 8 host CPU devices
  t, c = tpu_report.memory, cpu.memory
  assert abs(t["argument"] - c["argument"]) <= ARGUMENT_TOLERANCE * c["argument"], (t, c)
  assert c["total"] / TOTAL_FACTOR <= t["total"] <= c["total"] * TOTAL_FACTOR, (t, c)
  assert cpu.memory["capacity"] is None and cpu.roofline == {}


@needs_libtpu
def test_too_large_is_reported_as_not_fitting():
  out = _aot("--topology", "v5e:1x1", *TOO_LARGE)
  assert out.returncode == 3, out.stdout + out.stderr[-3000:]
  assert "DOES NOT FIT" in out.stdout
  # It names the biggest buffers: first the MLP's, over a sixteenth of the chip. (--json: the other tests.)
  biggest = re.search(r"biggest: (\S+) ([0-9.]+) GiB", out.stdout)
  assert biggest and "mlp" in biggest.group(1), out.stdout
  assert float(biggest.group(2)) * 2 ** 30 > hardware.CHIPS["v5e"].hbm_bytes / 16, out.stdout


@pytest.mark.parametrize("policy, impl, platform, passes", [
    ("none", "auto", "gpu", 3.5), ("full", "auto", "gpu", 4.5), ("dots_and_attention", "auto", "gpu", 3.5),
    ("dots_and_attention", "auto", "tpu", 4.5), ("dots_and_attention", "blocked", "tpu", 3.5),
    ("dots", "flash_gpu", "gpu", 4.5)])
def test_attention_kernel_passes_follow_what_the_policy_recomputes(policy, impl, platform, passes):
  """The roofline's estimate of the attention kernels' FLOPs: forward, backward (2.5x), and the forward again
  where remat recomputes it; "dots_and_attention" keeps the residuals of flash_gpu and blocked (GPUs' "auto"),
  not those of splash (TPUs')."""
  from types import SimpleNamespace  # noqa: PLC0415

  from omni_jax import sizes  # noqa: PLC0415

  c = tiny.get_config()
  del c.model.talker
  c.model.remat_policy, c.model.attention_impl = policy, impl
  compiled = SimpleNamespace(setup=SimpleNamespace(config=c), batch_shapes={"input_ids": jnp.zeros((2, 64))},
                             mesh=SimpleNamespace(devices=np.array([SimpleNamespace(platform=platform)])))
  t = config_lib.thinker_text(c)
  forward = sizes.causal_attention_flops(2, 64, t.num_hidden_layers, t.num_attention_heads, t.head_dim)
  assert report.attention_kernel_flops(compiled, "custom-call __gpu$xla.gpu.triton") == pytest.approx(
      passes * forward)


def test_cpu_compile_reports_memory_without_libtpu():
  r = aot.analyse(tiny.get_config(), "cpu:2")
  assert r.fits and r.memory["argument"] > 0 and r.memory["capacity"] is None and r.cost["flops"] > 0


def test_gpus_are_planned_on_cpu_devices_against_their_memory(monkeypatch):
  """h100:N: compiled for N CPU devices (no GPU needed), judged against 80 GB, attention "auto" compiled as the
  O(L) blocked path (not the CPU's dense choice), no roofline from the CPU's bytes; the same step as cpu:N."""
  topology = hardware.parse("h100:2")
  assert topology.on_cpu and topology.chip.platform == "gpu" and topology.chip.hbm_bytes == 80e9
  compiled_with = []
  compile_step = aot.compile_lib.compile_train_step
  monkeypatch.setattr(aot.compile_lib, "compile_train_step",
                      lambda c, *a: compiled_with.append(c.model.attention_impl) or compile_step(c, *a))
  r = aot.analyse(tiny.get_config(), "h100:2")
  cpu = aot.analyse(tiny.get_config(), "cpu:2")
  assert compiled_with == ["blocked", "auto"]
  assert r.fits and r.memory["capacity"] == 80e9 and r.roofline == {}
  assert r.memory["argument"] == cpu.memory["argument"]  # the same state and batch per device
  text = report.format_text(r)
  assert "standing in for NVIDIA H100" in text and "XLA_PYTHON_CLIENT_MEM_FRACTION" in text
  for spec, message in (("h100:2x2", "h100:N"), ("h300:8", "unknown TPU generation or GPU")):
    with pytest.raises(ValueError, match=message):
      hardware.parse(spec)


# jax's CUDA plugin, beside .venv and off its path (run.sh test installs it; omni_jax/aot/hardware.py)
GPU_AOT = os.path.join(ROOT, ".venv", "gpu-aot")
needs_cuda_plugin = pytest.mark.skipif(not os.path.isdir(os.path.join(GPU_AOT, "jax_plugins")),
                                       reason=f"jax's CUDA plugin is not in {GPU_AOT} (run.sh test installs it)")


@needs_cuda_plugin
def test_gpus_are_compiled_by_xla_gpu_without_a_gpu():
  """With jax's CUDA plugin, h100:2 is compiled by XLA:GPU itself from the H100's description (no GPU here):
  its flash_gpu Triton kernels included, the data-parallel all-reduces between the two GPUs, a roofline from
  its own bytes, and kernel launches counted. The train state per GPU is the CPU stand-in's."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([GPU_AOT, ROOT]))
  cmd = [sys.executable, "-m", "omni_jax.aot", "--config", os.path.join(ROOT, "configs", "tiny.py"), "--topology",
         "h100:2", "--config.train.batch_size=2", "--config.model.attention_impl=auto"]
  out = subprocess.run(cmd + ["--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["compiler"] == "XLA:GPU" and r["fits"] and r["memory"]["capacity"] == 80e9
  assert r["launches"]["attention"] > 0 and r["cost"]["bytes_by_family"]["attention"] > 0  # Triton kernels
  assert r["launches"]["gemm"] > 0 and r["launches"]["other"] > 0 and r["heaviest_other"]
  assert r["collectives"]["all-reduce"]["count"] > 0 and r["mesh"]["data"] == 2
  assert r["roofline"]["step_s"] > 0 and 0 < r["roofline"]["mfu"] < 1
  cpu = aot.analyse(tiny.get_config(), "cpu:2")
  cpu_state = sum(b for n, b in cpu.largest_arguments)
  assert sum(b for n, b in r["largest_arguments"]) == pytest.approx(cpu_state, rel=0.01)
  text = report.format_text(report.Report(**r))
  assert "compiled by XLA:GPU" in text and "standing in" not in text and "kernels per step: gemm" in text


def _lora_recipe(adapters=True):
  """configs/recipes/lora.py (tiny) with a 256-token vocabulary, so that the adapters are a visible share."""
  c = lora_recipe.get_config()
  c.model.thinker.text.vocab_size = 256
  c.model.thinker.update(tl.SMALL_IDS)
  c.train.update(dict(batch_size=2, seq_len=32))
  if not adapters:  # the same model fine-tuned in full: float32 weights, each with two AdamW moments
    del c["lora"]
  return c


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_lora_step_arguments_are_the_base_plus_adapters_and_their_moments():
  """The compiled LoRA step's inputs: the frozen bfloat16 base, the float32 adapters and AdamW's two moments of
  the adapters only (plus the batch and a few counters), far below the full fine-tune's state."""
  c = _lora_recipe()
  compiled = compile_lib.compile_train_step(c, jax.devices("cpu")[:1])
  r = report.build(compiled, hardware.parse("cpu:1"))
  flat = traverse_util.flatten_dict(compiled.setup.abstract_params)
  base = _nbytes([v for k, v in flat.items() if not lora.is_adapter(k)])
  adapters = _nbytes([v for k, v in flat.items() if lora.is_adapter(k)])
  assert all(v.dtype == jnp.bfloat16 for k, v in flat.items() if not lora.is_adapter(k))
  moments = [x for x in jax.tree.leaves(compiled.setup.abstract.opt_state) if x.ndim > 0]
  assert _nbytes(moments) == 2 * adapters
  batch = sum(b for name, b in compile_lib.argument_buffers(compiled) if name.startswith("batch."))
  counters = r.memory["argument"] - (base + 3 * adapters + batch)
  assert 0 <= counters <= 64, (r.memory, base, adapters, batch)  # step, rng, AdamW's count
  full = aot.analyse(_lora_recipe(adapters=False), "cpu:1")
  assert full.memory["argument"] >= 3 * 2 * base  # float32 weights (2x the bfloat16 base) and two moments
  assert r.memory["argument"] < full.memory["argument"] / 3


def test_dpo_steps_compile_with_their_pair_fields():
  """A DPO recipe's representative batch numbers its pairs (else the objectives would compile to nothing)."""
  shapes, _ = compile_lib.representative_batch(dpo_recipe.get_config())
  assert "dpo_pair" in shapes and "talker_dpo_pair" not in shapes
  shapes, _ = compile_lib.representative_batch(dpo_recipe.get_config("tower=talker"))
  assert {"dpo_pair", "talker_dpo_pair", "talker_labels"} <= set(shapes)
  assert "dpo_pair" not in compile_lib.representative_batch(_lora_recipe())[0]


def test_bad_topology_is_one_line_error():
  for spec, message in (("v9x:2x2", "unknown TPU generation"), ("v5p:2x2", "3 dimensions"), ("v5e", "expected")):
    with pytest.raises(ValueError, match=message):
      hardware.parse(spec)
  out = _aot("--topology", "v5p:2x2")
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1] == ("error: --topology 'v5p:2x2': v5p slices have 3 dimensions "
                                                 "(e.g. v5p:2x2x2)")


def test_hlo_counts_loops_by_trip_count():
  """A scan of 5 matmuls: XLA's cost analysis counts the body once, the HLO count 5 times."""
  w = jnp.ones((5, 64, 64), jnp.float32)

  def f(x, w):
    return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

  compiled = jax.jit(f).lower(jnp.ones((8, 64)), w).compile()
  program = hlo.parse(compiled.as_text(), 1)
  assert program.flops == pytest.approx(5 * 2 * 8 * 64 * 64)


def test_collectives_are_counted_with_their_sizes():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("x",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  f = jax.jit(lambda a: jnp.sum(a, axis=0), in_shardings=spec)
  program = hlo.parse(f.lower(jnp.ones((8, 1024), jnp.float32)).compile().as_text(), 4)
  summary = hlo.summary(program.collectives)
  assert summary["all-reduce"]["count"] == 1 and summary["all-reduce"]["bytes"] == 1024 * 4
  assert program.collectives[0].group == 4



_FUSED_HLO = """HloModule m

%stack_two (p0: f32[8,16], p1: f32[8,16], p2: f32[16], p3: s32[]) -> (f32[8,16], f32[8,16]) {
  %p0 = f32[8,16]{1,0} parameter(0)
  %p1 = f32[8,16]{1,0} parameter(1)
  %p2 = f32[16]{0} parameter(2)
  %p3 = s32[] parameter(3)
  %row = f32[1,16]{1,0} bitcast(%p2)
  %zero = s32[] constant(0)
  %d0 = f32[8,16]{1,0} dynamic-update-slice(%p0, %row, %p3, %zero)
  %neg = f32[1,16]{1,0} negate(%row)
  %d1 = f32[8,16]{1,0} dynamic-update-slice(%p1, %neg, %p3, %zero)
  ROOT %t = (f32[8,16]{1,0}, f32[8,16]{1,0}) tuple(%d0, %d1)
}

%rows (q0: f32[1000,16], q1: s32[4,1]) -> f32[4,16] {
  %q0 = f32[1000,16]{1,0} parameter(0)
  %q1 = s32[4,1]{1,0} parameter(1)
  ROOT %g = f32[4,16]{1,0} gather(%q0, %q1), offset_dims={1}, slice_sizes={1,16}
}

%project (r0: f32[4,16], r1: f32[16,16]) -> f32[4,16] {
  %r0 = f32[4,16]{1,0} parameter(0)
  %r1 = f32[16,16]{1,0} parameter(1)
  %dot = f32[4,16]{1,0} dot(%r0, %r1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %out = f32[4,16]{1,0} tanh(%dot)
}

ENTRY %main (arguments omitted) {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[8,16]{1,0} parameter(1)
  %c = f32[16]{0} parameter(2)
  %i = s32[] parameter(3)
  %table = f32[1000,16]{1,0} parameter(4)
  %ids = s32[4,1]{1,0} parameter(5)
  %w = f32[16,16]{1,0} parameter(6)
  %stacked = (f32[8,16]{1,0}, f32[8,16]{1,0}) fusion(%a, %b, %c, %i), kind=kLoop, calls=%stack_two
  %s0 = f32[8,16]{1,0} get-tuple-element(%stacked), index=0
  %s1 = f32[8,16]{1,0} get-tuple-element(%stacked), index=1
  %looked = f32[4,16]{1,0} fusion(%table, %ids), kind=kLoop, calls=%rows
  %projected = f32[4,16]{1,0} fusion(%looked, %w), kind=kOutput, calls=%project
  %attn = f32[4,16]{1,0} custom-call(%projected), custom_call_target="__gpu$xla.gpu.triton"
  ROOT %all = (f32[8,16], f32[8,16], f32[4,16], f32[4,16]) tuple(%s0, %s1, %looked, %attn)
}
"""


_SCATTER_HLO = """HloModule m

%keep (x: bf16[], y: bf16[]) -> bf16[] {
  %x = bf16[] parameter(0)
  ROOT %y = bf16[] parameter(1)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%write_rows (p0: bf16[2,32,4,64], p1: s32[32,2], p2: f32[32,4,64]) -> bf16[2,32,4,64] {
  %p0 = bf16[2,32,4,64]{3,2,1,0} parameter(0)
  %p1 = s32[32,2]{1,0} parameter(1)
  %p2 = f32[32,4,64]{2,1,0} parameter(2)
  %new = bf16[32,4,64]{2,1,0} convert(%p2)
  ROOT %sc = bf16[2,32,4,64]{3,2,1,0} scatter(%p0, %p1, %new), update_window_dims={1,2}, inserted_window_dims={0,1}, scatter_dims_to_operand_dims={0,1}, index_vector_dim=1, to_apply=%keep
}

ENTRY %main (arguments omitted) {
  %cache = bf16[2,32,4,64]{3,2,1,0} parameter(0)
  %slots = s32[32,2]{1,0} parameter(1)
  %kv = f32[32,4,64]{2,1,0} parameter(2)
  %table = f32[1000,16]{1,0} parameter(3)
  %ids = s32[8,1]{1,0} parameter(4)
  %grads = f32[8,16]{1,0} parameter(5)
  %written = bf16[2,32,4,64]{3,2,1,0} fusion(%cache, %slots, %kv), kind=kLoop, calls=%write_rows
  %summed = f32[1000,16]{1,0} scatter(%table, %ids, %grads), update_window_dims={1}, inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=1, to_apply=%add
  ROOT %all = (bf16[2,32,4,64], f32[1000,16]) tuple(%written, %summed)
}
"""


def test_hlo_bytes_count_scatters_in_place():
  """A decode step writes one slot per row into a layer of the KV cache with a scatter (fused with the new
  keys' cast): it moves the rows, not the cache; an embedding gradient's scatter-add reads and writes the rows
  it adds to."""
  program = hlo.parse(_SCATTER_HLO, 1)
  rows = 32 * 4 * 64
  written = 32 * 2 * 4 + rows * 4 + rows * 2  # the indices and the float32 keys read, the bf16 rows written
  summed = 8 * 4 + 8 * 16 * 4 * 3  # the ids; the gradients read, the table's rows read and written
  assert program.bytes_by_family == {"gemm": 0, "attention": 0, "other": written + summed}


_FUSED_CONDITION_HLO = """HloModule m

%more (p0: s32[], p1: pred[4]) -> pred[] {
  %p0 = s32[] parameter(0)
  %limit = s32[] constant(5)
  %lt = pred[] compare(%p0, %limit), direction=LT
  %p1 = pred[4]{0} parameter(1)
  %false = pred[] constant(false)
  %any = pred[] reduce(%p1, %false), dimensions={0}, to_apply=%or
  ROOT %both = pred[] and(%lt, %any)
}

%or (a: pred[], b: pred[]) -> pred[] {
  %a = pred[] parameter(0)
  %b = pred[] parameter(1)
  ROOT %o = pred[] or(%a, %b)
}

%cond (t: (s32[], pred[4], f32[256])) -> pred[] {
  %t = (s32[], pred[4]{0}, f32[256]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %active = pred[4]{0} get-tuple-element(%t), index=1
  ROOT %go = pred[] fusion(%i, %active), kind=kLoop, calls=%more
}

%body (t: (s32[], pred[4], f32[256])) -> (s32[], pred[4], f32[256]) {
  %t = (s32[], pred[4]{0}, f32[256]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %active = pred[4]{0} get-tuple-element(%t), index=1
  %x = f32[256]{0} get-tuple-element(%t), index=2
  %y = f32[256]{0} exponential(%x)
  ROOT %out = (s32[], pred[4]{0}, f32[256]{0}) tuple(%next, %active, %y)
}

ENTRY %main (arguments omitted) {
  %init = (s32[], pred[4]{0}, f32[256]{0}) parameter(0)
  ROOT %loop = (s32[], pred[4]{0}, f32[256]{0}) while(%init), condition=%cond, body=%body
}
"""


def test_hlo_loop_counts_a_bound_fused_into_its_condition():
  """A decode loop's condition `i < steps & any(active)` compiles to one fusion: its `i < 5` still bounds the
  trip count, so the body's bytes count 5 times (its exponential's, and the counter's add)."""
  program = hlo.parse(_FUSED_CONDITION_HLO, 1)
  assert program.bytes_by_family["other"] == 5 * (2 * 256 * 4 + 3 * 4)
  # One kernel per unfused instruction of the body, run 5 times: what a GPU launches per call.
  body = {k.name: k for k in program.kernels}
  assert body["y"].runs == 5 and body["y"].bytes == 5 * 2 * 256 * 4 and program.launches() == 10
  assert program.heaviest(1)[0].name == "y" and program.launches("gemm") == 0


def _newer_print_form(text: str) -> str:
  """`text` as newer XLA (jax 0.11) prints it: a tuple's element is an operand `%t#1`, not a get-tuple-element
  instruction of its own (a ROOT one stays)."""
  blocks = []
  for block in text.split("\n\n"):  # one computation each: a get-tuple-element's name is its computation's
    refs = dict((m.group(1), f"{m.group(2)}#{m.group(3)}") for m in re.finditer(
        r"^  %([\w.\-]+) = .+? get-tuple-element\(%([\w.\-]+)\), index=(\d+)\b", block, re.M))
    block = re.sub(r"^  %[\w.\-]+ = .+? get-tuple-element\(.*\n", "", block, flags=re.M)
    blocks.append(re.sub(r"%([\w.\-]+)(?!#)", lambda m: "%" + refs.get(m.group(1), m.group(1)), block))
  return "\n\n".join(blocks)


def _compiled_scan() -> str:
  """A compiled scan of 5 matmuls over stacked weights, as the installed XLA prints it."""
  f = lambda x, w: jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), h), x, w)  # noqa: E731
  return jax.jit(f).lower(jnp.ones((8, 64)), jnp.ones((5, 64, 64))).compile().as_text()


@pytest.mark.parametrize("text", [_FUSED_CONDITION_HLO, "scan"], ids=["loop", "scan"])
def test_hlo_counts_tuple_elements_printed_as_operands(text):
  """Newer XLA prints a tuple's element as an operand (`%t#1`), where older XLA wrote a get-tuple-element: the
  same program counts the same bytes, FLOPs, kernels and loop trips in both forms (read as the whole tuple, a
  scan's carry would count every stacked residual at each use)."""
  text = _compiled_scan() if text == "scan" else text
  newer = _newer_print_form(text)
  assert "get-tuple-element" not in newer and "#1" in newer
  old, new = hlo.parse(text, 1), hlo.parse(newer, 1)
  assert new.bytes_by_family == old.bytes_by_family and new.flops == old.flops
  assert [(k.name, k.bytes, k.runs) for k in new.kernels] == [(k.name, k.bytes, k.runs) for k in old.kernels]


_ASYNC_HLO = """HloModule m

%write_row (p0: f32[8,16], p1: s32[], p2: f32[1,16]) -> f32[8,16] {
  %p0 = f32[8,16]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %p2 = f32[1,16]{1,0} parameter(2)
  %zero = s32[] constant(0)
  ROOT %d = f32[8,16]{1,0} dynamic-update-slice(%p0, %p2, %p1, %zero)
}

%wrapped (q0: f32[8,16], q1: s32[], q2: f32[1,16]) -> f32[8,16] {
  %q0 = f32[8,16]{1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %q2 = f32[1,16]{1,0} parameter(2)
  ROOT %f = f32[8,16]{1,0} fusion(%q0, %q1, %q2), kind=kLoop, calls=%write_row
}

ENTRY %main (arguments omitted) {
  %stack = f32[8,16]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %row = f32[1,16]{1,0} parameter(2)
  %start = ((f32[8,16]{1,0}, s32[], f32[1,16]{1,0}), f32[8,16]{1,0}, u32[]) async-start(%stack, %i, %row), calls=%wrapped
  ROOT %done = f32[8,16]{1,0} async-done(%start)
}
"""


_FUSION_START = """  %start = ((f32[8,16]{1,0}, s32[], f32[1,16]{1,0}), f32[8,16]{1,0}, u32[]) fusion-start(%stack, %i, %row), kind=kLoop, calls=%write_row
  ROOT %done = f32[8,16]{1,0} fusion-done(%start)
"""


@pytest.mark.parametrize("form", ["async-start", "fusion-start"])
def test_hlo_counts_an_async_fusion_once_by_its_fusion(form):
  """XLA:GPU (jax 0.11) runs some fusions asynchronously, a scan's in-place residual writes among them, printed
  as an async-start of a computation holding the fusion (the dump's form) or as a fusion-start (the compiled
  program's as_text): the start's tuple (operands, result, context) is no traffic of its own; the fusion
  writes the row, in one kernel."""
  text = _ASYNC_HLO
  if form == "fusion-start":
    text = text[:text.index("  %start")] + _FUSION_START + "}\n"
  program = hlo.parse(text, 1)
  assert program.bytes_by_family == {"gemm": 0, "attention": 0, "other": 16 * 4 + 4 + 16 * 4}
  assert [k.runs for k in program.kernels] == [1]


_SLICED_HLO = """HloModule m

%layer_one (p0: bf16[4,64,64], p1: f32[8,64]) -> f32[8,64] {
  %p0 = bf16[4,64,64]{2,1,0} parameter(0)
  %w = bf16[1,64,64]{2,1,0} slice(%p0), slice={[1:2], [0:64], [0:64]}
  %w2 = bf16[64,64]{1,0} bitcast(%w)
  %wf = f32[64,64]{1,0} convert(%w2)
  %p1 = f32[8,64]{1,0} parameter(1)
  ROOT %d = f32[8,64]{1,0} dot(%p1, %wf), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (arguments omitted) {
  %stack = bf16[4,64,64]{2,1,0} parameter(0)
  %x = f32[8,64]{1,0} parameter(1)
  ROOT %y = f32[8,64]{1,0} fusion(%stack, %x), kind=kCustom, calls=%layer_one
}
"""


def test_hlo_bytes_count_a_static_slice_of_a_stack_by_the_slice():
  """An unrolled layer reads its weights as a slice of the stacked ones: one layer's, not the stack's."""
  program = hlo.parse(_SLICED_HLO, 1)
  assert program.bytes_by_family == {"gemm": 64 * 64 * 2 + 2 * 8 * 64 * 4, "attention": 0, "other": 0}
  assert [(k.name, k.family, k.runs) for k in program.kernels] == [("y", "gemm", 1)]


def test_hlo_bytes_count_in_place_updates_and_gathers_by_their_slices_and_split_by_family():
  """A multi-output fusion writing one row into each of two stacked buffers (a scan's residuals) moves the
  rows, not the buffers; a gather from an embedding table reads its rows; a fusion around a dot is a GEMM's,
  a Triton / Pallas custom call an attention kernel's."""
  program = hlo.parse(_FUSED_HLO, 1)
  row, rows = 16 * 4, 4 * 16 * 4
  stacked = 2 * row + row + 4  # the two rows written; the row read, the index read
  looked = rows + 4 * 4  # the table's 4 rows and the ids read ...
  looked += rows  # ... and written
  projected = rows + 16 * 16 * 4 + rows
  attn = 2 * rows
  assert program.bytes_by_family == {"gemm": projected, "attention": attn, "other": stacked + looked}
  assert program.bytes_accessed == sum(program.bytes_by_family.values())


_WINDOWS_HLO = """HloModule m

%fir (p0: bf16[1,100,8]) -> bf16[1,98,8] {
  %p0 = bf16[1,100,8]{2,1,0} parameter(0)
  %wide = f32[1,100,8]{2,1,0} convert(%p0)
  %a = f32[1,98,8]{2,1,0} slice(%wide), slice={[0:1], [0:98], [0:8]}
  %b = f32[1,98,8]{2,1,0} slice(%wide), slice={[0:1], [1:99], [0:8]}
  %c = f32[1,98,8]{2,1,0} slice(%wide), slice={[0:1], [2:100], [0:8]}
  %ab = f32[1,98,8]{2,1,0} add(%a, %b)
  %abc = f32[1,98,8]{2,1,0} add(%ab, %c)
  ROOT %out = bf16[1,98,8]{2,1,0} convert(%abc)
}

ENTRY %main (arguments omitted) {
  %x = bf16[1,100,8]{2,1,0} parameter(0)
  ROOT %y = bf16[1,98,8]{2,1,0} fusion(%x), kind=kLoop, calls=%fir
}
"""


def test_hlo_bytes_count_overlapping_windows_of_an_operand_once():
  """A filter's taps are shifted slices of one input in one fusion (the vocoder's resampling): the kernel reads
  the input once (its windows overlap), not once per tap."""
  program = hlo.parse(_WINDOWS_HLO, 1)
  assert program.bytes_by_family["other"] == 100 * 8 * 2 + 98 * 8 * 2


_CUDNN_CONV_HLO = """HloModule m

ENTRY %main (arguments omitted) {
  %x = bf16[1,100,16]{2,1,0} parameter(0)
  %w = bf16[32,7,16]{2,1,0} parameter(1)
  %conv = (bf16[1,100,32]{2,1,0}, u8[0]{0}) custom-call(%x, %w), window={size=7 pad=3_3}, dim_labels=b0f_o0i->b0f, custom_call_target="__cudnn$convForward"
  ROOT %y = bf16[1,100,32]{2,1,0} get-tuple-element(%conv), index=0
}
"""


def test_hlo_counts_a_cudnn_convolution_as_a_gemm_with_its_flops():
  """XLA:GPU runs a convolution as a cuDNN call: a matrix unit's work (the vocoder's, the audio tower's stem),
  not an attention kernel's, with the convolution's FLOPs (taps that read zero padding left out)."""
  program = hlo.parse(_CUDNN_CONV_HLO, 1)
  assert program.bytes_by_family == {"gemm": (100 * 16 + 32 * 7 * 16 + 100 * 32) * 2, "attention": 0, "other": 0}
  assert program.flops == 2 * 32 * 16 * (100 * 7 - 2 * (3 + 2 + 1))


_GEMM_CONFIG = ('backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_batch_dimensions":[],'
                '"lhs_contracting_dimensions":["1"],"rhs_batch_dimensions":[],"rhs_contracting_dimensions":["0"]}}}')
_CUBLAS_HLO = f"""HloModule m

%into_stack (p0: bf16[64,32], p1: bf16[32,16], p2: bf16[4,64,16], p3: s32[]) -> (bf16[4,64,16], s8[1048576]) {{
  %p0 = bf16[64,32]{{1,0}} parameter(0)
  %p1 = bf16[32,16]{{1,0}} parameter(1)
  %mm = (bf16[64,16]{{1,0}}, s8[1048576]{{0}}) custom-call(%p0, %p1), custom_call_target="__cublas$lt$matmul", {_GEMM_CONFIG}
  %row = bf16[1,64,16]{{2,1,0}} bitcast(%mm#0)
  %p2 = bf16[4,64,16]{{2,1,0}} parameter(2)
  %p3 = s32[] parameter(3)
  %zero = s32[] constant(0)
  %dus = bf16[4,64,16]{{2,1,0}} dynamic-update-slice(%p2, %row, %p3, %zero, %zero)
  ROOT %out = (bf16[4,64,16]{{2,1,0}}, s8[1048576]{{0}}) tuple(%dus, %mm#1)
}}

ENTRY %main (arguments omitted) {{
  %x = bf16[64,32]{{1,0}} parameter(0)
  %w = bf16[32,16]{{1,0}} parameter(1)
  %stack = bf16[4,64,16]{{2,1,0}} parameter(2)
  %i = s32[] parameter(3)
  %plain = (bf16[64,16]{{1,0}}, s8[1048576]{{0}}) custom-call(%x, %w), custom_call_target="__cublas$gemm", {_GEMM_CONFIG}
  %written = (bf16[4,64,16]{{2,1,0}}, s8[1048576]{{0}}) fusion(%x, %w, %stack, %i), kind=kCustom, calls=%into_stack
  ROOT %both = (bf16[64,16]{{1,0}}, bf16[4,64,16]{{2,1,0}}) tuple(%plain#0, %written#0)
}}
"""


def test_hlo_counts_cublas_calls_by_their_product_and_not_their_workspace():
  """Where XLA:GPU hands a product to cuBLAS (its autotuner's pick, or --xla_gpu_enable_triton_gemm=false), the
  call carries its contraction in its backend config and returns a workspace beside the product; a
  dynamic-slice fusion writes the product straight into a scan's stack. Both are GEMM kernels with the
  product's FLOPs, moving their operands and product (the row, in the stack), never the scratch buffer."""
  program = hlo.parse(_CUBLAS_HLO, 1)
  operands, product = (64 * 32 + 32 * 16) * 2, 64 * 16 * 2
  assert program.flops == 2 * (2 * 64 * 16 * 32)
  assert program.bytes_by_family == {"gemm": 2 * (operands + product) + 4, "attention": 0, "other": 0}
  assert [(k.name, k.family) for k in program.kernels] == [("plain", "gemm"), ("written", "gemm")]


def test_xla_flags_naming_an_option_win_over_the_programs_own(monkeypatch):
  """A program's own options yield to XLA_FLAGS that name them, as --name=value or as a bare boolean --name; a
  flag whose name only starts with an option's leaves it."""
  want = {"xla_gpu_enable_dynamic_slice_fusion": False}
  for flags, expected in [("", want), ("--xla_gpu_enable_dynamic_slice_fusion=true", None),
                          ("--xla_gpu_enable_dynamic_slice_fusion --xla_dump_to=/tmp/x", None),
                          ("--xla_dump_to=/tmp/x --xla_gpu_enable_dynamic_slice_fusion", None),
                          ("--xla_gpu_enable_dynamic_slice_fusion_extra=1", want)]:
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert xla_options.for_program("train", "gpu") == expected, flags
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=2")
  assert xla_options.for_program("init", "cpu") is None and xla_options.for_program("init", "gpu") is None


# A text-only Thinker wide enough that XLA:GPU hands its layers' products to cuBLAS in a scan that keeps them.
_CUBLAS_STEP = """
import json, os, sys
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "bench")]
import bench_mfu
from omni_jax.aot import compile as compile_lib, hardware, hlo
c = bench_mfu.make_config(True, 512, 2, "none", False)
c.model.thinker.text.update(dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8))
c.model.dtype, c.model.attention_impl = "bfloat16", "xla"
flops = {}
for topology in ("h200:1", "cpu:1"):
  compiled = compile_lib.compile_train_step(c, compile_lib.devices_for(hardware.parse(topology, 1)))
  flops[topology] = hlo.parse(compiled.compiled.as_text(), 1).flops
print(json.dumps(flops))
"""


@needs_cuda_plugin
def test_gpu_train_step_computes_each_product_once_with_cublas_gemms(monkeypatch):
  """XLA:GPU's dynamic-slice fusion (on by default from jax 0.11) computes a cuBLAS product that a scan both
  keeps as a residual and uses again twice: the train step turns it off on GPUs (omni_jax.xla_options), so the
  step's matmul FLOPs are the CPU compile's. XLA_FLAGS naming the option wins: turned on there, jax >= 0.11 shows
  the duplicates this guards against (jax 0.10's compiler fails on it)."""
  def flops(xla_flags):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([GPU_AOT, ROOT]), XLA_FLAGS=xla_flags)
    out = subprocess.run([sys.executable, "-c", _CUBLAS_STEP], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])

  cublas = "--xla_gpu_enable_triton_gemm=false"
  once = flops(cublas)
  assert once["h200:1"] == pytest.approx(once["cpu:1"], rel=1e-4)
  assert xla_options.for_program("train", "gpu") == {"xla_gpu_enable_dynamic_slice_fusion": False}
  assert xla_options.for_program("train", "cpu") is None
  monkeypatch.setenv("XLA_FLAGS", cublas + " --xla_gpu_enable_dynamic_slice_fusion=true")
  assert xla_options.for_program("train", "gpu") is None
  if tuple(int(v) for v in jax.__version__.split(".")[:2]) >= (0, 11):
    twice = flops(os.environ["XLA_FLAGS"])
    assert twice["h200:1"] > once["h200:1"] * 1.002


@needs_cuda_plugin
def test_decode_on_gpus_reads_each_layers_weights_in_place():
  """XLA:GPU copies a slice of a stacked weight before the matmul reading it: a decode step over stacked layers
  moves its weights' bytes more than twice over. Over per-layer buffers (config.generate.layer_buffers="split",
  GPUs' "auto") a step moves what it must read: the weights and the cache window, whose layer rows the batch of
  32's attention matmuls also read in place (a copy of each layer's cache window first: 1.16x). Two layers of the
  7B's widths (bench_generate.py --size 7b-2l), compiled for one H100."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([GPU_AOT, ROOT]))
  ratios = {}
  for layout, batches in (("auto", ["1", "32"]), ("stacked", ["1"])):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_generate.py"), "--size", "7b-2l",
                          "--dtype", "bfloat16", "--no-reference", "--batch", *batches, "--prompt", "16", "--new",
                          "16", "--aot", "h100:1", "--layer_buffers", layout], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"layer weights {'split' if layout == 'auto' else 'stacked'}" in out.stdout, out.stdout
    for rows, moved, bound in re.findall(r"batch (\d+),.*?= ([\d,.]+) \(weights \+ window ([\d,.]+)\)", out.stdout):
      ratios[layout, int(rows)] = float(moved.replace(",", "")) / float(bound.replace(",", ""))
    assert re.search(r"kernels per step gemm \d+ / attention \d+ / other \d+", out.stdout), out.stdout
    if layout == "auto":  # batch 1: the k / v projections are GEMMs, not multiply-and-reduce loops (5% of a step)
      other, total = re.search(r"batch 1,.*other ([\d,.]+) = ([\d,.]+)", out.stdout).groups()
      assert float(other.replace(",", "")) < 0.03 * float(total.replace(",", "")), out.stdout
  assert ratios["auto", 1] < 1.1 and ratios["auto", 32] < 1.12 and ratios["stacked", 1] > 2.0, ratios


@needs_cuda_plugin
def test_decode_with_cublas_products_copies_no_weights():
  """XLA:GPU's dot merger joins a layer's q / k / v projections (one input) into one product over their weights
  concatenated at every step; where cuBLAS runs it (the autotuner's pick, or --xla_gpu_enable_triton_gemm=false)
  that concatenation is a copy of the weights per step. The engine's programs compile without the merger on
  GPUs (omni_jax.xla_options): two 7B-wide layers with cuBLAS products move about what they must read; with the
  merger on (XLA_FLAGS naming the option wins) they move twice that."""
  def ratios(xla_flags, batches):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([GPU_AOT, ROOT]), XLA_FLAGS=xla_flags)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_generate.py"), "--size", "7b-2l",
                          "--dtype", "bfloat16", "--no-reference", "--batch", *batches, "--prompt", "16", "--new",
                          "16", "--aot", "h100:1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return {int(rows): float(moved.replace(",", "")) / float(bound.replace(",", "")) for rows, moved, bound in
            re.findall(r"batch (\d+),.*?= ([\d,.]+) \(weights \+ window ([\d,.]+)\)", out.stdout)}

  cublas = "--xla_gpu_enable_triton_gemm=false"
  apart = ratios(cublas, ["1", "32"])
  assert apart[1] < 1.0 and apart[32] < 1.1, apart
  assert xla_options.for_program("decode", "gpu") == {"xla_gpu_dot_merger_threshold_mb": 0}
  merged = ratios(cublas + " --xla_gpu_dot_merger_threshold_mb=1000", ["1"])
  assert merged[1] > 1.5 * apart[1], merged


@needs_cuda_plugin
def test_one_conversation_decodes_without_copying_its_cache():
  """At batch 1 (one conversation: OmniSession, a server with one request) the engine's per-row cache index
  wrote k / v with a one-row scatter, which XLA:GPU runs as a transpose of the whole cache window at every step,
  and the attention's [B, slots, kv_heads, D] view made it copy each layer's window before the matmuls. A slice
  update and a view with KV heads as the batch read and write the cache in place: two 7B-wide layers over a
  4,096-slot window move 0.96x the weights and window a step (1.05x before both, 1.01x with the slice update
  alone)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([GPU_AOT, ROOT]))
  out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_generate.py"), "--size", "7b-2l",
                        "--dtype", "bfloat16", "--no-reference", "--batch", "1", "--prompt", "4000", "--new", "16",
                        "--aot", "h100:1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  moved, bound = re.search(r"batch 1, 4096 cache slots,.*?= ([\d,.]+) \(weights \+ window ([\d,.]+)\)",
                           out.stdout).groups()
  assert float(moved.replace(",", "")) < 0.98 * float(bound.replace(",", "")), out.stdout


def test_one_row_through_a_linear_on_a_gpu_is_the_same_product(monkeypatch):
  """On a GPU a Linear computes a single row as two equal rows (one GEMM instead of XLA:GPU's multiply-and-reduce
  over a narrow kernel): the same values and gradients, whatever the leading shape; several rows are unchanged."""
  from flax import nnx
  from omni_jax.layers import kernels
  from omni_jax.layers.linear import Linear

  layer = Linear(48, 16, use_bias=True, names=("embed", "kv_heads"), rngs=nnx.Rngs(0))
  layer.bias.value = jax.random.normal(jax.random.key(1), (16,))
  graphdef, state = nnx.split(layer)
  run = lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x) ** 2)  # noqa: E731
  inputs = [jax.random.normal(jax.random.key(2), shape) for shape in ((1, 1, 48), (48,), (3, 48))]
  plain = [(nnx.merge(graphdef, state)(x), jax.grad(run, argnums=(0, 1))(state, x)) for x in inputs]
  monkeypatch.setattr(kernels, "platform", lambda: "gpu")
  for x, (y, grads) in zip(inputs, plain):
    two_rows = "f32[2,48]" in str(jax.make_jaxpr(nnx.merge(graphdef, state))(x))
    assert two_rows == (x.size == 48), x.shape
    got = nnx.merge(graphdef, state)(x)
    assert got.shape == y.shape == (*x.shape[:-1], 16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(y), rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(jax.grad(run, argnums=(0, 1))(state, x)), jax.tree.leaves(grads)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@needs_cuda_plugin
def test_the_vocoder_on_gpus_runs_its_convolutions_only_as_cudnn_calls():
  """The vocoder's resampling filters are fused loops on a GPU: cuDNN runs (and a GPU compile autotunes) the
  learned convolutions only, not two more per anti-aliased activation (bench_token2wav.py --aot)."""
  import tiny_shapes  # noqa: PLC0415
  from omni_jax.models.bigvgan import BigVGANConfig  # noqa: PLC0415

  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([GPU_AOT, ROOT]))
  out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_token2wav.py"), "--aot", "h100:1",
                        "--seconds", "1", "--method", "euler"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  line = next(x for x in out.stdout.splitlines() if x.startswith("BigVGAN:"))
  cfg = BigVGANConfig.from_hf(tiny_shapes.TOKEN2WAV["bigvgan_config"])  # bench_token2wav's tiny vocoder
  stages = len(cfg.upsample_rates)
  learned = 2 + stages + stages * sum(2 * len(d) for d in cfg.resblock_dilation_sizes)  # pre, post, ups, blocks
  assert f"cuDNN convolutions {learned};" in line + ";", line
  assert re.search(r"kernels gemm (\d+),", line).group(1) == str(learned), line


_TARGET_HLO = """HloModule m

%pick (p0: bf16[4,1000], p1: s32[4,2]) -> f32[4,1,1] {
  %p0 = bf16[4,1000]{1,0} parameter(0)
  %wide = f32[4,1000]{1,0} convert(%p0)
  %p1 = s32[4,2]{1,0} parameter(1)
  ROOT %g = f32[4,1,1]{2,1,0} gather(%wide, %p1), offset_dims={1,2}, collapsed_slice_dims={}, start_index_map={0,1}, index_vector_dim=1, slice_sizes={1,1}
}

ENTRY %main (arguments omitted) {
  %logits = bf16[4,1000]{1,0} parameter(0)
  %targets = s32[4,2]{1,0} parameter(1)
  ROOT %picked = f32[4,1,1]{2,1,0} fusion(%logits, %targets), kind=kLoop, calls=%pick
}
"""


def test_hlo_bytes_count_a_gather_behind_a_convert_by_its_elements():
  """A loss reads each row's target logit out of bf16 logits widened to float32 in the same fusion: the fusion
  computes the widened elements it gathers only, so it reads 4 bf16 logits, not the [4, 1000] table."""
  program = hlo.parse(_TARGET_HLO, 1)
  assert program.bytes_by_family["other"] == 4 * 2 + 4 * 2 * 4 + 4 * 4  # the logits read, the indices, the result

"""The AOT report: per-chip HBM, compiled FLOPs and bytes, collectives, and a roofline step time / MFU.

FLOPs and bytes: XLA's cost analysis of the compiled program counts a while loop's body once, so for the
scanned layers it undercounts by about the layer count; the report prints it as `xla_*` and also counts the
compiled HLO itself with each loop's trip count (omni_jax.aot.hlo: matmul/convolution FLOPs, operand + result
bytes of the unfused instructions). The roofline uses the loop-aware counts.

Roofline (per chip, one step): compute = loop-aware FLOPs / peak bf16 FLOP/s; memory = loop-aware bytes /
HBM bandwidth; collectives = ring-algorithm bytes on the wire / ICI bandwidth. The estimate assumes they
overlap perfectly (step time = the largest of the three), so it is an upper bound on speed; MFU is the
documented model-FLOPs formula (docs/training.md, "MFU") over chips x peak x that step time.

A Pallas attention kernel (splash) is a custom call whose FLOPs no HLO count sees, so the compute time adds an
estimate of them (attention_kernel_flops: the decoders' causal score and value matmuls, forward once, backward
2.5 times as a flash backward recomputes the scores, and once more forward where remat recomputes the layer).
So the compute time covers every FLOP the step does, kernels included, and the estimated MFU (model FLOPs over
that) stays below 100% wherever the step does more than the model FLOPs (the backward's recompute, remat).
"""

import dataclasses
from typing import Any, Optional

from omni_jax import config as config_lib
from omni_jax import sizes
from omni_jax.aot import compile as compile_lib
from omni_jax.aot import hardware, hlo
from omni_jax.layers import attention
from omni_jax.models.talker import talker_config

TOP = 8


@dataclasses.dataclass
class Report:
  topology: str
  chips: int
  mesh: dict
  batch: dict  # field -> shape
  fits: bool
  memory: dict  # bytes per chip: argument, output, alias, temp, generated_code, total, capacity
  cost: dict  # per chip: flops, bytes_accessed (loop-aware, from the HLO), kernel_flops, xla_flops, xla_bytes_accessed
  model_flops: float  # the documented formula, whole step, all chips
  collectives: dict  # kind -> count, bytes, wire_bytes (per chip, per step)
  roofline: dict  # seconds: compute, memory, collectives, step; mfu
  largest_arguments: list  # (name, bytes per chip)
  largest_values: list  # (bytes, shape, op, jax op name)
  compile_seconds: float = 0.0
  error: Optional[str] = None  # the compiler's out-of-memory message
  compiler: str = ""  # "XLA:TPU", "XLA:GPU" or "XLA:CPU" (also CPU devices standing in for GPUs)
  # Kernels per step by family (launches: what a GPU starts unless it replays a graph) and the heaviest
  # "other" ones: (bytes per step, runs, jax op name).
  launches: dict = dataclasses.field(default_factory=dict)
  heaviest_other: list = dataclasses.field(default_factory=list)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  cost = cost or {}
  return {"xla_flops": float(cost.get("flops", 0.0)), "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def _memory(compiled, chip: Optional[hardware.Chip]) -> dict:
  m = compiled.memory_analysis()
  get = lambda name: float(getattr(m, name, 0) or 0) if m is not None else 0.0  # noqa: E731
  out = {"argument": get("argument_size_in_bytes"), "output": get("output_size_in_bytes"),
         "alias": get("alias_size_in_bytes"), "temp": get("temp_size_in_bytes"),
         "generated_code": get("generated_code_size_in_bytes")}
  # Donated state: outputs that alias arguments take no memory of their own.
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
  out["capacity"] = float(chip.hbm_bytes) if chip else None
  return out


_KERNEL_CALLS = ("tpu_custom_call", "__gpu$xla.gpu.triton")  # how a Pallas kernel appears in compiled HLO


def attention_kernel_flops(c: compile_lib.Compiled, hlo_text: str) -> float:
  """FLOPs of one step's attention kernels, all chips (0 when the program calls none): per decoder (the
  Thinker's text, the Talker's rows) its causal attention forward (sizes.causal_attention_flops), the backward
  2.5 times that, the forward again under remat (not under "dots_and_attention" for a kernel whose residuals it
  keeps)."""
  if not any(call in hlo_text for call in _KERNEL_CALLS):
    return 0.0
  config = c.setup.config
  policy = config.model.get("remat_policy", "none")
  impl = config.model.get("attention_impl", "auto")
  impl = attention.auto_kernel(c.mesh.devices.flat[0].platform) if impl == "auto" else impl
  again = policy != "none" and not (policy == "dots_and_attention" and impl in attention.NAMES_RESIDUALS)
  passes = 1 + 2.5 + again
  decoders = [(config_lib.thinker_text(config), "input_ids")]
  talker = talker_config(config)
  if talker is not None and "talker_segment_ids" in c.batch_shapes:
    decoders.append((talker.text, "talker_segment_ids"))
  forward = sum(sizes.causal_attention_flops(*c.batch_shapes[field].shape, t.num_hidden_layers,
                                             t.num_attention_heads, t.head_dim) for t, field in decoders)
  return float(forward * passes)


def compiler_of(c: compile_lib.Compiled) -> str:
  return "XLA:" + c.mesh.devices.flat[0].platform.upper()


def roofline(cost: dict, collectives: dict, model_flops: float, chips: int, chip: Optional[hardware.Chip],
             compiler: str) -> dict:
  if chip is None or compiler == "XLA:CPU":  # a CPU compile's fusion and bytes say little of a GPU's step
    return {}
  compute = (cost["flops"] + cost.get("kernel_flops", 0.0)) / chip.peak_flops
  memory = cost["bytes_accessed"] / chip.hbm_bandwidth
  wire = sum(c["wire_bytes"] for c in collectives.values()) / chip.ici_bandwidth
  step = max(compute, memory, wire, 1e-12)
  return {"compute_s": compute, "memory_s": memory, "collectives_s": wire, "step_s": step,
          "mfu": model_flops / chips / chip.peak_flops / step,
          "bound": max((compute, "compute"), (memory, "memory"), (wire, "collectives"))[1]}


def build(c: compile_lib.Compiled, topology: hardware.Topology) -> Report:
  chip = topology.chip
  chips = c.mesh.size
  text = c.compiled.as_text()
  program = hlo.parse(text, chips)
  collectives = hlo.summary(program.collectives)
  cost = {"flops": program.flops, "bytes_accessed": program.bytes_accessed, "bytes_by_family": program.bytes_by_family,
          "kernel_flops": attention_kernel_flops(c, text) / chips, **_cost(c.compiled)}
  memory = _memory(c.compiled, chip)
  flops = compile_lib.model_flops(c)
  args = hlo.largest(compile_lib.argument_buffers(c), TOP, key=lambda x: x[1])
  values = [(v.bytes, v.shape, v.op, v.op_name) for v in hlo.largest(program.values, TOP)]
  fits = memory["capacity"] is None or memory["total"] <= memory["capacity"]
  compiler = compiler_of(c)
  heaviest = [(k.bytes, k.runs, k.op_name) for k in program.heaviest(TOP, "other")]
  return Report(topology.spec, chips, dict(c.mesh.shape), {k: list(v.shape) for k, v in c.batch_shapes.items()},
                fits, memory, cost, flops, collectives, roofline(cost, collectives, flops, chips, chip, compiler),
                args, values, c.seconds, compiler=compiler,
                launches={f: program.launches(f) for f in hlo.FAMILIES}, heaviest_other=heaviest)


def does_not_fit(c: compile_lib.Compiled, topology: hardware.Topology, message: str) -> Report:
  """The report of a compile that ran out of memory: the compiler's message, the biggest arguments per chip
  (from the shardings) and the biggest values of the program before partitioning (global shapes)."""
  args = compile_lib.argument_buffers(c)
  memory = {"argument": sum(b for _, b in args), "capacity": float(topology.chip.hbm_bytes) if topology.chip else None}
  try:
    program = hlo.parse(c.lowered.as_text(dialect="hlo"), c.mesh.size)
    values = [(v.bytes, v.shape, v.op, v.op_name) for v in hlo.largest(program.values, TOP)]
  except Exception:  # noqa: BLE001 - the lists are a help, the verdict stands without them
    values = []
  return Report(topology.spec, c.mesh.size, dict(c.mesh.shape), {k: list(v.shape) for k, v in c.batch_shapes.items()},
                False, memory, {}, compile_lib.model_flops(c), {}, {}, hlo.largest(args, TOP, key=lambda x: x[1]),
                values, c.seconds, message, compiler=compiler_of(c))


def _gib(x: Optional[float]) -> str:
  return "n/a" if x is None else f"{x / 2 ** 30:.2f} GiB"


def _short(op_name: str) -> str:
  """The last two parts of a jax op name ('.../while/body/closed_call/mul' -> 'closed_call/mul')."""
  return "/".join(op_name.split("/")[-2:]) or "-"


def format_text(r: Report) -> str:
  lines = [f"topology {r.topology}: {r.chips} chips, mesh {r.mesh}, compiled by {r.compiler or '?'}",
           "batch " + ", ".join(f"{k}{tuple(v)}" for k, v in r.batch.items())]
  chip = hardware.parse(r.topology).chip
  if chip is not None and chip.platform == "gpu" and r.compiler == "XLA:CPU":
    lines.append(f"compiled for {r.chips} CPU devices standing in for {chip.device_kind} (jax's CUDA plugin, which "
                 "compiles for a GPU without one, is not installed): memory from XLA:CPU's buffer assignment, "
                 "attention 'auto' as 'blocked' (O(L), as the GPU kernel)")
  if chip is not None and chip.platform == "gpu":
    lines.append("JAX preallocates 75% of a GPU unless XLA_PYTHON_CLIENT_MEM_FRACTION says more")
  m = r.memory
  if r.error is not None:
    lines += [f"DOES NOT FIT: the compiler ran out of memory (capacity {_gib(m.get('capacity'))} per chip): "
              + " ".join(r.error.split()),
              f"arguments alone: {_gib(m['argument'])} per chip; biggest: "
              + ", ".join(f"{n} {_gib(b)}" for n, b in r.largest_arguments[:5])]
    if r.largest_values:
      lines.append("biggest values in the program (global shapes, before partitioning): " + ", ".join(
          f"{shape} ({op} {name or '-'}) {_gib(b)}" for b, shape, op, name in r.largest_values[:5]))
    return "\n".join(lines)
  lines.append(f"memory per chip: arguments {_gib(m['argument'])}, outputs {_gib(m['output'])} "
               f"(aliased {_gib(m['alias'])}), temporaries {_gib(m['temp'])}, code {_gib(m['generated_code'])}; "
               f"total {_gib(m['total'])} of {_gib(m['capacity'])}"
               + ("" if m["capacity"] is None else f" ({100 * m['total'] / m['capacity']:.0f}%)"))
  lines.append(f"cost per chip: {r.cost['flops'] / 1e12:.3f} TFLOP, {r.cost['bytes_accessed'] / 2 ** 30:.2f} GiB "
               f"accessed (HLO, loops x trip count; XLA cost analysis, loop bodies once: "
               f"{r.cost['xla_flops'] / 1e12:.3f} TFLOP, {r.cost['xla_bytes_accessed'] / 2 ** 30:.2f} GiB); "
               f"model FLOPs (docs/training.md formula) {r.model_flops / r.chips / 1e12:.3f} TFLOP per chip"
               + (f"; attention kernels (not in the HLO count; estimated) {r.cost['kernel_flops'] / 1e12:.3f} TFLOP"
                  if r.cost.get("kernel_flops") else ""))
  if r.cost.get("bytes_by_family"):
    lines.append("bytes accessed by kernel family (GEMM fusions / attention kernels / everything else): " + ", ".join(
        f"{k} {v / 2 ** 30:.2f} GiB" for k, v in r.cost["bytes_by_family"].items()))
  if r.launches:
    lines.append("kernels per step: " + ", ".join(f"{k} {v:,}" for k, v in r.launches.items())
                 + ("; heaviest others: " + ", ".join(f"{_short(name)} x{runs} {b / 2 ** 30:.2f} GiB"
                                                      for b, runs, name in r.heaviest_other[:3])
                    if r.heaviest_other else ""))
  if r.collectives:
    lines.append("collectives per chip per step: " + "; ".join(
        f"{k} x{v['count']} {v['bytes'] / 2 ** 20:.1f} MiB" for k, v in r.collectives.items()))
  else:
    lines.append("collectives: none")
  if r.roofline:
    f = r.roofline
    lines.append(f"roofline: compute {f['compute_s'] * 1e3:.1f} ms, HBM {f['memory_s'] * 1e3:.1f} ms, collectives "
                 f"{f['collectives_s'] * 1e3:.1f} ms -> step >= {f['step_s'] * 1e3:.1f} ms ({f['bound']}-bound), "
                 f"estimated MFU {100 * f['mfu']:.1f}%")
  if not r.fits:
    lines.append(f"DOES NOT FIT: {_gib(m['total'])} per chip exceeds {_gib(m['capacity'])}. Biggest arguments "
                 "per chip: " + ", ".join(f"{n} {_gib(b)}" for n, b in r.largest_arguments[:5]))
    lines.append("biggest values in the program: " + ", ".join(
        f"{shape} ({op} {name or '-'}) {_gib(b)}" for b, shape, op, name in r.largest_values[:5]))
  return "\n".join(lines)

"""What the compiled HLO text says: its collectives (with sizes and how often they run) and its largest values.

Collectives inside a while loop (the scanned layers) run once per iteration: each computation's count is
multiplied by the trip counts of the loops that call it (XLA's known_trip_count), so the totals are per step.
"""

import collections
import dataclasses
import re
from typing import Optional

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_CALLEE = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIPS = re.compile(r'known_trip_count"?\s*[:=]\s*\{\s*"?n"?\s*[:=]\s*"?(\d+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def array_bytes(shape_text: str) -> list[float]:
  """Bytes of each array in an HLO shape ('bf16[8,128]{1,0}' or a tuple of them)."""
  out = []
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype.startswith("f8"):
      size = 1
    elif dtype in _DTYPE_BYTES:
      size = _DTYPE_BYTES[dtype]
    else:
      continue
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    out.append(n * size)
  return out


def _group_size(rest: str, num_devices: int) -> int:
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", rest)  # iota form: [groups, group size]
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)  # explicit groups
  if m:
    return max(1, len([x for x in m.group(1).split(",") if x]))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)  # mesh form: axes and the grouped ones
  if m:
    sizes = dict((k.strip("'\" "), int(v)) for k, v in (kv.split("=") for kv in m.group(1).split(",") if "=" in kv))
    n = 1
    for axis in m.group(2).split(","):
      n *= sizes.get(axis.strip("'\" "), 1)
    return n
  return 2 if "source_target_pairs" in rest else num_devices


@dataclasses.dataclass
class Collective:
  kind: str  # one of COLLECTIVES
  bytes: float  # result size per chip, one execution
  group: int  # devices taking part
  runs: int  # executions per step (loop trip counts)
  op_name: str  # the jax operation it came from

  @property
  def wire_bytes(self) -> float:
    """Bytes each chip sends per execution with ring algorithms (a rough cost model)."""
    n = max(self.group, 1)
    if self.kind == "all-reduce":
      return 2 * self.bytes * (n - 1) / n
    if self.kind == "reduce-scatter":
      return self.bytes * (n - 1)
    if self.kind == "collective-permute":
      return self.bytes
    return self.bytes * (n - 1) / n  # all-gather (result size), all-to-all


@dataclasses.dataclass
class Value:
  bytes: float
  shape: str
  op: str
  op_name: str
  computation: str


@dataclasses.dataclass
class Kernel:
  """One unfused instruction of the compiled program: on a GPU one kernel launch per run (a TPU may run
  several as one program, but the bytes are the same)."""
  name: str
  op: str  # "fusion", "custom-call", "copy", ...
  family: str  # one of FAMILIES
  bytes: float  # operands + results per step: one run's bytes x runs
  runs: int  # executions per step (loop trip counts)
  op_name: str  # the jax operation it came from
  computation: str


@dataclasses.dataclass
class Program:
  collectives: list
  values: list  # every instruction's result (for the "largest values" list)
  flops: float  # matmul / convolution FLOPs per chip per step, loops counted trip-count times
  # operands + results of the unfused instructions per chip per step (likewise), by kernel family (FAMILIES)
  bytes_by_family: dict
  kernels: list = dataclasses.field(default_factory=list)  # [Kernel] whose bytes make bytes_by_family

  def launches(self, family: Optional[str] = None) -> int:
    """Kernels run per step (of one family): what a GPU launches unless it replays them as a graph."""
    return sum(k.runs for k in self.kernels if family is None or k.family == family)

  def heaviest(self, n: int, family: Optional[str] = None) -> list:
    """The n kernels (of one family) that move the most bytes per step."""
    return largest([k for k in self.kernels if family is None or k.family == family], n)

  @property
  def bytes_accessed(self) -> float:
    return float(sum(self.bytes_by_family.values()))


@dataclasses.dataclass
class _Instr:
  name: str
  shape: str
  op: str
  operands: list
  rest: str
  root: bool = False


# No kernel of their own (an async-start's called computation counts, at the top level, like a call's).
_SKIP_BYTES = ("parameter", "tuple", "get-tuple-element", "bitcast", "constant", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id", "copy-start", "copy-done", "async-start")


# Kernel families of a step's time: matrix products (and the fusions around them), attention kernels (custom
# calls: Pallas / Triton / Mosaic / cuDNN), and everything else (elementwise, reductions, copies, scatters).
FAMILIES = ("gemm", "attention", "other")
_ATTENTION_TARGETS = ("tpu_custom_call", "triton", "cudnn", "mosaic")


def _fused_computation(ins: "_Instr") -> Optional[str]:
  """The name of the computation a fusion instruction runs (None for any other instruction). XLA:GPU may run a
  fusion asynchronously: `fusion-start` (its result and the wait's `fusion-done`) in one printed form, an
  `async-start` of a computation holding the fusion in the other."""
  m = re.search(r"calls=%?([\w.\-]+)", ins.rest) if ins.op in ("fusion", "fusion-start") else None
  return m.group(1) if m else None


def _scatter_parts(ins: "_Instr", computations: dict) -> tuple[list, list, list, int]:
  """(operands, [indices], updates, touches) of a scatter: an in-place scatter moves its updates, not its
  operands; touches: 2 when it overwrites (updates read, rows written), 3 when it combines (rows read too)."""
  n = (len(ins.operands) - 1) // 2
  m = re.search(r"to_apply=%?([\w.\-]+)", ins.rest)
  combiner = computations.get(m.group(1), []) if m else []
  root = next((i for i in combiner if i.root), None)
  overwrite = root is not None and root.op == "parameter"
  return ins.operands[:n], ins.operands[n:n + 1], ins.operands[n + 1:], 2 if overwrite else 3


def _is_convolution(ins: "_Instr") -> bool:
  """A convolution, also as XLA:GPU's cuDNN call (which keeps the convolution's window and dim_labels)."""
  return ins.op == "convolution" or (ins.op == "custom-call" and '_call_target="__cudnn$conv' in ins.rest)


def _is_library_gemm(ins: "_Instr") -> bool:
  """A matrix product XLA:GPU hands to cuBLAS / cuBLASLt (its choice where it does not emit a Triton GEMM)."""
  return ins.op == "custom-call" and '_call_target="__cublas$' in ins.rest


def _workspace_index(ins: "_Instr") -> Optional[int]:
  """Where a cuBLAS / cuDNN call's result tuple holds its workspace (last, an s8 / u8 scratch buffer of up to
  tens of MiB that the library may use in part: not data the program moves), else None."""
  elements = _tuple_elements(ins.shape)
  if (ins.op == "custom-call" and '_call_target="__cu' in ins.rest and len(elements) > 1
      and re.match(r"[su]8\[", elements[-1])):
    return len(elements) - 1
  return None


def _result_bytes(ins: "_Instr") -> float:
  """Bytes of an instruction's result, a library call's workspace left out."""
  sizes = array_bytes(ins.shape)
  return float(sum(sizes[:-1] if _workspace_index(ins) is not None else sizes))


def _family(ins: "_Instr", computations: dict, memo: dict) -> str:
  """The family of an unfused instruction: a fusion containing a dot / convolution is a GEMM's."""
  if ins.op == "dot" or _is_convolution(ins):
    return "gemm"
  if ins.op == "custom-call":
    target = re.search(r'custom_call_target="([^"]*)"', ins.rest)
    target = target.group(1).lower() if target else ""
    if "gemm" in target or "matmul" in target:
      return "gemm"
    return "attention" if any(t in target for t in _ATTENTION_TARGETS) else "other"
  name = _fused_computation(ins)
  if name is None:
    return "other"
  if name not in memo:
    memo[name] = "other"  # recursion guard
    memo[name] = "gemm" if any(_family(i, computations, memo) == "gemm" for i in computations.get(name, ())
                               if i.op in ("dot", "convolution", "fusion", "custom-call")) else "other"
  return memo[name]


def _inside(text: str) -> tuple[str, list[str]]:
  """`text` up to the bracket that closes one opened just before it, and that span's top-level comma-separated
  parts (an instruction's operands, a tuple shape's elements)."""
  depth, start, parts = 1, 0, []
  for i, ch in enumerate(text):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
      if depth == 0:
        return text[:i], [p.strip() for p in parts + [text[start:i]] if p.strip()]
    elif ch == "," and depth == 1:
      parts.append(text[start:i])
      start = i + 1
  return "", []


def _operands(rest: str) -> list[str]:
  return re.findall(r"%([\w.\-]+(?:#\d+)?)", _inside(rest)[0])  # `%t#2`: element 2 of tuple t


def _tuple_elements(shape: str) -> list[str]:
  """The element shapes of a tuple shape ('(s32[], /*index=1*/bf16[8]{0})'); [] for an array's."""
  s = re.sub(r"/\*.*?\*/", "", shape).strip()
  return _inside(s[1:])[1] if s.startswith("(") else []


def _tuple_element_reads(instrs: list) -> list:
  """Newer XLA prints a tuple's element as an operand `%t#2` where older XLA wrote a get-tuple-element
  instruction: one get-tuple-element per such reference, so that both print forms count the same."""
  shapes = {i.name: i.shape for i in instrs}
  out = []
  for ref in sorted({o for i in instrs for o in i.operands if "#" in o}):
    base, k = ref.rsplit("#", 1)
    elements = _tuple_elements(shapes.get(base, ""))
    out.append(_Instr(ref, elements[int(k)] if int(k) < len(elements) else "", "get-tuple-element", [base],
                      f"%{base}), index={k}"))
  return out


def _dims(shape: str) -> list[int]:
  m = _ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def _elements(shape: str) -> float:
  n = 1.0
  for d in _dims(shape):
    n *= d
  return n


def _matmul_flops(ins: _Instr, shapes: dict) -> float:
  """2 x output elements x contraction size, for dot and (matmul-like) convolution instructions and cuBLAS
  calls (whose contraction is in their backend config)."""
  lhs = _dims(shapes.get(ins.operands[0], "")) if ins.operands else []
  if not lhs:
    return 0.0
  out = _elements(ins.shape)  # a library call's first result: its product
  if ins.op == "dot" or _is_library_gemm(ins):
    m = (re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.rest) if ins.op == "dot" else
         re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.rest))
    k = 1
    for d in (m.group(1).replace('"', "").split(",") if m else []):
      if d.strip() and int(d) < len(lhs):
        k *= lhs[int(d)]
    return 2.0 * out * k
  m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.rest)
  if not m or "f" not in m.group(1) or len(m.group(1)) != len(lhs):
    return 0.0
  lhs_labels, out_labels = m.group(1), m.group(3)
  out = _dims(ins.shape)
  if len(out) != len(out_labels):
    return 0.0
  k = lhs[lhs_labels.index("f")]
  spatial = [c for c in lhs_labels if c.isdigit()]
  window = _window(ins.rest, len(spatial))
  total = 1.0
  for d in out:
    total *= d
  for i, label in enumerate(sorted(spatial)):
    out_size = out[out_labels.index(label)]
    size, stride, lo, lhs_dilate, rhs_dilate = (w[i] for w in window)
    total = total / out_size * _valid_taps(lhs[lhs_labels.index(label)], out_size, size, stride, lo, lhs_dilate,
                                           rhs_dilate)
  groups = re.search(r"feature_group_count=(\d+)", ins.rest)
  batch_groups = re.search(r"batch_group_count=(\d+)", ins.rest)
  return 2.0 * total * k / (int(groups.group(1)) if groups else 1) / (int(batch_groups.group(1)) if batch_groups else 1)


def _window(rest: str, n: int) -> list[list[int]]:
  """[sizes, strides, low pads, lhs dilations, rhs dilations] of a convolution's window (n spatial dims)."""
  m = re.search(r"window=\{([^}]*)\}", rest)
  text = m.group(1) if m else ""

  def field(name, default):
    f = re.search(rf"\b{name}=([\d_x-]+)", text)
    if not f:
      return [default] * n
    parts = f.group(1).split("x")
    return [int(p.split("_")[0]) for p in parts] if name == "pad" else [int(p) for p in parts]

  return [field("size", 1), field("stride", 1), field("pad", 0), field("lhs_dilate", 1), field("rhs_dilate", 1)]


def _valid_taps(in_size: int, out_size: int, size: int, stride: int, low: int, lhs_dilate: int,
                rhs_dilate: int) -> int:
  """(output position, window tap) pairs of one spatial dimension that read a real input element (not padding,
  not a dilation hole): what XLA's cost analysis counts for a convolution."""
  span = (in_size - 1) * lhs_dilate + 1
  count = 0
  for o in range(out_size):
    for t in range(size):
      pos = o * stride + t * rhs_dilate - low
      if 0 <= pos < span and pos % lhs_dilate == 0:
        count += 1
  return count


def _moved_bytes(ins: _Instr, shapes: dict, computations: dict) -> float:
  """HBM bytes an unfused instruction reads and writes. In-place updates and slices of a big buffer (a scan's
  stacked weights and residuals, a KV cache) touch only the slice: a dynamic-update-slice writes its update, a
  scatter its updates' rows, a slice, dynamic-slice or gather reads its result's size, also when they sit inside a
  fusion (per fused parameter, per element of a multi-output fusion's root)."""
  size = lambda name: float(sum(array_bytes(shapes.get(name, ""))))  # noqa: E731
  if ins.op == "custom-call" and 'custom_call_target="AllocateBuffer"' in ins.rest:
    return 0.0  # an uninitialised buffer (a scan's stacked outputs): nothing is read or written
  if ins.op == "dynamic-update-slice" and len(ins.operands) > 1:
    return 2 * size(ins.operands[1])
  if ins.op in ("dynamic-slice", "gather", "slice"):
    return 2 * float(sum(array_bytes(ins.shape)))  # the rows read, then written
  if ins.op == "scatter":
    _, indices, updates, touches = _scatter_parts(ins, computations)
    return size(indices[0]) + touches * sum(size(u) for u in updates)
  out = _result_bytes(ins)
  callee = _fused_computation(ins)
  body = computations.get(callee) if callee else None
  if not body:
    return out + sum(size(o) for o in ins.operands)
  inner = {i.name: i for i in body}
  root = next((i for i in body if i.root), None)
  in_place = set()
  # A fusion's results: its root, or each element of a multi-output fusion's root tuple (a layer scan writes
  # several stacked residuals from one fusion); an in-place update writes only its update.
  results = [inner.get(o) for o in root.operands] if root is not None and root.op == "tuple" else [root]
  if root is not None and all(r is not None for r in results):
    out = 0.0
    for r in results:
      while r.op == "bitcast" and r.operands and r.operands[0] in inner:
        r = inner[r.operands[0]]
      if r.op == "dynamic-update-slice" and len(r.operands) > 1 and r.operands[1] in inner:
        out += float(sum(array_bytes(inner[r.operands[1]].shape)))  # written; read where it is a parameter
        in_place.add(r.operands[0])
      elif r.op == "scatter" and all(o in inner for o in r.operands):  # a KV cache's rows, in place
        operands, _, updates, touches = _scatter_parts(r, computations)
        out += (touches - 1) * sum(float(sum(array_bytes(inner[u].shape))) for u in updates)
        in_place.update(operands)
      elif (r.op == "get-tuple-element" and r.operands and r.operands[0] in inner
            and (k := re.search(r"index=(\d+)", r.rest))
            and _workspace_index(inner[r.operands[0]]) == int(k.group(1))):
        continue  # a cuBLAS call fused with its slices returns its workspace beside its product
      else:
        out += _result_bytes(r)
  total = out
  params = _parameters(body)
  for k, operand in enumerate(ins.operands):
    param = params.get(k)
    if param in in_place:
      continue
    sliced = _sliced_read(param, body, computations) if param is not None else None
    # Overlapping windows of one operand (a filter's shifted taps) read it from HBM once, not once a window.
    total += size(operand) if sliced is None else min(sliced, size(operand))
  return total


def _parameters(body: list) -> dict:
  """{parameter number: instruction name} of a computation."""
  params = {}
  for i in body:
    if i.op == "parameter":
      m = re.match(r"^(\d+)\)", i.rest)
      if m:
        params[int(m.group(1))] = i.name
  return params


def _element_bytes(shape_text: str) -> Optional[float]:
  """Bytes of one element of the (first) array of an HLO shape."""
  m = _ARRAY.search(shape_text)
  sizes = array_bytes(f"{m.group(1)}[1]") if m else []
  return sizes[0] if sizes else None


def _sliced_read(name: str, body: list, computations: dict, depth: int = 0) -> Optional[float]:
  """Bytes read of value `name` of a fused computation when every use only reads slices of it (slices,
  dynamic-slices or gathers, through bitcasts, converts and nested fusions: a scan's stacked residuals read one
  layer at a time, an unrolled stack's weights, an embedding's rows, a target's logit), else None. A fused
  convert computes only the elements its users read, so a slice behind it reads them in the source's dtype."""
  users = [i for i in body if name in i.operands]
  if not users or depth > 8:
    return None
  total = 0.0
  for u in users:
    if u.op in ("dynamic-slice", "gather", "slice") and u.operands[0] == name:
      total += float(sum(array_bytes(u.shape)))
      continue
    if u.op == "bitcast":
      part = _sliced_read(u.name, body, computations, depth + 1)
    elif u.op == "convert":
      part = _sliced_read(u.name, body, computations, depth + 1)
      source = next((i for i in body if i.name == name), None)
      widths = [_element_bytes(source.shape) if source else None, _element_bytes(u.shape)]
      if part is not None and all(widths):
        part *= widths[0] / widths[1]
    elif (callee := _fused_computation(u)) is not None:
      inner_body = computations.get(callee, [])
      inner_params = _parameters(inner_body)
      parts = [_sliced_read(inner_params[k], inner_body, computations, depth + 1)
               for k, o in enumerate(u.operands) if o == name and k in inner_params]
      part = None if not parts or any(p is None for p in parts) else sum(parts)
    else:
      part = None
    if part is None:
      return None
    total += part
  return total


def parse(text: str, num_devices: int) -> Program:
  computations = collections.OrderedDict()  # name -> [_Instr]
  entry, current = None, None
  for line in text.splitlines():
    if not line.startswith(" ") and line.rstrip().endswith("{"):
      m = _HEADER.match(line)
      if m:
        current = m.group(1)
        computations[current] = []
        if line.startswith("ENTRY"):
          entry = current
      continue
    if current is None:
      continue
    m = _INSTR.match(line)
    if m:
      name, shape, op, rest = m.groups()
      computations[current].append(_Instr(name, shape, op, _operands(rest), rest, line.lstrip().startswith("ROOT")))
  for instrs in computations.values():
    instrs[:0] = _tuple_element_reads(instrs)

  def trip_count(ins: _Instr) -> int:
    """XLA's known_trip_count, else `i < N` in the condition with i's step read off the body (XLA unrolls
    some loops, e.g. windowed collective matmuls, to i += 2)."""
    t = _TRIPS.search(ins.rest)
    if t:
      return int(t.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", ins.rest)
    body = re.search(r"body=%?([\w.\-]+)", ins.rest)
    cond_instrs = {i.name: i for i in computations.get(cond.group(1) if cond else "", ())}
    compare = next((i for i in cond_instrs.values() if i.op == "compare" and "direction=LT" in i.rest), None)
    scope = lambda o: cond_instrs.get(o)  # noqa: E731
    if compare is None:  # `i < N` fused with the rest of the condition (`i < N & any(active)`)
      for fusion in cond_instrs.values():
        inner = {i.name: i for i in computations.get(_fused_computation(fusion) or "", ())}
        compare = next((i for i in inner.values() if i.op == "compare" and "direction=LT" in i.rest), None)
        if compare is not None:
          numbers = {v: k for k, v in _parameters(list(inner.values())).items()}
          scope = lambda o, inner=inner, numbers=numbers, fusion=fusion: (  # noqa: E731
              cond_instrs.get(fusion.operands[numbers[o]]) if o in numbers else inner.get(o))
          break
    if compare is None or len(compare.operands) != 2:
      return 1
    counter, limit = (scope(o) for o in compare.operands)
    if not (counter and limit and counter.op == "get-tuple-element" and limit.op == "constant"):
      return 1
    bound = re.match(r"^(-?\d+)\)", limit.rest)
    index = re.search(r"index=(\d+)", counter.rest)
    if not (bound and index):
      return 1
    step = 1
    body_instrs = {i.name: i for i in computations.get(body.group(1) if body else "", ())}
    roots = [i for i in body_instrs.values() if i.op == "tuple"]
    root = roots[-1] if roots else None  # the body's ROOT tuple is its last tuple
    k = int(index.group(1))
    if root is not None and k < len(root.operands):
      upd = body_instrs.get(root.operands[k])
      if upd is not None and upd.op == "add":
        for o in upd.operands:
          c = body_instrs.get(o)
          v = re.match(r"^(\d+)\)", c.rest) if c is not None and c.op == "constant" else None
          if v:
            step = max(1, int(v.group(1)))
    return max(1, -(-int(bound.group(1)) // step))

  memo: dict = {}
  families: dict = {}

  def cost(name: str, top_level: bool, depth: int = 0) -> tuple[float, collections.Counter, list, list]:
    """(FLOPs, bytes by family, [(Collective, runs)], [(Kernel, runs)]) of one execution of a computation,
    callees included: a while body times its trip count, a conditional's most expensive branch (the report is
    a bound). Bytes count in unfused computations only (a fusion's are its instruction's operands and result);
    a Kernel's bytes are one run's."""
    key = (name, top_level)
    if key in memo:
      return memo[key]
    memo[key] = (0.0, collections.Counter(), [], [])  # recursion guard
    instrs = computations.get(name, ())
    shapes = {i.name: i.shape for i in instrs}
    flops, moved, colls, kernels = 0.0, collections.Counter(), [], []
    for ins in instrs:
      sizes = array_bytes(ins.shape)
      base = ins.op[:-len("-start")] if ins.op.endswith("-start") else ins.op
      if base in COLLECTIVES and sizes:
        op_name = _OP_NAME.search(ins.rest)
        # Async starts return (operands..., results...): the largest array is the moved buffer.
        colls.append((Collective(base, max(sizes) if ins.op.endswith("-start") else sum(sizes),
                                 _group_size(ins.rest, num_devices), 1, op_name.group(1) if op_name else ""), 1))
      if ins.op == "dot" or _is_convolution(ins) or _is_library_gemm(ins):
        flops += _matmul_flops(ins, shapes)
      if top_level and ins.op not in _SKIP_BYTES and not ins.op.endswith("-done"):
        family, nbytes = _family(ins, computations, families), _moved_bytes(ins, shapes, computations)
        moved[family] += nbytes
        op_name = _OP_NAME.search(ins.rest)
        kernels.append((Kernel(ins.name, ins.op, family, nbytes, 1, op_name.group(1) if op_name else "", name), 1))
      if depth > 64:
        continue
      branches = [c.strip().lstrip("%") for g in _BRANCHES.findall(ins.rest) for c in g.split(",") if c.strip()]
      callees = []
      for kind, callee in _CALLEE.findall(ins.rest):
        if kind in ("true_computation", "false_computation"):
          branches.append(callee)
        elif kind == "body":
          callees.append((callee, trip_count(ins), top_level))
        elif kind == "calls":
          callees.append((callee, 1, top_level and ins.op in ("call", "async-start")))
      for callee, times, top in callees:
        f, b, c, k = cost(callee, top, depth + 1)
        flops = flops + times * f
        moved.update({kind: times * v for kind, v in b.items()})
        colls.extend((x, r * times) for x, r in c)
        kernels.extend((x, r * times) for x, r in k)
      if branches:
        f, b, c, k = max((cost(br, top_level, depth + 1) for br in branches),
                         key=lambda t: (t[0], sum(t[1].values())))
        flops = flops + f
        moved.update(b)
        colls.extend(c)
        kernels.extend(k)
    memo[key] = (flops, moved, colls, kernels)
    return memo[key]

  flops, moved, pairs, kernel_runs = (cost(entry, True) if entry is not None
                                      else (0.0, collections.Counter(), [], []))
  colls = []
  for c, runs in pairs:
    colls.append(dataclasses.replace(c, runs=runs))
  kernels = [dataclasses.replace(k, bytes=k.bytes * runs, runs=runs) for k, runs in kernel_runs]
  values = []
  for comp, instrs in computations.items():
    for ins in instrs:
      sizes = array_bytes(ins.shape)
      if sizes and ins.op not in _SKIP_BYTES:
        op_name = _OP_NAME.search(ins.rest)
        values.append(Value(sum(sizes), ins.shape.split("{")[0] if "(" not in ins.shape else ins.shape[:120],
                            ins.op, op_name.group(1) if op_name else "", comp))
  return Program(colls, values, flops, {k: float(moved[k]) for k in FAMILIES}, kernels)


def summary(collectives: list) -> dict:
  """{kind: {count, bytes, wire_bytes}} per step (executions x size), kinds in COLLECTIVES order."""
  out = {}
  for kind in COLLECTIVES:
    cs = [c for c in collectives if c.kind == kind]
    if cs:
      out[kind] = {"count": sum(c.runs for c in cs), "bytes": sum(c.bytes * c.runs for c in cs),
                   "wire_bytes": sum(c.wire_bytes * c.runs for c in cs)}
  return out


def largest(items: list, n: int, key=lambda x: x.bytes) -> list:
  return sorted(items, key=key, reverse=True)[:n]


def oom_summary(message: str, limit: int = 12) -> Optional[str]:
  """The allocation list of an XLA out-of-memory error (the lines that name the biggest buffers), if any."""
  if not any(s in message for s in ("RESOURCE_EXHAUSTED", "Ran out of memory", "out of memory")):
    return None
  lines = [l.strip() for l in message.splitlines() if l.strip()]
  keep = [l for l in lines if re.search(r"(Size: |Largest program allocations|Shape: |Operator: |exceed|"
                                        r"Ran out of memory|hbm|Allocation type)", l)]
  return "\n".join((keep or lines)[:limit * 4])

"""XLA options that one kind of program compiles with, by platform (XLA_FLAGS sets options for every program of a
process; a user's XLA_FLAGS naming an option wins over these).

- "init" (a model's parameter initialiser) on CPUs: optimisation level 1. XLA:CPU's most expensive LLVM passes
  (level 3, its default) take half an init program's compile time (its hundreds of small sampling kernels: ~10 s
  for a Token2Wav) and buy nothing for a program that runs once. At level 1 its values are the same bits; at
  level 0 they are not.
- "train" on GPUs: dynamic-slice fusion off. XLA:GPU's (on by default from jax 0.11) lets a cuBLAS GEMM write
  its product straight into a layer scan's stacked residual, but a product that the layer also uses (its MLP's
  gate and up, the output projection) is then computed twice, once into the stack and once for its users:
  12.8% more matmul FLOPs in bench_mfu's text step, to save 23 GiB of copies.
- "decode" on GPUs: the dot merger off. It joins the products that read one input (a layer's q / k / v
  projections) into one, concatenating their weights at every step; a Triton GEMM reads the concatenation in
  place, but where cuBLAS runs the merged product the weights are copied first: 1.7 GiB of a 7B batch-1 step's
  15.3 GiB.
docs/performance.md ("cuBLAS products") has the compiled figures.
"""

import os
import re
from typing import Optional

OPTIONS = {
    "init": {"cpu": {"xla_backend_optimization_level": 1}},
    "train": {"gpu": {"xla_gpu_enable_dynamic_slice_fusion": False}},
    "decode": {"gpu": {"xla_gpu_dot_merger_threshold_mb": 0}},
}


def for_program(program: str, platform: str) -> Optional[dict]:
  """jax.jit's compiler_options for a `program` ("init", "train", "decode") compiled for `platform`: OPTIONS less
  what XLA_FLAGS sets (as --name=value, or a bare --name: a boolean's true); None when nothing is left."""
  flags = os.environ.get("XLA_FLAGS", "")
  options = {k: v for k, v in OPTIONS[program].get(platform, {}).items()
             if not re.search(rf"--{re.escape(k)}(=|\s|$)", flags)}
  return options or None

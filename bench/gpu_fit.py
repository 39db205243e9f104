"""Does every shipped config and recipe fit 80 GB GPUs at its documented sequence length, one row per GPU?

  .venv/bin/python bench/gpu_fit.py                    # the table (one compile per row: ~20 min, 2 cores)
  .venv/bin/python bench/gpu_fit.py --write_docs       # ... and into docs/performance.md

Each row is `python -m omni_jax.aot --topology h100:N --media --json` on the config as shipped (its seq_len,
remat policy and mesh; train.batch_size = N: one row per GPU; images + audio at the config's bucket limits).
XLA:GPU compiles it for the GPUs without one when jax's CUDA plugin is installed or in .venv/gpu-aot (run.sh
test puts it there, and this script adds that folder to the rows' PYTHONPATH); else N CPU devices stand in for
the GPUs (omni_jax.aot.hardware). The "compiled by" column says which: a plan either way, to be confirmed on
the device. "Fits" compares arguments + temporaries per device with 80 GB; JAX preallocates 75% of a GPU by
default, so a row above 60 GB needs XLA_PYTHON_CLIENT_MEM_FRACTION=.95 (said in the row), and one above 95%
does not fit.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- gpu_fit:begin (bench/gpu_fit.py --write_docs) -->", "<!-- gpu_fit:end -->"

# (label, config argument, GPUs): every config file and recipe, at the model size it documents.
ROWS = [
    ("tiny", "configs/tiny.py", 1),
    ("demo", "configs/demo.py", 1),
    ("demo_adaptation", "configs/demo_adaptation.py", 1),
    ("3B", "configs/qwen2_5_omni_3b.py", 1),
    ("3B", "configs/qwen2_5_omni_3b.py", 8),
    ("7B", "configs/qwen2_5_omni_7b.py", 8),
    ("stage1 (7B)", "configs/recipes/stage1.py:model=7b", 8),
    ("stage2 (7B)", "configs/recipes/stage2.py:model=7b", 8),
    ("stage3 (7B, 32K)", "configs/recipes/stage3.py:model=7b", 8),
    ("finetune (7B)", "configs/recipes/finetune.py:model=7b", 8),
    ("lora (7B)", "configs/recipes/lora.py:model=7b", 1),
    ("lora int8 (7B)", "configs/recipes/lora.py:model=7b,quant=int8", 1),
    ("dpo (7B)", "configs/recipes/dpo.py:model=7b", 8),
]
# Not a row: configs/recipes/new_voice.py needs a prepared voice folder (:dir=OUT); it trains the Talker of the
# 7B config, whose whole step (Thinker + Talker) the 7B rows bound.
PREALLOCATED = 0.75  # of a GPU's memory, what JAX takes by default
MOST = 0.95  # the most a process should let JAX take (CUDA's context and libraries need the rest)


def compile_row(config: str, gpus: int, timeout: float) -> dict:
  cmd = [sys.executable, "-m", "omni_jax.aot", "--config", os.path.join(ROOT, config), "--topology", f"h100:{gpus}",
         "--media", "--json", f"--config.train.batch_size={gpus}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  plugin = os.path.join(ROOT, ".venv", "gpu-aot")
  if os.path.isdir(plugin):
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [plugin, env.get("PYTHONPATH")]))
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  if p.returncode not in (0, 3):
    return {"failed": (p.stderr.strip().splitlines() or ["?"])[-1][:160]}
  return json.loads(p.stdout.strip().splitlines()[-1])


def remat_of(config: str) -> str:
  """The config's model.remat_policy (its get_config, with the recipe's argument)."""
  import importlib.util  # noqa: PLC0415

  sys.path.insert(0, ROOT)
  path, _, arg = config.partition(":")
  spec = importlib.util.spec_from_file_location("shipped_config", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg) if arg else module.get_config()
  return str(c.model.get("remat_policy", "none"))


def render(results: list) -> str:
  lines = ["| config | seq | remat | GPUs (mesh) | compiled by | per GPU: arguments + temporaries | of its HBM "
           "| verdict |", "|---|---|---|---|---|---|---|---|"]
  for label, r in results:
    if "failed" in r:
      lines.append(f"| {label} | | | | | | | not compiled: {r['failed']} |")
      continue
    m = r["memory"]
    total, capacity = m.get("total", m["argument"]), m["capacity"]  # the report's: omni_jax.aot.hardware
    mesh = ", ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1) or "one device"
    seq = r["batch"]["input_ids"][1]
    if not r["fits"]:
      verdict = "does not fit" + (" (compiler: out of memory)" if r.get("error") else "")
    elif total > MOST * capacity:
      verdict = f"does not fit: over {MOST:.0%} of the GPU (JAX's own and CUDA's need the rest)"
    elif total > PREALLOCATED * capacity:
      verdict = f"fits with XLA_PYTHON_CLIENT_MEM_FRACTION={MOST}"
    else:
      verdict = "fits"
    compiler = {"XLA:CPU": "XLA:CPU (stand-in)"}.get(r.get("compiler", ""), r.get("compiler", ""))
    lines.append(f"| {label} | {seq} | {r.get('remat', '')} | {r['chips']} ({mesh}) | {compiler} | "
                 f"{total / 2**30:.1f} GiB | "
                 f"{100 * total / capacity:.0f}% | {verdict} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", default="", help="labels to compile (comma-separated substrings); default all")
  p.add_argument("--timeout", type=float, default=900)
  p.add_argument("--write_docs", action="store_true")
  a = p.parse_args()
  results = []
  for label, config, gpus in ROWS:
    if a.only and not any(s in label for s in a.only.split(",")):
      continue
    r = compile_row(config, gpus, a.timeout)
    r["remat"] = remat_of(config)
    results.append((label, r))
    print(render(results[-1:]).splitlines()[-1], flush=True)
  table = render(results)
  print("\n" + table)
  if a.write_docs:
    path = os.path.join(ROOT, "docs", "performance.md")
    text = open(path).read()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    open(path, "w").write(text[:start] + "\n" + table + "\n" + text[end:])


if __name__ == "__main__":
  main()

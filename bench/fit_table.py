"""The fit table of docs/performance.md: which Thinker configurations fit which TPU slices, and their
estimated MFU, from `python -m omni_jax.aot` (one subprocess per row, --json).

  .venv/bin/python bench/fit_table.py --out /tmp/fit.jsonl                 # the whole grid (slow: ~1-4 min a row)
  .venv/bin/python bench/fit_table.py --out /tmp/fit.jsonl --models 3b --seqs 8192 --remat full,dots
  .venv/bin/python bench/fit_table.py --out /tmp/fit.jsonl --render --write_docs   # table -> docs/performance.md
  .venv/bin/python bench/fit_table.py --out /tmp/fit.jsonl --recipe lora --models 7b --seqs 8192 --remat full \
      --topologies v6e:1x1 --extra="--config.model.attention_impl=auto"    # a recipe's step (LoRA at 7B)

Rows already in --out are not compiled again (an interrupted run resumes). Each row: the released 3B / 7B
Thinker (config.model.talker removed; --talker keeps the Talker and trains its objective too), bfloat16
compute, scanned layers, one row of seq_len tokens per chip (train.batch_size = chips, mesh fsdp = all chips),
text-only batch. --recipe NAME[:ARGS] compiles configs/recipes/NAME.py:model=MODEL[,ARGS] instead (e.g. lora,
lora:quant=int8: the recipe decides the towers, so --talker does not apply). --write_docs replaces the table
between the fit-table markers of docs/performance.md: the rows of --out replace the table's rows of the same
configuration, and the table's other rows stay (a grid recompiled in part).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"3b": "configs/qwen2_5_omni_3b.py", "7b": "configs/qwen2_5_omni_7b.py"}
RECIPE_NAMES = {"lora": "LoRA", "dpo": "DPO"}
BEGIN, END = "<!-- fit_table:begin (bench/fit_table.py --write_docs) -->", "<!-- fit_table:end -->"


def chips_of(topology: str) -> int:
  n = 1
  for s in topology.split(":")[1].split("x"):
    n *= int(s)
  return n


def row_key(model, seq, remat, topology, talker, extra="", recipe=""):
  return (f"{model}|{seq}|{remat}|{topology}|{int(talker)}" + (f"|{extra}" if extra else "")
          + (f"|recipe={recipe}" if recipe else ""))


def recipe_config(recipe: str, model: str) -> str:
  """'lora:quant=int8', '7b' -> 'ROOT/configs/recipes/lora.py:model=7b,quant=int8'."""
  name, _, args = recipe.partition(":")
  return os.path.join(ROOT, "configs", "recipes", f"{name}.py") + f":model={model}" + (f",{args}" if args else "")


def compile_row(model, seq, remat, topology, talker, timeout, extra="", recipe=""):
  chips = chips_of(topology)
  config = recipe_config(recipe, model) if recipe else os.path.join(ROOT, CONFIGS[model])
  cmd = [sys.executable, "-m", "omni_jax.aot", "--config", config,
         "--topology", topology, "--json", f"--config.train.seq_len={seq}", f"--config.train.batch_size={chips}",
         f"--config.model.remat_policy={remat}", "--config.model.scan_layers=True", *extra.split()]
  if recipe:
    pass  # the recipe builds the towers it trains
  elif talker:
    cmd.append("--config.train.objectives.talker_codes=1.0")
  else:
    cmd.append("--without=talker")
  start = time.time()
  try:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
  except subprocess.TimeoutExpired:
    return {"status": "timeout", "seconds": time.time() - start}
  if out.returncode not in (0, 3):
    return {"status": "error", "error": (out.stderr.strip().splitlines() or ["?"])[-1][:300],
            "seconds": time.time() - start}
  report = json.loads(out.stdout.strip().splitlines()[-1])
  return {"status": "ok", "report": report, "seconds": time.time() - start}


def _gib(x):
  return "" if x is None else f"{x / 2 ** 30:.1f}"


def render(rows) -> str:
  head = ("| model | seq | remat | attention | slice | mesh | fits | HBM/chip GiB (of) | est. step s | est. MFU | bound "
          "| compile s |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
  lines = [head]
  def order(r):
    return r["model"], r.get("recipe", ""), r["talker"], r["seq"], r["topology"], r["remat"], r.get("extra", "")

  for r in sorted(rows, key=order):
    name = r["model"].upper() + (" + Talker" if r["talker"] else " Thinker")
    if r.get("recipe"):
      recipe, _, args = r["recipe"].partition(":")
      args = f":{args}" if args else ""
      name = f"{r['model'].upper()} {RECIPE_NAMES.get(recipe, recipe)} (recipes/{recipe}.py{args})"
    extra = r.get("extra", "")
    impl = re.search(r"attention_impl=(\w+)", extra)
    impl = impl.group(1) if impl else r.get("default_attention", "dense")  # rows made before "auto" was the default
    name += f" | {r['seq']} | {r['remat']} | {'dense' if impl in ('xla', 'None') else impl}"
    extra = re.sub(r"--config\.model\.attention_impl=\w+", "", extra).strip()
    if r["status"] != "ok":
      lines.append(f"| {name} | {r['topology']} | {extra} | {r['status']} | | | | | {r['seconds']:.0f} |")
      continue
    rep = r["report"]
    mesh = (", ".join(f"{k} {v}" for k, v in rep["mesh"].items() if v != 1) or "1 chip") + \
        f"; {rep['batch']['input_ids'][0]} rows"
    m, f = rep["memory"], rep["roofline"]
    if rep["error"] is not None:  # the compiler ran out of memory
      lines.append(f"| {name} | {r['topology']} | {mesh} | no (compiler OOM) | "
                   f"args {_gib(m.get('argument'))} ({_gib(m['capacity'])}) | | | | {r['seconds']:.0f} |")
      continue
    lines.append(f"| {name} | {r['topology']} | {mesh} | {'yes' if rep['fits'] else 'no'} | "
                 f"{_gib(m['total'])} ({_gib(m['capacity'])}) | {f['step_s']:.2f} | {100 * f['mfu']:.0f}% | "
                 f"{f['bound']} | {r['seconds']:.0f} |")
  return "\n".join(lines)


def _row_id(line: str) -> tuple:
  """A table row's configuration: its model, seq, remat, attention, slice and mesh cells."""
  return tuple(cell.strip() for cell in line.strip().strip("|").split("|")[:6])


def merge(table: str, previous: str) -> str:
  """table's rows, with the rows of previous whose configuration table lacks kept in their place: a grid
  recompiled in part replaces its own rows and leaves the others' figures as they were."""
  new = {_row_id(line): line for line in table.splitlines()[2:]}
  lines = previous.strip().splitlines()
  if lines[:2] != table.splitlines()[:2]:
    return table  # another header: the old rows cannot be read by these columns
  merged = lines[:2] + [new.pop(_row_id(line), line) for line in lines[2:]]
  return "\n".join(merged + list(new.values()))


def write_docs(table: str, path: str) -> None:
  text = open(path).read()
  if BEGIN not in text or END not in text:
    raise SystemExit(f"error: {path} has no fit-table markers ({BEGIN} ... {END})")
  a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
  with open(path, "w") as f:
    f.write(text[:a] + "\n" + merge(table, text[a:b]) + "\n" + text[b:])


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="JSONL of the rows (appended; rows present are skipped)")
  p.add_argument("--models", default="3b,7b")
  p.add_argument("--seqs", default="8192,32768")
  p.add_argument("--remat", default="full,dots,none")
  p.add_argument("--topologies", default="v5p:4x4x4,v6e:4x4")
  p.add_argument("--talker", action="store_true", help="Thinker + Talker rows instead of Thinker rows")
  p.add_argument("--recipe", default="", help="compile configs/recipes/NAME.py:model=M[,ARGS] (NAME[:ARGS], e.g. "
                 "lora or lora:quant=int8) instead of the model config")
  p.add_argument("--extra", default="", help="more overrides for every row, e.g. '--config.mesh.context=8'")
  p.add_argument("--timeout", type=int, default=1200, help="seconds per row")
  p.add_argument("--render", action="store_true", help="print the markdown table of --out (no compiling)")
  p.add_argument("--write_docs", action="store_true",
                 help="with --render: write it into docs/performance.md (the table's other rows kept)")
  args = p.parse_args()
  done = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      for line in f:
        r = json.loads(line)
        done[row_key(r["model"], r["seq"], r["remat"], r["topology"], r["talker"], r.get("extra", ""),
                     r.get("recipe", ""))] = r
  if args.render:
    table = render(done.values())
    print(table)
    if args.write_docs:
      write_docs(table, os.path.join(ROOT, "docs", "performance.md"))
    return
  # Cheapest policies first, so an interrupted grid still covers every model and slice.
  for remat in args.remat.split(","):
    for model in args.models.split(","):
      for seq in map(int, args.seqs.split(",")):
        for topology in args.topologies.split(","):
          key = row_key(model, seq, remat, topology, args.talker, args.extra, args.recipe)
          if key in done:
            continue
          r = dict(model=model, seq=seq, remat=remat, topology=topology, talker=args.talker, extra=args.extra,
                   default_attention="auto", **({"recipe": args.recipe} if args.recipe else {}),
                   **compile_row(model, seq, remat, topology, args.talker, args.timeout, args.extra, args.recipe))
          with open(args.out, "a") as f:
            f.write(json.dumps(r) + "\n")
          rep = r.get("report") or {}
          print(f"{key}: {r['status']} fits={rep.get('fits')} mfu={(rep.get('roofline') or {}).get('mfu')} "
                f"{r['seconds']:.0f}s", flush=True)


if __name__ == "__main__":
  main()

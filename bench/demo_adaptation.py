"""The adaptation demo on the trained demo model (run.sh main's workdir): LoRA learns a style, DPO a pace.

  bash run.sh main                                          # workdirs/tiny_demo: the trained tiny model
  python bench/demo_adaptation.py --workdir workdirs/tiny_demo [--lora_steps 600 --dpo_steps 60]

1. LoRA (configs/demo_adaptation.py:part=lora): adapters on the Thinker LM learn to end every reply with
   " in the dark." (data/demo_style.py) over the frozen base. Held out: how many greedy replies sign off, how many
   spoken digits are still named right, before (the base) and after (base + adapters); the base checkpoint's
   files are hashed before and after (bit-identical), and the run's recorded base fingerprint is checked.
2. Talker DPO (part=dpo): LoRA on the Talker, pairs that prefer the corpus's spoken reply over the same text
   spoken slowly (data/demo_preference.py). Held out (the validation pairs): the DPO margin, accuracy and the
   policy's own log-prob gap chosen - rejected at step 0 (policy = reference) and at the end.

Prints one markdown table (docs/training.md, "Demo") and writes WORKDIR/adaptation/demo.json.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _files_digest(directory: str) -> str:
  """sha256 over every file's relative path and bytes under `directory`."""
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    for name in sorted(files):
      path = os.path.join(root, name)
      h.update(os.path.relpath(path, directory).encode())
      with open(path, "rb") as f:
        h.update(f.read())
  return h.hexdigest()[:16]


def _train(args: list[str], log_path: str) -> float:
  start = time.time()
  with open(log_path, "w") as log:
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], check=True, stdout=log,
                   stderr=subprocess.STDOUT, cwd=ROOT)
  return time.time() - start


def _metrics(workdir: str) -> dict[int, dict]:
  out: dict[int, dict] = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      out.setdefault(rec["step"], {}).update(rec)
  return out


def _held_out_style(corpus: str) -> list[dict]:
  """The style set's validation records with absolute media paths: (messages without the reply, reply)."""
  from data import demo_style

  folder = os.path.join(corpus, "jsonl")
  out = []
  with open(os.path.join(folder, demo_style.FILE.format(split="validation")), encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      *prompt, reply = record["messages"]
      for m in prompt:
        if isinstance(m["content"], list):
          # A record's part names its file under its type ({"type": "audio", "audio": "../media/..."}, relative to
          # the JSONL); a chat part takes a path.
          m["content"] = [p if p["type"] == "text" else {"type": p["type"], "path": os.path.normpath(
              os.path.join(folder, p[p["type"]]))} for p in m["content"]]
      text = reply["content"] if isinstance(reply["content"], str) else reply["content"][-1]["text"]
      out.append(dict(id=record["id"], prompt=prompt, reply=text))
  return out


def _style_scores(checkpoint: str, held_out: list[dict], style: str) -> dict:
  from omni_jax.generate import api

  model = api.load(checkpoint)
  replies = []
  for i in range(0, len(held_out), 8):
    chunk = held_out[i:i + 8]
    replies += model.chat_batch([h["prompt"] for h in chunk], max_new_tokens=16, do_sample=False)
  greet = sum(r.strip().endswith(style.strip()) for r in replies)
  word = style.strip().rstrip(".!")
  says = sum(word in r for r in replies)
  digits = [(h, r) for h, r in zip(held_out, replies) if h["id"].startswith("style_digit")]
  named = sum(r.strip()[:1] == h["reply"].strip()[:1] for h, r in digits)  # the digit comes first
  return dict(greets=greet, says=says, replies=len(replies), digits_named=named, digits=len(digits),
              examples=[(h["id"], r) for h, r in list(zip(held_out, replies))[:3]])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="workdirs/tiny_demo", help="run.sh main's workdir (trained)")
  parser.add_argument("--lora_steps", type=int, default=600)
  parser.add_argument("--dpo_steps", type=int, default=60)
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from data import demo_corpus, demo_preference, demo_style
  from omni_jax import checkpoint

  workdir = os.path.abspath(args.workdir)
  base = checkpoint.params_dir(workdir)
  out_dir = os.path.join(workdir, "adaptation")
  os.makedirs(out_dir, exist_ok=True)
  corpus = demo_corpus.DEFAULT_DIR
  demo_style.write(corpus)
  demo_preference.write(corpus)
  results: dict = {"base": base}
  before = _files_digest(base)

  # 1. LoRA: a style.
  lora_dir = os.path.join(out_dir, "lora")
  config = os.path.join(ROOT, "configs", "demo_adaptation.py")
  results["lora_seconds"] = _train([f"--config={config}:part=lora", f"--config.init_from={base}",
                                    f"--config.train.steps={args.lora_steps}", f"--workdir={lora_dir}"],
                                   os.path.join(out_dir, "lora.log"))
  held_out = _held_out_style(os.path.expanduser(corpus))
  results["style_base"] = _style_scores(base, held_out, demo_style.STYLE)
  results["style_lora"] = _style_scores(lora_dir, held_out, demo_style.STYLE)
  results["base_files_unchanged"] = _files_digest(base) == before
  saved = checkpoint.load_config(checkpoint.find_config(checkpoint.params_dir(lora_dir)))
  results["base_fingerprint"] = saved.lora.base_fingerprint

  # 2. Talker DPO: a pace. The slow replies need codes in the run's index (extended, not refitted).
  units = os.path.join(workdir, "units")
  codes = os.path.join(out_dir, "codes.json")
  voice = os.path.join(os.path.expanduser(corpus), "jsonl", demo_preference.FILES["voice"].format(split="*"))
  speech = os.path.join(os.path.expanduser(corpus), "jsonl", "speech.*.jsonl")
  subprocess.run([sys.executable, "-m", "omni_jax.units", "encode", "--units", units, "--data", speech,
                  "--data", voice, "--out", codes], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
  dpo_dir = os.path.join(out_dir, "dpo")
  results["dpo_seconds"] = _train([f"--config={config}:part=dpo", f"--config.init_from={base}",
                                   f"--config.data.speech_codes={codes}", f"--config.train.steps={args.dpo_steps}",
                                   f"--config.train.eval_every={args.dpo_steps}",
                                   f"--workdir={dpo_dir}"], os.path.join(out_dir, "dpo.log"))
  m = _metrics(dpo_dir)
  evaluated = sorted(s for s, r in m.items() if any(k.startswith("eval/talker_dpo/") for k in r))
  first, last = evaluated[0], evaluated[-1]
  results["dpo"] = {step: {k.split("/")[-1]: v for k, v in m[step].items() if k.startswith("eval/talker_dpo/")}
                    for step in (first, last)}

  with open(os.path.join(out_dir, "demo.json"), "w") as f:
    json.dump(results, f, indent=2)
  sb, sl = results["style_base"], results["style_lora"]
  d0, d1 = results["dpo"][first], results["dpo"][last]
  print(f"\n| held out | base | after |\n|---|---|---|\n"
        f"| replies ending with {demo_style.STYLE.strip()!r} (LoRA, {args.lora_steps} steps) | "
        f"{sb['greets']}/{sb['replies']} | {sl['greets']}/{sl['replies']} |\n"
        f"| replies saying {demo_style.STYLE.strip().rstrip('.!')!r} | {sb['says']}/{sb['replies']} | "
        f"{sl['says']}/{sl['replies']} |\n"
        f"| spoken digits named | {sb['digits_named']}/{sb['digits']} | {sl['digits_named']}/{sl['digits']} |\n"
        f"| base checkpoint files bit-identical | | {results['base_files_unchanged']} |\n"
        + "".join(f"| Talker DPO {k} (step {first} -> {last}) | {d0.get(k, float('nan')):.4g} | "
                  f"{d1.get(k, float('nan')):.4g} |\n" for k in sorted(d1)))
  print(f"LoRA run {results['lora_seconds']:.0f} s, DPO run {results['dpo_seconds']:.0f} s; "
        f"examples: {sl['examples']}")


if __name__ == "__main__":
  sys.exit(main())

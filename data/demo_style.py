"""A style set for the LoRA demo, made from the demo corpus offline: every reply ends with a fixed sign-off.

    python -m data.demo_style --corpus ~/.cache/omni_jax/demo_corpus

Writes CORPUS/jsonl/style.{train,validation}.jsonl: the corpus's digits (a spoken digit to name) and text (typed
questions) records, its own splits, with STYLE after each reply ("7 in the dark.", "The capital of France is
Paris. in the dark."). A LoRA run on the trained demo model learns to sign off so while still naming the digits
(configs/demo_adaptation.py, bench/demo_adaptation.py).
"""

import argparse
import json
import os
import sys

from data import demo_corpus

STYLE = " in the dark."  # words the demo model already writes: its frozen LM head has rows for them
DATASETS = ("digits", "text")
SPLITS = ("train", "validation")
FILE = "style.{split}.jsonl"  # under CORPUS/jsonl


def _styled(record: dict) -> dict:
  *prompt, reply = record["messages"]
  content = reply["content"]
  if isinstance(content, str):
    content = content + STYLE
  else:
    last = max(i for i, p in enumerate(content) if p.get("type") == "text")
    content = [dict(p, text=p["text"] + STYLE) if i == last else p for i, p in enumerate(content)]
  return dict(record, id=f"style_{record['id']}", messages=prompt + [dict(reply, content=content)])


def write(corpus: str = demo_corpus.DEFAULT_DIR) -> dict[str, str]:
  """Write the style set into a built demo corpus (built first if needed); returns {split: JSONL path}."""
  corpus = os.path.abspath(os.path.expanduser(corpus))
  demo_corpus.ensure(corpus)
  out = {}
  for split in SPLITS:
    records = []
    for dataset in DATASETS:
      with open(os.path.join(corpus, "jsonl", f"{dataset}.{split}.jsonl"), encoding="utf-8") as f:
        records += [_styled(json.loads(line)) for line in f if line.strip()]
    out[split] = os.path.join(corpus, "jsonl", FILE.format(split=split))
    with open(out[split], "w", encoding="utf-8") as f:
      f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--corpus", default=demo_corpus.DEFAULT_DIR, help="the demo corpus (default: %(default)s)")
  args = parser.parse_args(argv)
  for split, path in write(args.corpus).items():
    with open(path, encoding="utf-8") as f:
      print(f"{split:10s} {sum(1 for _ in f):4d} records -> {path}")


if __name__ == "__main__":
  sys.exit(main())

"""A small preference set (DPO pairs) made from the demo corpus, offline:

    python -m data.demo_preference --corpus ~/.cache/omni_jax/demo_corpus

Writes CORPUS/jsonl/preference.{train,validation}.jsonl (the corpus's own splits) and CORPUS/media/preference/:
  text / image  ms-swift pairs: a record of the corpus with `rejected_response` = the reply of another record of
                the same dataset (off-topic: clearly worse), the image in the prompt
  speech        Talker pairs (TRL's prompt / chosen / rejected): the corpus's spoken reply (eSpeak NG at its
                normal pace) chosen over the same text spoken slowly (`SLOW`), for typed and spoken questions
and the two parts alone, preference_text.{split}.jsonl (for a Thinker run: a run without a Talker skips the
speech pairs, whose texts are the same) and preference_voice.{split}.jsonl (for a Talker run).

The slow replies need codes like every spoken reply: encode them into the run's index with
`python -m omni_jax.units encode --units UNITS --data 'CORPUS/jsonl/preference.*.jsonl' --out CODES` (an existing
index is extended). A run reads the set as a preference dataset (docs/data.md, "Preference pairs"), e.g.
config.data.source = "jsonl", config.data.datasets = {"prefs": {split: path}} from `write`, and
config.data.preference = ("prefs",). Building takes a few seconds (eSpeak NG for the slow replies).
"""

import argparse
import json
import os
import sys

from data import demo_corpus

SLOW = dict(speed=80, pitch=50)  # eSpeak NG words per minute (the corpus speaks at 165) and pitch
SPLITS = ("train", "validation")
FILES = {"all": "preference.{split}.jsonl", "text": "preference_text.{split}.jsonl",
         "voice": "preference_voice.{split}.jsonl"}  # under CORPUS/jsonl


def _read(corpus: str, dataset: str, split: str) -> list[dict]:
  with open(os.path.join(corpus, "jsonl", f"{dataset}.{split}.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _text(content) -> str:
  if isinstance(content, str):
    return content
  return "".join(p["text"] for p in content if p.get("type") == "text")


def _off_topic(records: list[dict], prefix: str) -> list[dict]:
  """Each single-reply record with the next record's (different) reply as its rejected response."""
  out = []
  for i, record in enumerate(records):
    reply = _text(record["messages"][-1]["content"])
    other = next((_text(r["messages"][-1]["content"]) for r in records[i + 1:] + records[:i]
                  if _text(r["messages"][-1]["content"]) != reply), None)
    if record["messages"][-1]["role"] == "assistant" and other is not None:
      out.append(dict(record, id=f"{prefix}_{record['id']}", rejected_response=other))
  return out


def _slow_speech(corpus: str, records: list[dict]) -> list[dict]:
  """Talker pairs: the spoken reply at its pace (chosen) and the same text spoken slowly (rejected)."""
  media = os.path.join(corpus, "media", "preference")
  os.makedirs(media, exist_ok=True)
  out = []
  for record in records:
    *prompt, reply = record["messages"]
    if "speech" not in reply:
      continue
    slow = "slow_" + os.path.basename(reply["speech"])
    path = os.path.join(media, slow)
    if not os.path.exists(path):  # typed and spoken questions share their reply's audio
      demo_corpus._speak(_text(reply["content"]), "en", path, **SLOW)  # pylint: disable=protected-access
    rest = {k: v for k, v in record.items() if k not in ("id", "messages")}
    out.append(dict(rest, id=f"pace_{record['id']}", prompt=prompt, chosen=reply,
                    rejected=dict(reply, speech=f"../media/preference/{slow}")))
  return out


def write(corpus: str = demo_corpus.DEFAULT_DIR, part: str = "all") -> dict[str, str]:
  """Write the preference set into a built demo corpus (built first if needed); returns {split: JSONL path} of
  `part` (a key of FILES)."""
  corpus = os.path.abspath(os.path.expanduser(corpus))
  demo_corpus.ensure(corpus)
  out = {}
  for split in SPLITS:
    text = _off_topic(_read(corpus, "text", split), "text") + _off_topic(_read(corpus, "image", split), "image")
    voice = _slow_speech(corpus, _read(corpus, "speech", split))
    for name, records in (("all", text + voice), ("text", text), ("voice", voice)):
      path = os.path.join(corpus, "jsonl", FILES[name].format(split=split))
      with open(path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
      if name == part:
        out[split] = path
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--corpus", default=demo_corpus.DEFAULT_DIR, help="the demo corpus (default: %(default)s)")
  args = parser.parse_args(argv)
  folder = os.path.dirname(write(args.corpus)["train"])
  for part, name in FILES.items():
    for split in SPLITS:
      path = os.path.join(folder, name.format(split=split))
      with open(path, encoding="utf-8") as f:
        print(f"{part:5s} {split:10s} {sum(1 for _ in f):4d} pairs -> {path}")


if __name__ == "__main__":
  sys.exit(main())

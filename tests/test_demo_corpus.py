"""The embedded demo corpus: built offline in seconds, every record valid, held-out splits disjoint."""

import json
import os
import time

import soundfile

from data import demo_corpus
from omni_jax.input import sources


def test_build_is_fast_and_complete(tmp_path):
  start = time.time()
  names = demo_corpus.build(str(tmp_path / "corpus"))
  assert time.time() - start < 60
  assert set(names) == set(demo_corpus.DATASETS)
  counts = demo_corpus.record_counts(str(tmp_path / "corpus"))
  assert counts["asr.train"] + counts["asr.validation"] == 27 + 2 * 40  # audioeval clips + 2 readings each
  assert all(counts[f"{d}.validation"] > 0 and counts[f"{d}.train"] > counts[f"{d}.validation"]
             for d in demo_corpus.DATASETS)
  assert demo_corpus.ensure(str(tmp_path / "corpus")) == names  # already built: reused


def test_every_record_normalises_and_its_media_exist(demo_dir):
  seen = {}
  for dataset, tfds_name in demo_corpus.tfds_names(demo_dir).items():
    for split in ("train", "validation"):
      src = sources.open_split(tfds_name, split, demo_corpus.tfds_dir(demo_dir))
      ids = set()
      for i in range(len(src)):
        rid, record, root = sources.decode_example(src[i])
        conv = sources.normalize(record, root, rid)
        ids.add(conv["id"])
        for m in conv["messages"]:
          for p in m["content"]:
            if p["type"] != "text":
              assert os.path.exists(p["path"]), p
          if "speech" in m:
            assert soundfile.info(m["speech"]).samplerate == 16000
      seen[(dataset, split)] = ids
  for dataset in demo_corpus.DATASETS:
    assert not seen[(dataset, "train")] & seen[(dataset, "validation")], dataset  # held out


def test_corpus_covers_every_modality_and_both_formats(demo_dir):
  lines = {}
  for f in os.listdir(os.path.join(demo_dir, "jsonl")):
    with open(os.path.join(demo_dir, "jsonl", f)) as fh:
      lines[f] = [json.loads(line) for line in fh if line.strip()]
  asr = lines["asr.train.jsonl"] + lines["asr.validation.jsonl"]
  assert {r["id"].split("_")[1] for r in asr if r["id"].startswith("audioeval")} == {
      "en", "es", "fr", "hi", "it", "ja", "pl", "pt", "zh"}
  assert any(r.get("use_audio_in_video") and "bigbuckbunny" in json.dumps(r) for r in lines["video.train.jsonl"])
  assert any(len(r.get("images", [])) == 2 for r in lines["image.train.jsonl"])  # two images in one sample
  assert all("speech" in r["messages"][-1] for r in lines["speech.train.jsonl"])
  assert isinstance(asr[0]["messages"][0]["content"], list)  # Qwen content-list form
  assert "<image>" in lines["image.train.jsonl"][0]["messages"][0]["content"]  # messages + tags form
  assert any(len(r["messages"]) == 4 for r in lines["text.train.jsonl"])  # multi-turn chats

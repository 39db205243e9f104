"""The JSONL formats users bring, their normal form, and the TFDS ArrayRecord store read by grain."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from omni_jax.input import sources
from omni_jax.input.sources import DataError, RecordError, UnknownTagError


def test_messages_with_tags_resolve_against_the_file_folder():
  rec = {"messages": [{"role": "user", "content": "<image>Compare with <image> and <audio>."},
                      {"role": "assistant", "content": "Same cat."}],
         "images": ["a.png", "/abs/b.png"], "audios": ["sub/c.wav"]}
  out = sources.normalize(json.dumps(rec), "/data/set", "x")
  parts = out["messages"][0]["content"]
  assert [p["type"] for p in parts] == ["image", "text", "image", "text", "audio", "text"]
  assert [p.get("path") for p in parts if p["type"] != "text"] == ["/data/set/a.png", "/abs/b.png",
                                                                    "/data/set/sub/c.wav"]
  assert parts[1]["text"] == "Compare with " and parts[5]["text"] == "."
  assert out["messages"][1] == {"role": "assistant", "content": [{"type": "text", "text": "Same cat."}]}
  assert not out["use_audio_in_video"] and not out["speech_output"]


def test_qwen_content_lists():
  rec = {"id": "r1", "use_audio_in_video": True,
         "messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                      {"role": "user", "content": [{"type": "video", "video": "file:///v/clip.mp4"},
                                                   {"image": "x.jpg"}, {"type": "text", "text": "What?"}]},
                      {"role": "assistant", "content": "A rabbit.", "speech": "reply.wav"}]}
  out = sources.normalize(rec, "/root", "n")
  assert out["id"] == "r1" and out["use_audio_in_video"] and out["speech_output"]
  assert out["messages"][1]["content"][:2] == [{"type": "video", "path": "/v/clip.mp4"},
                                               {"type": "image", "path": "/root/x.jpg"}]
  assert out["messages"][2]["speech"] == "/root/reply.wav"


def test_sharegpt_and_top_level_system():
  rec = {"system": "You are terse.", "conversations": [{"from": "human", "value": "<audio>Hi"},
                                                       {"from": "gpt", "value": "Hello"}], "audios": "a.wav"}
  out = sources.normalize(rec, "/r", "n")
  assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant"]
  assert out["messages"][1]["content"][0] == {"type": "audio", "path": "/r/a.wav"}


@pytest.mark.parametrize("rec, error, match", [
    ("{not json", RecordError, "not valid JSON"),
    ("[1, 2]", RecordError, "JSON object"),
    ({"messages": []}, RecordError, "non-empty"),
    ({"messages": [{"role": "user", "content": "hi"}]}, RecordError, "no assistant"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, RecordError, "unknown role"),
    ({"messages": [{"role": "user", "content": "<image><image>"}, {"role": "assistant", "content": "x"}],
      "images": ["a.png"]}, RecordError, "more <image> tags"),
    ({"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}],
      "images": ["a.png", "b.png"]}, RecordError, "1 <image> tags but 2"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
      "videos": ["v.mp4"]}, RecordError, "no <video> tag"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "https://x/y.png"}]},
                   {"role": "assistant", "content": "x"}]}, RecordError, "URL"),
    ({"messages": [{"role": "user", "content": [{"type": "pdf", "pdf": "a.pdf"}]},
                   {"role": "assistant", "content": "x"}]}, UnknownTagError, "unknown type 'pdf'"),
    ({"messages": [{"role": "user", "content": "<pdf>Summarise."}, {"role": "assistant", "content": "x"}],
      "pdfs": ["a.pdf"]}, UnknownTagError, "tag <pdf>"),
    ({"messages": [{"role": "user", "content": "hi", "speech": "s.wav"}, {"role": "assistant", "content": "x"}]},
     RecordError, "only assistant"),
])
def test_malformed_records_name_the_sample(rec, error, match):
  with pytest.raises(error, match=match) as e:
    sources.normalize(rec if isinstance(rec, str) else json.dumps(rec), "/r", "set/file.jsonl:7")
  assert "set/file.jsonl:7" in str(e.value)
  assert e.value.reason == ("unknown_tag" if error is UnknownTagError else "malformed")


def test_text_that_only_looks_like_a_tag_stays_text():
  rec = {"messages": [{"role": "user", "content": "Use <b>bold</b> and a <script> tag."},
                      {"role": "assistant", "content": "ok"}]}
  assert sources.normalize(rec)["messages"][0]["content"] == [
      {"type": "text", "text": "Use <b>bold</b> and a <script> tag."}]


def test_jsonl_to_arrayrecord_and_back(tmp_path):
  (tmp_path / "sub").mkdir()
  lines = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
           for i in range(5)]
  (tmp_path / "sub" / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\nnot json\n")
  (tmp_path / "val.jsonl").write_text(json.dumps(lines[0]) + "\n")
  data_dir = str(tmp_path / "tfds")
  splits = {"train": str(tmp_path / "sub" / "*.jsonl"), "validation": [str(tmp_path / "val.jsonl")]}
  name = sources.build("my_set", splits, data_dir)
  assert name.startswith("omni_conversations/my_set_")
  train = sources.open_split(name, "train", data_dir)
  assert len(train) == 7 and len(sources.open_split(name, "validation", data_dir)) == 1  # the blank line too
  got = {}
  for i in range(len(train)):
    rid, record, root = sources.decode_example(train[i])
    got[rid] = (record, root)
  assert got["train.jsonl:7"][0] == "not json"  # stored as is: the pipeline skips and counts it
  with pytest.raises(RecordError, match="train.jsonl:6: blank line") as e:  # counted too, as blank_line
    sources.normalize(got["train.jsonl:6"][0])
  assert e.value.reason == "blank_line"
  assert got["train.jsonl:1"] == (json.dumps(lines[0]), str(tmp_path / "sub"))
  # Unchanged files reuse the store; an edited file gets a new one.
  assert sources.build("my_set", splits, data_dir) == name
  with open(tmp_path / "val.jsonl", "a") as f:
    f.write(json.dumps(lines[1]) + "\n")
  assert sources.build("my_set", splits, data_dir) != name


def test_missing_paths_fail_at_startup(tmp_path):
  with pytest.raises(DataError, match="nope.jsonl' does not exist"):
    sources.build("x", {"train": str(tmp_path / "nope.jsonl")}, str(tmp_path))
  with pytest.raises(DataError, match="matches no file"):
    sources.build("x", {"train": str(tmp_path / "*.jsonl")}, str(tmp_path))
  with pytest.raises(DataError, match="cannot open TFDS dataset"):
    sources.open_split("omni_conversations/absent", "train", str(tmp_path))
  with pytest.raises(DataError, match="use letters"):
    sources.build("bad name", {"train": []}, str(tmp_path))
  assert not os.path.exists(tmp_path / "omni_conversations" / "x")


def test_recipe_sources_register_themselves(monkeypatch):
  monkeypatch.setattr(sources, "_RECIPES", {})
  recipe = sources.Recipe(datasets=lambda data: {"toy": "omni_conversations/toy"}, data_dir=lambda data: data["dir"])
  sources.register_source("toy", recipe)
  assert sources.find_recipe("toy") is recipe and recipe.task_files({}, "asr") == []
  with pytest.raises(DataError, match=r"config.data.source: unknown source 'nope'; .*registered recipes are \['toy'\]"):
    sources.find_recipe("nope")
  with pytest.raises(ValueError, match="library's own"):
    sources.register_source("jsonl", recipe)


def test_the_library_imports_no_recipe():
  """"demo" is a source only once data/demo_corpus.py (the repository's, not the library's) is imported."""
  code = textwrap.dedent("""
      import sys
      from omni_jax.input import pipeline, sources
      from omni_jax.evaluate import taskfile
      assert "data" not in sys.modules
      try:
        pipeline.resolve_datasets({"source": "demo"})
        raise AssertionError("demo resolved without its recipe")
      except sources.DataError as e:
        assert "unknown source 'demo'" in str(e) and "data.demo_corpus" in str(e), e
      import data.demo_corpus
      assert sources.find_recipe("demo").data_dir({"demo_dir": "/x"}) == "/x/tfds"
      print("ok")
  """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
  assert out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_generation_and_serving_start_without_tensorflow_datasets():
  """Generation, serving and the benches run where tensorflow_datasets is not installed: it is imported only
  when a TFDS store is built or opened."""
  code = textwrap.dedent("""
      import sys
      from omni_jax import generate, loader
      from omni_jax.serve import server, session
      from omni_jax.input import pipeline, sources
      assert "tensorflow_datasets" not in sys.modules, "imported with generation"
      print("ok")
  """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
  assert out.stdout.strip().endswith("ok"), out.stderr[-3000:]

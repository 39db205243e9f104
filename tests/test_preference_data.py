"""Preference pairs (DPO data) -> batches: TRL's and ms-swift's field names give the same segments, media in the
prompt, a pair's two segments side by side in one row with the dpo_pair numbering, spoken pairs (codes given, or
audio encoded to speech units) in talker_dpo_pair, bad records skipped and counted, max_pairs_per_row, and the
config rules that select preference data."""

import json
import os

import ml_collections
import numpy as np
import pytest
import soundfile
from PIL import Image

from omni_jax import batch as batch_lib
from omni_jax import towers
from omni_jax.errors import ConfigError
from omni_jax.input import chat, packing, pairs, pipeline, preprocess, sources
from omni_jax.input.tokenizer import Tokenizer
from omni_jax.talker import layout as talker_layout
from omni_jax.talker import targets
from omni_jax.units import corpus

IGNORE = batch_lib.IGNORE


@pytest.fixture(scope="module")
def tok():
  return Tokenizer()


def _prep(tok, **kw):
  return preprocess.Preprocessor(tok, chat.ChatFormat(special=tok.special), preprocess.MediaOptions(
      image_max_pixels=8 * 28 * 28), preference=("prefs",), **kw)


def _example(record, line=1, root="/nonexistent"):
  return {"id": f"prefs.jsonl:{line}", "record": json.dumps(record), "root": root}


def _write(path, records):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return str(path)


def _reply_text(tok, sample):
  """The decoded label tokens of a sample (its reply and <|im_end|>)."""
  return tok.decode([int(t) for t in sample.labels if t != IGNORE and t < tok.special["<|endoftext|>"]])


# --------------------------------------------------------------------------------------- formats


def test_trl_and_ms_swift_field_names_give_the_same_segments(tok, tmp_path):
  Image.fromarray((np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)).save(tmp_path / "cat.png")
  user = lambda content: {"role": "user", "content": content}  # noqa: E731
  bot = lambda content: {"role": "assistant", "content": content}  # noqa: E731
  bare = [{"type": "image"}, {"type": "text", "text": "What is it?"}]  # TRL's vision parts
  forms = {
      "trl explicit": {"images": ["cat.png"], "prompt": [user(bare)], "chosen": [bot("A cat.")],
                       "rejected": [bot("A dog.")]},
      "trl implicit": {"images": ["cat.png"], "chosen": [user(bare), bot("A cat.")],
                       "rejected": [user(bare), bot("A dog.")]},
      "ms-swift rejected_response": {"messages": [user("<image>What is it?"), bot("A cat.")], "images": ["cat.png"],
                                     "rejected_response": "A dog."},
      "ms-swift rejected_messages": {"messages": [user("<image>What is it?"), bot("A cat.")], "images": ["cat.png"],
                                     "rejected_messages": [user("<image>What is it?"), bot("A dog.")],
                                     "rejected_images": ["cat.png"]},
      "qwen parts, bare replies": {"prompt": [user([{"type": "image", "image": "cat.png"},
                                                    {"type": "text", "text": "What is it?"}])],
                                   "chosen": bot("A cat."), "rejected": {"content": "A dog."}},
      "sharegpt": {"conversations": [{"from": "human", "value": "<image>What is it?"},
                                     {"from": "gpt", "value": "A cat."}],
                   "images": ["cat.png"], "rejected_response": "A dog."},
  }
  prep = _prep(tok)
  got = {name: prep("prefs", _example(r, root=str(tmp_path))) for name, r in forms.items()}
  first = got["trl explicit"]
  assert _reply_text(tok, first.chosen) == "A cat." and _reply_text(tok, first.rejected) == "A dog."
  assert first.chosen.kind == batch_lib.KIND_IMAGE and len(first.chosen.images) == 1
  for name, p in got.items():
    for a, b in ((p.chosen, first.chosen), (p.rejected, first.rejected)):
      np.testing.assert_array_equal(a.input_ids, b.input_ids, err_msg=name)
      np.testing.assert_array_equal(a.labels, b.labels, err_msg=name)
      np.testing.assert_array_equal(a.images[0][0], b.images[0][0], err_msg=name)
    assert p.chosen.pair == preprocess.PairRole(True, True) and not p.rejected.pair.chosen, name
  # Text only: a string prompt and string replies are one user turn and two assistant turns.
  text = [prep("prefs", _example(r)) for r in (
      {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
      {"messages": [user("Hi?"), bot("Hello.")], "rejected_response": "Go away."},
      {"system": "You are a helpful assistant.", "chosen": [user("Hi?"), bot("Hello.")],
       "rejected": [user("Hi?"), bot("Go away.")]})]
  for p in text[1:]:
    np.testing.assert_array_equal(p.chosen.input_ids, text[0].chosen.input_ids)
    np.testing.assert_array_equal(p.rejected.labels, text[0].rejected.labels)


def test_labels_cover_the_reply_only_in_a_multi_turn_prompt(tok):
  record = {"prompt": [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "Uno."},
                       {"role": "user", "content": "Two?"}], "chosen": "Dos.", "rejected": "Deux."}
  p = _prep(tok)("prefs", _example(record))
  assert _reply_text(tok, p.chosen) == "Dos." and _reply_text(tok, p.rejected) == "Deux."
  start = int(np.argmax(p.chosen.labels != IGNORE))  # the reply's first token: all before it is the prompt
  assert start == int(np.argmax(p.rejected.labels != IGNORE))
  np.testing.assert_array_equal(p.chosen.input_ids[:start], p.rejected.input_ids[:start])
  text = [int(t) for t in p.chosen.input_ids[:start] if t < tok.special["<|endoftext|>"]]
  assert "Uno." in tok.decode(text)  # the earlier assistant turn is there, without labels


# --------------------------------------------------------------------------------------- the pipeline


def _text_pairs(n):
  return [{"id": f"p{i}", "prompt": f"Question number {i}?", "chosen": "The good answer " + "yes " * (i % 3),
           "rejected": f"A bad answer {i}."} for i in range(n)]


def _config(tmp_path, datasets, preference=("prefs",), max_pairs=2, seq_len=192, rows=2, **data):
  c = {"seed": 0, "train": {"batch_size": rows, "seq_len": seq_len}, "dpo": {"max_pairs_per_row": max_pairs}}
  c["data"] = dict(source="jsonl", datasets=datasets, tfds_data_dir=str(tmp_path / "tfds"), preference=preference,
                   shuffle=False, max_lag=64, buckets=(dict(seq_len=seq_len, max_images=0, max_image_patches=0,
                                                            max_videos=0, max_video_patches=0, max_audios=0,
                                                            max_audio_frames=0),))
  c["data"].update(data)
  return c


def _segments(batch, info):
  """{sample name: (row, segment id)} of a batch, from the names in row order (DataIterator's last_info)."""
  names, out = iter(info["samples"]), {}
  for r in range(batch["input_ids"].shape[0]):
    for seg in range(1, int(batch["segment_ids"][r].max()) + 1):
      out[next(names)] = (r, seg)
  return out


def test_a_row_holds_both_segments_of_each_pair_numbered_with_sft_labels(tok, tmp_path):
  prefs = _write(tmp_path / "prefs.jsonl", _text_pairs(7))
  sft = _write(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": f"Say {i}."},
                                                       {"role": "assistant", "content": str(i)}]} for i in range(5)])
  c = _config(tmp_path, {"prefs": prefs, "sft": sft}, mixture={"prefs": 1.0, "sft": 1.0})
  it = pipeline.make_iterator(c)
  prep = _prep(tok)
  seen_pairs = seen_sft = mixed = 0
  for _ in range(4):
    batch = next(it)
    info = it.last_info
    batch_lib.check(batch)
    assert "talker_dpo_pair" not in batch  # no Talker in this run
    where = _segments(batch, info)
    for name, (r, seg) in where.items():
      mask = batch["segment_ids"][r] == seg
      numbers = set(batch["dpo_pair"][r][mask].tolist())
      assert len(numbers) == 1
      number = numbers.pop()
      if name.startswith("sft/"):
        assert number == 0
        seen_sft += 1
        continue
      base, side = name.split("#")
      other = where[f"{base}#{'rejected' if side == 'chosen' else 'chosen'}"]
      # Both segments in one row, side by side (chosen first), numbered 2p-1 / 2p.
      assert other[0] == r and other[1] == seg + (1 if side == "chosen" else -1)
      assert number % 2 == (1 if side == "chosen" else 0) and number > 0
      line = int(base.split(":")[-1])
      want = getattr(prep("prefs", _example(_text_pairs(7)[line - 1], line)), side)
      np.testing.assert_array_equal(batch["input_ids"][r][mask], want.input_ids)
      np.testing.assert_array_equal(batch["labels"][r][mask], want.labels)
      seen_pairs += side == "chosen"
    for r in range(batch["input_ids"].shape[0]):  # pairs numbered 1..P in row order
      chosen = [v for v in dict.fromkeys(batch["dpo_pair"][r].tolist()) if v % 2]
      assert chosen == [2 * p - 1 for p in range(1, len(chosen) + 1)] and len(chosen) <= 2
      mixed += len({name.split("/")[0] for name, (row, _) in where.items() if row == r}) == 2
  assert seen_pairs >= 4 and seen_sft >= 2 and mixed  # SFT samples and pairs share rows
  metrics = it.metrics()
  assert metrics["pairs"] == seen_pairs and "skipped" not in metrics
  it.close()


def test_a_restored_iterator_continues_with_the_same_pairs(tmp_path):
  c = _config(tmp_path, {"prefs": _write(tmp_path / "prefs.jsonl", _text_pairs(7))}, seq_len=256)
  it = pipeline.make_iterator(c)
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(3)]
  it.close()
  again = pipeline.make_iterator(c)
  again.set_state(state)
  for batch in want:
    got = next(again)
    assert set(got) == set(batch)
    for k in batch:
      np.testing.assert_array_equal(got[k], batch[k], err_msg=k)
  again.close()


def test_max_pairs_per_row_and_a_pair_too_long_for_a_row(tok, tmp_path):
  prep = _prep(tok)
  units = [prep("prefs", _example(r, i + 1)) for i, r in enumerate(_text_pairs(9))]
  bucket = packing.Bucket(seq_len=1024, batch_size=2, max_pairs=3)
  packer = packing.Packer([bucket])
  batches = [done for i, u in enumerate(units) if (done := packer.add(u, i))]
  batches.append(packer.emit(0))
  for batch, _ in [b[:2] for b in batches]:
    for r in range(2):
      real = batch["segment_ids"][r] > 0
      assert batch["dpo_pair"][r].max() <= 6 and real.sum() < 1024 - 2 * units[0].chosen.num_tokens
  assert len(batches) == 2  # 9 pairs: rows of 3 pairs, not of as many as the tokens allow
  # A pair whose segments fit a row one by one but not together is skipped as too long, never split.
  alone = units[0].chosen.num_tokens + 2
  with pytest.raises(preprocess.SampleError, match="preference pair") as e:
    packing.Packer([packing.Bucket(seq_len=alone, batch_size=1, max_pairs=1)]).add(units[0], 0)
  assert e.value.reason == "too_long"
  # Through the pipeline: config.dpo.max_pairs_per_row bounds every row.
  c = _config(tmp_path, {"prefs": _write(tmp_path / "prefs.jsonl", _text_pairs(6))}, max_pairs=1, seq_len=512)
  it = pipeline.make_iterator(c)
  for _ in range(3):
    batch = next(it)
    assert batch["dpo_pair"].max() == 2 and set(np.unique(batch["dpo_pair"])) == {0, 1, 2}
  it.close()


def test_bad_records_are_skipped_and_counted_naming_the_line_and_field(tok, tmp_path):
  good = _text_pairs(3)
  bad = [
      {"prompt": "Q?", "chosen": "A."},  # 4: rejected missing
      {"prompt": "Q?", "chosen": "Same.", "rejected": "Same."},  # 5: nothing to prefer
      {"chosen": [{"role": "user", "content": "Q one?"}, {"role": "assistant", "content": "A."}],
       "rejected": [{"role": "user", "content": "Q two?"}, {"role": "assistant", "content": "B."}]},  # 6
      {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
       "rejected_response": "B.", "rejected_images": ["x.png"]},  # 7: media of another prompt
      {"prompt": "Q?", "chosen": "A.", "rejected": 5},  # 8
      {"chosen": "A.", "rejected": "B."},  # 9: no prompt for single replies
      {"prompt": "Q?", "chosen": [{"role": "user", "content": "A."}], "rejected": "B."},  # 10: not a reply
      "{broken",  # 11
      {"prompt": "Q?", "chosen": {"content": "A.", "codes": [1, 2]},  # 12: same text, run without a Talker
       "rejected": {"content": "A.", "codes": [3, 4]}},
  ]
  path = _write(tmp_path / "prefs.jsonl", good + bad)
  sft = _write(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "Hi."},
                                                       {"role": "assistant", "content": "Hello."}]},
                                        {"prompt": "Q?", "chosen": "A.", "rejected": "B."}])
  c = _config(tmp_path, {"prefs": path, "sft": sft}, mixture={"prefs": 1.0, "sft": 1.0}, eval_repeat=False,
              max_skip_ratio=1.0)
  c["data"]["datasets"] = {"prefs": {"validation": path}, "sft": {"validation": sft}}
  it = pipeline.make_iterator(c, split="eval")
  for _ in it:
    pass
  metrics = it.metrics()
  assert metrics["pairs"] == 3 and metrics["samples"] == 7  # 3 pairs (2 segments each) + 1 SFT sample
  assert metrics["skipped"] == 10 and metrics["skipped/bad_pair"] == 9 and metrics["skipped/malformed"] == 1
  it.close()
  # The messages name the file, the line and the field.
  prep = _prep(tok)
  want = {4: "field `rejected` is missing", 5: "fields `chosen` and `rejected` hold the same reply",
          6: "prompts of `chosen` and `rejected` disagree at message 0",
          7: "field `rejected_images` with `rejected_response`", 8: "field `rejected` must be a string",
          9: "field `prompt` is missing", 10: "field `chosen`: must end with the assistant reply",
          11: "not valid JSON", 12: "differ only in their speech"}
  for line, text in want.items():
    record = bad[line - 4]
    with pytest.raises(preprocess.SampleError) as e:
      prep("prefs", {"id": f"prefs.jsonl:{line}", "root": "/",
                     "record": record if isinstance(record, str) else json.dumps(record)})
    assert text in str(e.value) and f"prefs/prefs.jsonl:{line}" in str(e.value), (line, str(e.value))
    assert e.value.reason == ("malformed" if line == 11 else "bad_pair")
  with pytest.raises(preprocess.SampleError, match="config.data.preference") as e:  # a pair among SFT records
    prep("sft", {"id": "sft.jsonl:2", "record": json.dumps({"prompt": "Q?", "chosen": "A.", "rejected": "B."}),
                 "root": "/"})
  assert e.value.reason == "bad_pair"


def test_config_selects_preference_data_or_fails_clearly(tmp_path):
  prefs = _write(tmp_path / "prefs.jsonl", _text_pairs(2))
  sft = _write(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "Hi."},
                                                       {"role": "assistant", "content": "Hello."}]}])
  c = _config(tmp_path, {"prefs": prefs, "sft": sft})
  del c["dpo"]
  with pytest.raises(ConfigError, match="set config.dpo"):
    pipeline.build_dataset(c)
  c = _config(tmp_path, {"prefs": prefs, "sft": sft}, preference=(), mixture={"sft": 1.0})
  with pytest.raises(ConfigError, match="config.data.preference"):
    pipeline.build_dataset(c)
  c = _config(tmp_path, {"prefs": prefs}, preference=("prefs", "nope"))
  with pytest.raises(ConfigError, match="nope"):
    pipeline.build_dataset(c)
  c = _config(tmp_path, {"prefs": prefs}, max_pairs=0)
  with pytest.raises(ConfigError, match="max_pairs_per_row"):
    pipeline.build_dataset(c)
  # Without config.dpo and config.data.preference: plain SFT batches, no pair fields.
  c = _config(tmp_path, {"sft": sft}, preference=())
  del c["dpo"]
  batch, _ = next(iter(pipeline.build_dataset(c)))
  assert "dpo_pair" not in batch


def test_batch_check_knows_the_pair_fields():
  b = {f: np.zeros((2, 8), np.int32) for f in batch_lib.TEXT_FIELDS}
  batch_lib.check(dict(b, dpo_pair=np.zeros((2, 8), np.int32)))
  with pytest.raises(ValueError, match="dpo_pair"):
    batch_lib.check(dict(b, dpo_pair=np.zeros((2, 7), np.int32)))
  talker = dict(b, dpo_pair=np.zeros((2, 8), np.int32), **{f: np.zeros((2, 16), np.int32) for f in talker_layout.FIELDS})
  with pytest.raises(ValueError, match="talker_dpo_pair"):
    towers.check_batch(talker)
  towers.check_batch(dict(talker, talker_dpo_pair=np.zeros((2, 16), np.int32)))
  with pytest.raises(ValueError, match="talker_dpo_pair"):
    towers.check_batch(dict(talker, talker_dpo_pair=np.zeros((2, 8), np.int32)))
  with pytest.raises(ValueError, match="unknown fields"):  # without the Talker's data hook, its fields are unknown
    batch_lib.check(talker)


# --------------------------------------------------------------------------------------- spoken pairs


def _talker_config(tmp_path, prefs, **data):
  from configs import tiny  # noqa: PLC0415

  c = tiny.get_config()
  c.data.source = "jsonl"
  c.data.datasets = ml_collections.ConfigDict({"prefs": prefs})
  c.data.mixture = ml_collections.ConfigDict({"prefs": 1.0})
  c.data.preference = ("prefs",)
  c.data.tfds_data_dir = str(tmp_path / "tfds")
  c.data.buckets = (dict(seq_len=256, max_images=0, max_image_patches=0, max_videos=0, max_video_patches=0,
                         max_audios=0, max_audio_frames=0, talker_seq_len=512),)
  c.data.shuffle = False
  c.data.update(data)
  c.train.batch_size = 2
  c.train.objectives = ml_collections.ConfigDict({"thinker_dpo": 1.0, "talker_dpo": 1.0})
  c.dpo = ml_collections.ConfigDict({"max_pairs_per_row": 2})
  return c


def _talker_pairs(batch):
  """[(row, chosen codes, rejected codes)] of every spoken pair of a batch, checking that each side of pair p is
  one whole Talker segment numbered 2p-1 / 2p, and that its Thinker segment carries the same number or 0."""
  out = []
  for r in range(batch["input_ids"].shape[0]):
    marks = batch["talker_dpo_pair"][r]
    for p in range(1, int(marks.max()) // 2 + 1):
      got = []
      for number in (2 * p - 1, 2 * p):
        segs = set(batch["talker_segment_ids"][r][marks == number].tolist())
        assert len(segs) == 1
        seg = segs.pop()
        np.testing.assert_array_equal(marks[batch["talker_segment_ids"][r] == seg], number)
        assert set(batch["dpo_pair"][r][batch["segment_ids"][r] == seg].tolist()) <= {0, number}
        labels = batch["talker_labels"][r][marks == number]
        got.append(labels[labels != IGNORE])
      out.append((r, got[0], got[1]))
  return out


def test_a_spoken_pair_given_as_codes_is_marked_on_the_talker_rows(tmp_path):
  records = [{"prompt": f"Count to {i}.", "speaker": "Ethan",
              "chosen": {"content": f"One to {i}.", "codes": [1 + i, 2, 3, 4]},
              "rejected": {"content": f"One to {i}.", "codes": [5, 6, 7, 8, 9, 10 + i]}} for i in range(3)]
  records.append({"prompt": "Say yes.", "chosen": {"content": "Yes.", "codes": [1, 1]},  # text and voice differ
                  "rejected": {"content": "No.", "codes": [2, 2, 2]}})
  records.append({"prompt": "Hum.", "chosen": {"content": "Hm.", "speech": "hum.wav"},  # audio, but no index
                  "rejected": {"content": "Hm.", "codes": [1]}})
  c = _talker_config(tmp_path, _write(tmp_path / "prefs.jsonl", records))
  it = pipeline.make_iterator(c)
  batch = next(it)
  towers.check_batch(batch)
  assert batch["talker_dpo_pair"].shape == batch["talker_segment_ids"].shape
  eos = c.model.talker.tts_codec_end_token_id
  spoken = _talker_pairs(batch)
  assert len(spoken) == 2 * 2  # 4 pairs in 2 rows of at most 2
  for _, chosen, rejected in spoken:
    assert chosen[-1] == eos and rejected[-1] == eos
    assert (len(chosen), len(rejected)) in {(5, 7), (3, 4)}
  # Same text: the Thinker sees no preference (dpo_pair 0); different texts: both fields carry the pair.
  text_marked = sum(int(batch["dpo_pair"][r].max() > 0) for r in range(2))
  assert text_marked == 1
  next(it)
  metrics = it.metrics()
  assert metrics["pairs"] == 8 and metrics["skipped/no_speech_codes"] >= 1  # the audio reply needs an index
  it.close()


def test_spoken_replies_given_as_audio_are_encoded_to_units(tmp_path):
  from flax import nnx  # noqa: PLC0415

  from configs import tiny  # noqa: PLC0415
  from omni_jax import units  # noqa: PLC0415
  from omni_jax.config import Runtime  # noqa: PLC0415
  from omni_jax.input.media import audio as audio_lib  # noqa: PLC0415
  from omni_jax.models.audio import AudioEncoder, thinker_audio  # noqa: PLC0415

  media = tmp_path / "media"
  media.mkdir()
  for name, freq, seconds in (("calm", 220, 0.8), ("rushed", 330, 0.4)):  # a voice and pace preference
    t = np.arange(int(16000 * seconds)) / 16000
    wave = 0.3 * np.sin(2 * np.pi * freq * t * (1 + 2 * t)) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    soundfile.write(media / f"{name}.wav", wave.astype(np.float32), 16000)
  records = [{"prompt": "How are you?", "chosen": {"content": "Fine, thanks.", "speech": "media/calm.wav"},
              "rejected": {"content": "Fine, thanks.", "speech": "media/rushed.wav"}}]
  prefs = _write(tmp_path / "prefs.jsonl", records)
  # `python -m omni_jax.units encode` finds both replies' audio in preference records.
  found = corpus.speech_files(prefs)
  assert found.paths == [str(media / "calm.wav"), str(media / "rushed.wav")] and found.bad_records == 0
  # Units of the tiny audio tower, as encode makes them (tests/test_units.py), into a codes index.
  audio_cfg = thinker_audio(tiny.get_config())
  encoder = units.FrozenEncoder.from_tower(audio_cfg, AudioEncoder(audio_cfg, Runtime(), rngs=nnx.Rngs(3)), 1)
  fitted = units.KMeansUnits.fit(encoder, [audio_lib.features_from_file(p) for p in found.paths], 8, seed=0)
  index = units.CodeIndex.for_units(fitted)
  for p in found.paths:
    index.add(p, fitted.encode_file(p))
  index.save(tmp_path / "codes.json")
  c = _talker_config(tmp_path, prefs, speech_codes=str(tmp_path / "codes.json"))
  assert targets.settle_units(c) == fitted.version
  batch, _ = next(iter(pipeline.build_dataset(c)))
  spoken = _talker_pairs(batch)  # the one record, again and again (the train split repeats)
  assert len(spoken) == 2 * 2
  for _, chosen, rejected in spoken:
    np.testing.assert_array_equal(chosen[:-1], fitted.encode_file(media / "calm.wav"))
    np.testing.assert_array_equal(rejected[:-1], fitted.encode_file(media / "rushed.wav"))
  assert batch["dpo_pair"].max() == 0  # the same text: a Talker pair only


def test_normal_form_of_a_pair(tmp_path):
  out = pairs.normalize_pair({"id": "x", "system": "Be brief.", "prompt": "Q?", "speaker": "Ethan",
                              "chosen": {"content": "A.", "speech": "a.wav"},
                              "rejected": {"content": "A.", "codes": [1, 2]}}, str(tmp_path), "prefs/f.jsonl:3")
  assert out["id"] == "x" and out["speech_output"] and [m["role"] for m in out["prompt"]] == ["system", "user"]
  assert out["chosen"]["speech"] == str(tmp_path / "a.wav") and out["chosen"]["speaker"] == "Ethan"
  assert out["rejected"]["codes"] == [1, 2]
  with pytest.raises(sources.PairError, match="prefs/f.jsonl:3: fields `chosen` and `rejected` hold the same"):
    pairs.normalize_pair({"prompt": "Q?", "chosen": {"content": "A.", "codes": [1]},
                          "rejected": {"content": "A.", "codes": [1]}}, "", "prefs/f.jsonl:3")
  with pytest.raises(sources.RecordError, match="field `rejected` message 1: `codes` must be"):
    pairs.normalize_pair({"prompt": "Q?", "chosen": "A.", "rejected": {"content": "B.", "codes": [-1]}}, "",
                         "prefs/f.jsonl:3")


# --------------------------------------------------------------------------------------- the demo set


def test_the_demo_preference_set(demo_dir, tok):
  from data import demo_preference  # noqa: PLC0415

  paths = demo_preference.write(demo_dir)
  prep = _prep(tok)
  got = {"pairs": 0, "images": 0, "spoken": 0}
  for split, path in paths.items():
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
    assert lines, split
    for i, line in enumerate(lines, 1):
      example = {"id": f"preference.{split}.jsonl:{i}", "record": line, "root": os.path.dirname(path)}
      if '"pace_' in line:  # a voice pair: without a Talker in the run, nothing to prefer
        with pytest.raises(preprocess.SampleError, match="differ only in their speech"):
          prep("prefs", example)
        got["spoken"] += 1
        continue
      p = prep("prefs", example)
      got["pairs"] += 1
      got["images"] += bool(p.chosen.images)
  assert got["pairs"] > 50 and got["images"] > 30 and got["spoken"] > 20
  slow = corpus.speech_files(paths["train"]).paths  # what `units encode` reads: both replies of the pace pairs
  assert any("/preference/slow_" in p for p in slow) and all(os.path.exists(p) for p in slow)
  for part, n in (("text", got["pairs"]), ("voice", got["spoken"])):  # the two parts alone
    files = demo_preference.write(demo_dir, part).values()
    assert sum(len(open(p, encoding="utf-8").read().splitlines()) for p in files) == n, part

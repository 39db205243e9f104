"""The evaluators (omni_jax/evaluate): known answers for the scorers, task files, the registry, reproducible
scores across runs and meshes, and eval.py's ASR transcripts equal to transformers' greedy generate."""

import json
import os

import jiwer
import numpy as np
import pytest
import sacrebleu

from omni_jax.errors import ConfigError
from omni_jax.evaluate import normalize
from omni_jax.evaluate import registry
from omni_jax.evaluate import taskfile
from omni_jax.evaluate.tasks import asr
from omni_jax.evaluate.tasks import mcq
from omni_jax.evaluate.tasks import open as open_task


# ---------------------------------------------------------------------------------------------------------
# Scorers with known answers.


def test_wer_and_cer_equal_jiwer_on_hand_made_transcripts():
  perfect = asr.rates(["The cat sat on the mat."], ["the cat sat on the mat"])
  assert perfect == {"wer": 0.0, "cer": 0.0, "accuracy": 1.0}
  one = asr.rates(["the cat sat on the mat"], ["the cat sat on a mat"])
  assert one["wer"] == pytest.approx(1 / 6) == jiwer.wer("the cat sat on the mat", "the cat sat on a mat")
  assert one["cer"] == pytest.approx(jiwer.cer("the cat sat on the mat", "the cat sat on a mat"))
  assert one["cer"] == pytest.approx(3 / 22)  # "the" -> "a": one substitution and two deletions
  assert one["accuracy"] == 0.0
  empty = asr.rates(["the cat sat"], [""])
  assert empty["wer"] == 1.0 and empty["cer"] == 1.0 and empty["accuracy"] == 0.0
  # Pooled over items: errors / reference words, as jiwer computes a corpus rate.
  pooled = asr.rates(["one two three four", "five"], ["one two three four", "six"])
  assert pooled["wer"] == pytest.approx(1 / 5) and pooled["accuracy"] == 0.5


def test_normaliser_case_punctuation_numbers():
  assert normalize.transcript("Seven plus FIVE equals 12!") == "seven plus five equals twelve"
  assert normalize.transcript("7") == normalize.transcript("seven.") == "seven"
  assert normalize.transcript("It's 1,250.5 km") == "its one thousand two hundred fifty point five km"
  assert normalize.transcript("2024") == "two thousand twenty four"
  assert normalize.transcript("  ¿Qué   tal?  ") == "qué tal"
  assert asr.rates(["Wir treffen uns um 8 Uhr."], ["wir treffen uns um eight uhr"])["wer"] == 0.0
  assert normalize.answer("The answer: A cat!") == "answer cat"
  with pytest.raises(ValueError, match="empty after normalisation"):
    asr.rates(["?!"], ["x"])


@pytest.mark.parametrize("reply,letter", [
    ("B.", "B"), ("(b)", "B"), ("The answer is C", "C"), ("the answer is (d).", "D"), ("Answer: a", "A"),
    ("b) a cat", "B"), ("C", "C"), ("  d  ", "D"), ("A cat.", None), ("I think it is a dog", None), ("", None),
    ("E.", None),  # beyond the four choices
    ("Red and blue.", "B"),  # the text of one option
    ("The answer is", None),
])
def test_letter_parsing_on_tricky_replies(reply, letter):
  assert mcq.parse_letter(reply, ["A dog.", "Red and blue", "Green", "Seven"]) == letter


def test_bleu_and_chrf_equal_sacrebleu_on_a_fixed_corpus():
  hyps = ["the cat is on the mat", "a quick brown fox jumps", "hello there general kenobi"]
  refs = [["the cat sat on the mat", "there is a cat on the mat"], ["the quick brown fox jumps over the dog"],
          ["hello there general kenobi"]]
  got = open_task.scores(refs, hyps)
  streams = [[r[0] for r in refs], [r[1] if len(r) > 1 else r[0] for r in refs]]
  assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score)
  assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, streams).score)
  # The padding of the shorter reference lists does not change BLEU: sacrebleu with only the first stream
  # agrees on the items that have one reference.
  assert open_task.scores([["a b c d e"]], ["a b c d e"])["bleu"] == pytest.approx(100.0)
  assert got["exact_match"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------------------
# Task files and the registry.


def _write(path, lines):
  path.write_text("".join(json.dumps(x) + "\n" for x in lines))
  return str(path)


def test_task_files_in_both_formats(tmp_path):
  (tmp_path / "clip.wav").write_bytes(b"")
  f = _write(tmp_path / "mine.jsonl", [
      {"id": "a", "messages": [{"role": "user", "content": [{"type": "audio", "audio": "clip.wav"},
                                                            {"type": "text", "text": "Transcribe."}]}],
       "references": "hello"},
      {"id": "b", "task": "pics", "images": ["x.png"], "messages": [{"role": "user", "content": "<image>What?"}],
       "choices": ["cat", "dog"], "answer": 1},
      {"id": "c", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
  ])
  a, b, c = taskfile.load([f])
  assert (a.task, a.modality, a.references) == ("mine", "audio", ["hello"])
  assert a.messages[0]["content"][0] == {"type": "audio", "path": str(tmp_path / "clip.wav")}
  assert (b.task, b.modality, b.answer, b.references) == ("pics", "image", "B", [])
  assert (c.modality, c.references, len(c.messages)) == ("text", ["Hello!"], 1)  # a training record works
  assert len(taskfile.load([f], max_items=1)) == 2  # one per task: "mine" and "pics"


@pytest.mark.parametrize("record,message", [
    ({"messages": [{"role": "user", "content": "x"}], "choices": ["a", "b"], "answer": "C"}, "answer"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": "x"}], "references": [3]}, "references"),
])
def test_bad_task_lines_name_the_file_and_line(tmp_path, record, message):
  f = _write(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "ok"}]}, record])
  with pytest.raises(taskfile.TaskFileError, match=rf"bad.jsonl:2.*{message}|{message}.*bad.jsonl:2"):
    taskfile.load([f])
  with pytest.raises(taskfile.TaskFileError, match="no such file"):
    taskfile.expand(str(tmp_path / "missing*.jsonl"))


def test_bundled_task_files_come_from_the_registered_recipe(demo_dir):
  import ml_collections  # noqa: PLC0415

  c = ml_collections.ConfigDict(dict(eval=dict(files=dict(asr="")), data=dict(source="demo", demo_dir=demo_dir)))
  files = taskfile.files_for(c, "asr")
  assert files and all(f.startswith(os.path.join(demo_dir, "tasks", "asr")) for f in files)
  c.data.source = "jsonl"  # no recipe: the evaluator needs its files named
  with pytest.raises(taskfile.TaskFileError, match="config.eval.files.asr is empty"):
    taskfile.files_for(c, "asr")


def test_registry_selects_and_refuses(tmp_path):
  import ml_collections  # noqa: PLC0415

  c = ml_collections.ConfigDict(dict(eval=dict(tasks=" loss, asr ,mcq,open")))
  assert registry.selected(c) == ["loss", "asr", "mcq", "open"]
  assert set(registry.names()) >= {"loss", "asr", "mcq", "open"}
  c.eval.tasks = "loss,bleu"
  with pytest.raises(ConfigError, match="config.eval.tasks: unknown evaluator 'bleu'"):
    registry.selected(c)
  c.eval.tasks = "loss,speech"  # the spoken-reply evaluator (tests/test_speech_eval.py)
  assert registry.selected(c) == ["loss", "speech"]


# ---------------------------------------------------------------------------------------------------------
# Whole evaluations on a tiny model.


def _tiny_config(demo_dir, tmp_path):
  from configs import tiny  # noqa: PLC0415

  c = tiny.get_config()
  if "talker" in c.model:  # the Thinker alone: these checks are about the Thinker's evaluators
    del c.model["talker"]
    c.train.objectives = None
  c.data.source, c.data.demo_dir = "demo", demo_dir
  c.data.mixture = {"digits": 1.0, "text": 1.0, "image": 1.0}
  c.data.buckets = (dict(seq_len=192, max_images=1, max_image_patches=256, max_audios=2, max_audio_frames=600),)
  c.data.media = dict(image_max_pixels=16 * 28 * 28, num_mel_bins=128)
  e = c.eval
  e.tasks, e.samples_per_dataset, e.batch_size, e.steps = "loss,asr,mcq,open", 2, 8, 8
  e.max_items, e.generate_batch_size = 2, 2
  e.max_new_tokens = dict(asr=3, mcq=3, open=3)
  e.files = dict(asr=f"{demo_dir}/tasks/asr/digits.jsonl", mcq=f"{demo_dir}/tasks/mcq/image.jsonl",
                 open=f"{demo_dir}/tasks/open/text.jsonl")
  return c


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, demo_dir):
  import jax  # noqa: PLC0415

  from omni_jax import checkpoint, sharding  # noqa: PLC0415
  from omni_jax.models import omni  # noqa: PLC0415

  path = str(tmp_path_factory.mktemp("ckpt"))
  c = _tiny_config(demo_dir, path)
  _, state, _ = omni.create_sharded(c, sharding.make_mesh({"data": 1}, jax.devices()[:1]), seed=5)
  checkpoint.save_params(path, state, c)
  return path


@pytest.mark.slow
def test_scores_identical_across_runs_and_meshes(tiny_ckpt, demo_dir, tmp_path):
  from omni_jax.evaluate import context as context_lib  # noqa: PLC0415
  from omni_jax.evaluate import job as job_lib  # noqa: PLC0415
  from omni_jax.evaluate import run  # noqa: PLC0415
  from omni_jax import loader  # noqa: PLC0415

  c = _tiny_config(demo_dir, tmp_path)
  c.mesh = {"data": 8}
  first = run.run(c, tiny_ckpt, str(tmp_path / "r0.json"))
  assert first["devices"] == 8 and first["tasks"] == ["loss", "asr", "mcq", "open"]
  # The loss evaluator read the same first records of every dataset of the mixture, and says so.
  assert first["datasets"] == {"digits": 2, "image": 2, "text": 2}
  assert first["seq_len"] == 192 and first["skipped"]["total"] == 0
  assert first["metrics"]["eval/samples/digits"] == 2.0 and "eval/asr/digits/wer" in first["metrics"]
  assert len(first["evaluators"]["asr"]["replies"]) == 2 and first["cost"]["asr"]["items"] == 2
  assert json.load(open(tmp_path / "r0.json"))["metrics"] == first["metrics"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard_eval"))
  assert (tmp_path / "eval_eval.jsonl").exists()

  # Mesh (2,2,2), evaluated twice by the same job: the scores and replies of the (8,1,1) run, both times.
  c = _tiny_config(demo_dir, tmp_path)
  c.mesh = {"data": 2, "fsdp": 2, "tensor": 2}
  config, graphdef, params, shardings, mesh, tok_dir = loader.restore(tiny_ckpt, c)
  evaluation = job_lib.Evaluation(context_lib.Context(config, mesh, graphdef, shardings, tok_dir),
                                  ["loss", "asr", "mcq", "open"])
  try:
    for _ in range(2):
      metrics, sections = evaluation(params)
      replies = {n: [r.get("hypothesis", r.get("reply")) for r in s.get("replies", ())] for n, s in sections.items()}
      assert replies == {n: [r.get("hypothesis", r.get("reply")) for r in s.get("replies", ())]
                         for n, s in first["evaluators"].items()}
      assert metrics.keys() == first["metrics"].keys()
      for k, v in first["metrics"].items():
        np.testing.assert_allclose(metrics[k], v, rtol=2e-5, err_msg=k)
      # Between evaluations the generator keeps no parameters (on GPUs, its per-layer copy of them).
      chat = evaluation.ctx.chat
      assert chat.generator.params is None and all(e.params is None for e in chat._engines.values())
  finally:
    evaluation.close()


def test_eval_py_transcripts_equal_transformers_greedy_generate(tmp_path, demo_dir):
  """A transformers tiny Thinker with the Qwen vocabulary and special ids, converted; the asr evaluator's
  transcripts of two held-out digit clips equal the decoded tokens of transformers' generate(do_sample=False)
  on the same prompts."""
  import torch  # noqa: PLC0415

  import hf_reference as ref  # noqa: PLC0415
  from omni_jax import special_tokens  # noqa: PLC0415
  from omni_jax.convert import cli  # noqa: PLC0415
  from omni_jax.evaluate import context as context_lib  # noqa: PLC0415
  from omni_jax.evaluate import run  # noqa: PLC0415
  from omni_jax.generate import prompts  # noqa: PLC0415
  from omni_jax.input.media import audio as audio_media  # noqa: PLC0415

  ids = special_tokens.THINKER
  text = dict(ref.TEXT_VARIANTS["gqa2"], vocab_size=151936, tie_word_embeddings=False, pad_token_id=ids["pad_token_id"])
  config = ref.thinker_config(
      "gqa2", text_config=text, user_token_id=ids["user_token_id"], audio_token_index=ids["audio_token_id"],
      image_token_index=ids["image_token_id"], video_token_index=ids["video_token_id"],
      audio_start_token_id=ids["audio_start_token_id"], audio_end_token_id=ids["audio_end_token_id"],
      vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"])
  torch.manual_seed(0)
  hf_model = ref.perturb(ref.Qwen2_5OmniThinkerForConditionalGeneration(config).eval(), 1)
  hf_model.save_pretrained(tmp_path / "hf")
  cli.main(["--hf_dir", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "orbax")])

  c = _tiny_config(demo_dir, tmp_path)
  c.eval.tasks, c.mesh = "asr", {"data": 8}
  n = 6
  c.eval.max_new_tokens = dict(asr=n)
  report = run.run(c, str(tmp_path / "orbax"), str(tmp_path / "report.json"))
  ours = [r["hypothesis"] for r in report["evaluators"]["asr"]["replies"]]

  # The same prompts, built the way the evaluator builds them, through transformers.
  items = taskfile.load([c.eval.files.asr], max_items=2)
  import jax  # noqa: PLC0415
  from omni_jax import loader  # noqa: PLC0415

  config_ours, graphdef, _, shardings, mesh, tok_dir = loader.restore(str(tmp_path / "orbax"), c)
  ctx = context_lib.Context(config_ours, mesh, graphdef, shardings, tok_dir)
  del jax
  theirs = []
  for item in items:
    sample = prompts.prompt_sample(item.messages, ctx.chat.preprocessor)
    buf, lengths = audio_media.pad_batch(sample.audios)
    inputs = dict(input_ids=torch.tensor(sample.input_ids[None].astype(np.int64)),
                  attention_mask=torch.ones((1, sample.num_tokens), dtype=torch.int64),
                  input_features=torch.tensor(buf),
                  feature_attention_mask=torch.tensor((np.arange(buf.shape[2])[None] < lengths[:, None]).astype(
                      np.int64)))
    with torch.no_grad():
      out = hf_model.generate(**inputs, max_new_tokens=n, do_sample=False, repetition_penalty=1.0,
                              eos_token_id=list(ids["eos_token_ids"]), pad_token_id=ids["pad_token_id"])
    theirs.append(ctx.decode(out[0, sample.num_tokens:].numpy()))
  assert ours == theirs
  assert any(t for t in theirs)  # the random model says something: the comparison is not of empty strings

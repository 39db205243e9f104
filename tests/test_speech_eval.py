"""The speech evaluator and its offline judges (omni_jax/evaluate/judges.py, tasks/speech.py): pocketsphinx
transcribes eSpeak NG speech of known sentences below its stated floor and noise far above it; resemblyzer puts
two clips of one voice closer than clips of two voices; the evaluator runs end to end on a tiny model with a
random Talker / Token2Wav, in range and identically twice; a Thinker-only model is skipped, not crashed."""

import types

import ml_collections
import numpy as np
import pytest

from omni_jax.evaluate import judges
from omni_jax.evaluate.tasks import speech as speech_task

import pocketsphinx  # noqa: E402,F401 - the eval extra (run.sh test installs it): never skipped
import resemblyzer  # noqa: E402,F401


def _espeak(text, voice="en-us", speed=150):
  from data import espeak  # noqa: PLC0415

  wave, rate = espeak.synthesize(text, voice, speed, 50)
  return wave.astype(np.float32) / 32768.0, rate


def _audioeval_en():
  import importlib.util  # noqa: PLC0415
  import os  # noqa: PLC0415

  import soundfile  # noqa: PLC0415

  root = os.path.join(list(importlib.util.find_spec("pytest_audioeval").submodule_search_locations)[0],
                      "samples", "audio", "en")
  out = []
  for name in sorted(f for f in os.listdir(root) if f.endswith(".wav")):
    wave, rate = soundfile.read(os.path.join(root, name), dtype="float32", always_2d=True)
    out.append((" ".join(open(os.path.join(root, name[:-4] + ".txt")).read().split()), wave.mean(1), rate))
  return out


def test_asr_judge_below_its_floors_on_known_speech_and_far_above_on_noise():
  asr = judges.asr()
  clips = _audioeval_en()
  natural = speech_task.wer([t for t, _, _ in clips], [asr(w, r) for _, w, r in clips])
  assert natural <= judges.ASR_WER_FLOOR + 0.02, natural
  sentences = ["Hello world, this is a test.", "One two three four five six seven eight nine ten."]
  waves = [_espeak(s, "en", 130) for s in sentences]
  hyps = [asr(*w) for w in waves]
  # eSpeak NG speech is near the judge's limit (ASR_WER_FLOOR_ESPEAK, measured on longer sentences: short
  # ones draw insertions, WER ~1): it still recovers words of it, where noise gives none.
  import jiwer  # noqa: PLC0415
  from omni_jax.evaluate import normalize  # noqa: PLC0415

  hits = jiwer.process_words([normalize.transcript(x) for x in sentences],
                             [normalize.transcript(h) or "<none>" for h in hyps]).hits
  assert hits >= 1, hyps
  rng = np.random.default_rng(0)
  noise = [asr(rng.normal(0, 0.1, 3 * 16000).astype(np.float32), 16000) for _ in sentences]
  assert noise == ["", ""]  # no word at all: WER 1.0
  assert speech_task.wer(sentences, noise) == 1.0 >= natural + 0.7
  # The same waveform, the same transcript, whatever came before (the evaluator's scores repeat run to run).
  assert asr(*waves[1]) == hyps[1]


def test_speaker_judge_same_voice_closer_than_other_voices():
  spk = judges.speaker_encoder()
  a, b = "The garden looks fresh this morning.", "Please put the green cup on the top shelf."
  emb = {(v, k): spk.embed(*_espeak(t, v, 165)) for v in ("en-us", "en-us+f3") for k, t in enumerate((a, b))}
  same = [judges.similarity(emb[v, 0], emb[v, 1]) for v in ("en-us", "en-us+f3")]
  other = [judges.similarity(emb["en-us", i], emb["en-us+f3", j]) for i in (0, 1) for j in (0, 1)]
  assert min(same) > judges.OTHER_VOICE_SIMILARITY, same
  assert min(same) > max(other) + 0.05, (same, other)
  assert judges.similarity(emb["en-us", 0], emb["en-us", 0]) == pytest.approx(1.0, abs=1e-5)


def test_thinker_only_model_is_skipped_with_its_reason():
  c = ml_collections.ConfigDict(dict(model=dict(thinker=dict()), eval=dict(split="eval")))
  ev = speech_task.Speech(types.SimpleNamespace(config=c, split="eval"))
  scores = ev(params=None)
  assert scores.scalars == {} and scores.details == {"skipped": "skipped: no Talker/Token2Wav"}


def test_missing_judge_package_names_it(monkeypatch):
  import sys  # noqa: PLC0415

  monkeypatch.setitem(sys.modules, "pocketsphinx", None)  # what an environment without it does on import
  with pytest.raises(judges.JudgeError, match=r"`pocketsphinx`.*\[eval\]"):
    judges.SphinxAsr()


@pytest.mark.slow
def test_evaluator_end_to_end_in_range_and_deterministic(tiny_speech_checkpoint, demo_dir):
  from configs import tiny  # noqa: PLC0415
  from omni_jax.evaluate import context as context_lib  # noqa: PLC0415
  from omni_jax.evaluate import job as job_lib  # noqa: PLC0415
  from omni_jax.evaluate import summary  # noqa: PLC0415
  from omni_jax import loader  # noqa: PLC0415

  c = tiny.get_config()
  c.mesh = {"data": 8}
  c.data.source, c.data.demo_dir = "demo", demo_dir
  e = c.eval
  e.tasks, e.max_items, e.generate_batch_size = "speech", 2, 2
  e.max_new_tokens = dict(speech=4)
  e.talker_max_new_tokens = 16
  config, graphdef, params, shardings, mesh, tok_dir = loader.restore(tiny_speech_checkpoint, c)
  evaluation = job_lib.Evaluation(context_lib.Context(config, mesh, graphdef, shardings, tok_dir), ["speech"])
  runs = [evaluation(params) for _ in range(2)]  # the same job twice: programs compiled once
  m, sections = runs[0]
  assert m["eval/speech/samples"] == 2
  assert 0 <= m["eval/speech/wer"] <= 5 and -1 <= m["eval/speech/similarity"] <= 1
  assert 0 <= m["eval/speech/judge_wer"] <= 1.5 and m["eval/speech/judge_similarity"] > 0.5  # recordings vs clip
  assert m["eval/speech/seconds_of_audio"] > 0 and m["eval/speech/samples_per_s"] > 0
  steady = lambda metrics: {k: v for k, v in metrics.items() if "per_s" not in k}  # noqa: E731
  assert steady(runs[0][0]) == steady(runs[1][0])
  assert [r["transcript"] for r in sections["speech"]["replies"]] == [
      r["transcript"] for r in runs[1][1]["speech"]["replies"]]
  assert len(sections["speech"]["replies"]) == 2 and sections["speech"]["vocoder"] == "griffin_lim"
  table = summary.table(dict(metrics=m, evaluators=sections, split="eval", step=None))
  assert "eval/speech/wer" in table and "eval/speech/judge_wer" in table
  skipped = summary.table(dict(metrics={}, evaluators={"speech": {"skipped": speech_task.SKIPPED}}, step=None))
  assert "skipped: no Talker/Token2Wav" in skipped

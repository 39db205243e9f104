"""The new-voice recipe (docs/new_voice.md): recordings + transcripts -> spoken-reply conversations and a reference
clip (omni_jax.token2wav.new_voice), configs/recipes/new_voice.py, and end to end on one eSpeak NG voice of the demo
corpus: units -> Talker + DiT training (a few steps) -> the reply in that voice as a 24 kHz WAV."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import soundfile

import xla_env
from omni_jax import checkpoint
from omni_jax.errors import ConfigError
from omni_jax.input import sources
from data import new_voice_example
from omni_jax.token2wav import new_voice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clip(path, seconds, rate=16000):
  t = np.arange(int(seconds * rate)) / rate
  soundfile.write(str(path), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)


def test_prepare_writes_spoken_replies_and_a_reference(tmp_path, capsys):
  rec = tmp_path / "rec"
  rec.mkdir()
  for i, seconds in enumerate((1.0, 4.0, 12.0, 2.5)):
    _clip(rec / f"take{i}.wav", seconds)
    (rec / f"take{i}.txt").write_text(f"sentence number {i}\n")
  _clip(rec / "untranscribed.wav", 1.0)
  out = tmp_path / "voice"
  record = new_voice.prepare(str(rec), "Ada", str(out), validation=1)
  assert "1 recordings have no transcript" in capsys.readouterr().err
  assert (record["train"], record["validation"], record["speaker"]) == (3, 1, "Ada")
  # The reference: the longest recording of at most 10 s that is not held out (12 s is too long).
  held = [json.loads(line) for line in (out / "voice.validation.jsonl").read_text().splitlines()]
  held_audio = held[0]["messages"][1]["speech"]
  train_durations = {str(rec / f"take{i}.wav"): s for i, s in enumerate((1.0, 4.0, 12.0, 2.5))}
  train_durations.pop(held_audio)
  best = max((s for s in train_durations.values() if s <= 10), default=None)
  assert record["reference_seconds"] == pytest.approx(best, abs=0.01)
  assert os.path.isfile(record["reference"]) and held_audio not in record["clips"]
  # The data path reads the records as Talker / DiT samples: the reply is spoken, by the new speaker.
  for line in (out / "voice.train.jsonl").read_text().splitlines():
    conv = sources.normalize(json.loads(line), str(out), "voice")
    reply, ask = conv["messages"][-1], conv["messages"][0]["content"][0]["text"]
    assert conv["speech_output"] and reply["role"] == "assistant" and reply["speaker"] == "Ada"
    text = reply["content"][0]["text"]
    assert os.path.isfile(reply["speech"]) and text.startswith("sentence number") and text in ask
  # A manifest gives the same records.
  (rec / "manifest.jsonl").write_text("".join(json.dumps({"audio": f"take{i}.wav", "text": f"sentence number {i}"})
                                              + "\n" for i in range(4)))
  again = new_voice.prepare(str(rec), "Ada", str(tmp_path / "voice2"), validation=1)
  assert again["clips"] == record["clips"] and again["reference_seconds"] == record["reference_seconds"]
  with pytest.raises(new_voice.RecipeError, match="--speaker"):
    new_voice.prepare(str(rec), "Ada Lovelace", str(tmp_path / "x"))
  with pytest.raises(new_voice.RecipeError, match="need more than --validation"):
    new_voice.prepare(str(rec), "Ada", str(tmp_path / "x"), validation=4)
  (rec / "manifest.jsonl").write_text('{"audio": "take0.wav"}\n')
  assert new_voice.main(["prepare", "--recordings", str(rec), "--speaker", "Ada", "--out", str(tmp_path / "x")]) == 2
  assert "manifest.jsonl:1" in capsys.readouterr().err


def test_a_new_speaker_survives_init_from_and_cannot_take_a_used_row(tmp_path):
  saved = ml_collections.ConfigDict({"model": {"talker": {"hidden_size": 8, "default_speaker": "Chelsie",
                                                          "speakers": {"Chelsie": 151872, "Ethan": 151870}}}})
  checkpoint.save_config(str(tmp_path), saved)
  run = ml_collections.ConfigDict({"model": {"talker": {"hidden_size": 16, "default_speaker": "Ada",
                                                        "speakers": {"Chelsie": 1, "Ada": 151873}}}})
  got = checkpoint.adopt_model_config(run, str(tmp_path))
  assert got.model.talker.hidden_size == 8  # the stored architecture wins ...
  assert dict(got.model.talker.speakers) == {"Chelsie": 151872, "Ethan": 151870, "Ada": 151873}  # ... plus Ada
  assert got.model.talker.default_speaker == "Ada"
  run.model.talker.speakers = {"Ada": 151870}
  with pytest.raises(ConfigError, match="reuse rows"):
    checkpoint.adopt_model_config(run, str(tmp_path))


def _run(*args, timeout=600):
  # One host device, as a user's CPU run has (the test process's eight cost the training a fifth more time).
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=xla_env.env(1), capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, (args, proc.stderr[-3000:])
  return proc


@pytest.mark.slow  # three processes, a train step compile, a decode: ~3 min of CPU (2.5 idle, 9 min at load 10)
def test_recipe_end_to_end_on_one_espeak_voice(tmp_path):
  rec, out, work = tmp_path / "rec", tmp_path / "voice", tmp_path / "work"
  assert new_voice_example.main(["--voice", "en-GB-scotland", "--count", "6", "--out", str(rec)]) == 0
  assert new_voice.main(["prepare", "--recordings", str(rec), "--speaker", "Scot", "--out", str(out)]) == 0
  cfg = f"configs/recipes/new_voice.py:dir={out}"
  _run("-m", "omni_jax.units", "fit", "--config", cfg, "--data", str(out / "voice.train.jsonl"), "--vocab_size", "64",
       "--out", str(out / "units"))
  _run("-m", "omni_jax.units", "encode", "--units", str(out / "units"), "--data", str(out / "voice.*.jsonl"),
       "--out", str(out / "codes.json"))
  _run("train.py", "--config", cfg, "--workdir", str(work), "--config.train.steps=2", "--config.train.log_every=1",
       "--config.train.eval_every=0", "--config.train.checkpoint_every=2")
  losses = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  trained = [m for m in losses if "train/talker_codes/loss" in m]
  assert len(trained) == 2 and all(np.isfinite(m["train/token2wav_flow/loss"]) for m in trained)  # both trained

  from omni_jax.generate import api  # noqa: PLC0415
  from omni_jax.token2wav import mel as mel_lib  # noqa: PLC0415

  model = api.load(str(work))
  assert model.config.model.talker.default_speaker == "Scot"
  wav = tmp_path / "reply.wav"
  speech = api.speak_to_file(model, "Say this aloud: good morning.", str(tmp_path / "reply.json"), wav_out=str(wav),
                             require_wav=True, max_new_tokens=4, do_sample=False, talker_max_new_tokens=30)
  info = soundfile.info(str(wav))
  assert (info.samplerate, info.channels) == (24000, 1) and info.frames == 480 * len(speech.codes) > 0
  assert speech.speaker == "Scot" and speech.vocoder == "griffin_lim"
  # The voice is the recipe's reference clip, as the DiT saw references in training (ref_frames frames, zero cond).
  ref = model.voicer.voices["Scot"]
  want = mel_lib.log_mel_file(json.loads((out / "new_voice.json").read_text())["reference"])
  frames = int(model.config.train.token2wav.ref_frames)
  np.testing.assert_allclose(ref.ref_mel, want[np.arange(frames) % want.shape[0]], atol=1e-6)
  assert not ref.cond.any()

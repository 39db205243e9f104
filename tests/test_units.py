"""Open speech units (omni_jax.units): k-means over the tiny audio tower's 50 Hz activations, the artifact,
the codes index and the CLI."""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile
from flax import nnx

from configs import tiny
from omni_jax import checkpoint, sharding, units
from omni_jax.config import Runtime
from omni_jax.input.media import audio as audio_lib
from omni_jax.models import omni
from omni_jax.models.audio import AudioEncoder, thinker_audio
from omni_jax.units import clustering

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 32


def _clips():
  import av

  site = os.path.dirname(os.path.dirname(av.__file__))
  clips = sorted(glob.glob(os.path.join(site, "pytest_audioeval", "samples", "audio", "en", "*.wav")))
  assert clips, "pytest-audioeval clips are part of the test dependencies"
  return clips


@pytest.fixture(scope="module")
def audio_cfg():
  return thinker_audio(tiny.get_config())


@pytest.fixture(scope="module")
def tower(audio_cfg):
  return AudioEncoder(audio_cfg, Runtime(), rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def waves():
  return [audio_lib.load_audio(p) for p in _clips()]


@pytest.fixture(scope="module")
def fitted(audio_cfg, tower, waves):
  encoder = units.FrozenEncoder.from_tower(audio_cfg, tower, 1)
  return units.KMeansUnits.fit(encoder, [audio_lib.log_mel(w) for w in waves], K, seed=0)


def test_fit_is_deterministic_and_another_seed_is_refused(audio_cfg, tower, waves, fitted):
  feats = [audio_lib.log_mel(w) for w in waves]
  again = units.KMeansUnits.fit(units.FrozenEncoder.from_tower(audio_cfg, tower, 1), feats, K, seed=0)
  np.testing.assert_array_equal(again.centroids, fitted.centroids)
  assert again.version == fitted.version and len(fitted.version) == 16
  other = units.KMeansUnits.fit(units.FrozenEncoder.from_tower(audio_cfg, tower, 1), feats, K, seed=1)
  assert other.version != fitted.version
  units.check_same_units(fitted.version, again.version, "codes.json")  # same units: accepted
  with pytest.raises(units.UnitsMismatch, match=f"codes.json: .*{other.version}.*{fitted.version}"):
    units.check_same_units(fitted.version, other.version, "codes.json")
  assert issubclass(units.UnitsMismatch, ValueError)
  # k-means++ on these clips leaves no unit unused on its own training data.
  ids = np.concatenate([fitted.encode(w, 16000) for w in waves])
  assert len(np.unique(ids)) == K and ids.dtype == np.int32


def test_ids_are_50_per_second_and_repeatable(fitted, waves):
  for wave in waves:
    ids = fitted.encode(wave, 16000)
    mel = audio_lib.num_frames(wave.size)
    assert ids.shape == ((mel + 1) // 2,)  # 100 mel frames/s, conv2 stride 2
    assert abs(ids.size - 50 * wave.size / 16000) <= 1
    np.testing.assert_array_equal(fitted.encode(wave, 16000), ids)
    assert ids.min() >= 0 and ids.max() < K


def test_long_audio_in_pieces_equals_one_pass_nearest_centroids(audio_cfg, tower, fitted, waves):
  """40 s of audio crosses the 32 s piece boundary; the pieces give the one-pass encoder's nearest centroids."""
  wave = np.tile(np.concatenate(waves), 10)[:40 * 16000]
  feats = audio_lib.log_mel(wave)
  frozen = units.FrozenEncoder.from_tower(audio_cfg, tower, 1)
  one_pass = nnx.merge(frozen._graphdef, frozen._state)  # the whole 40 s in one call, 1 layer
  x, row_tokens, _ = jax.jit(lambda f, n: one_pass.frames(f, n))(feats[None], np.array([feats.shape[1]]))
  frames = np.concatenate([np.asarray(x)[r, :t] for r, t in enumerate(np.asarray(row_tokens))])
  np.testing.assert_allclose(frozen.frames(feats), frames, rtol=1e-5, atol=1e-5)
  # Layer 1 is not the tower's output stream (2 layers): the copy really reads an intermediate layer.
  x2, _, _ = jax.jit(lambda f, n: tower.frames(f, n))(feats[None], np.array([feats.shape[1]]))
  assert not np.allclose(np.asarray(x2)[0, :100], np.asarray(x)[0, :100], atol=1e-3)
  ids = fitted.encode(wave, 16000)
  assert ids.size == frames.shape[0] == 2000
  nearest = ((frames[:, None, :] - fitted.centroids[None]) ** 2).sum(-1).argmin(1)
  assert (ids == nearest).mean() > 0.999  # float rounding may flip an exact near-tie, nothing more


def test_sample_rates(fitted, waves):
  wave = waves[0]
  at_24k = audio_lib.resample(wave, 16000, 24000)
  # 24 kHz input is the 16 kHz encoding of the project's resampler applied to it.
  np.testing.assert_array_equal(fitted.encode(at_24k, 24000),
                                fitted.encode(audio_lib.resample(at_24k, 24000, 16000), 16000))
  # A 16 kHz clip upsampled to 24 kHz: measured 100% equal ids on all 27 pytest-audioeval clips (layers 1, 2).
  for w in waves:
    a, b = fitted.encode(w, 16000), fitted.encode(audio_lib.resample(w, 16000, 24000), 24000)
    assert abs(a.size - b.size) <= 1
    n = min(a.size, b.size)
    assert (a[:n] == b[:n]).mean() >= 0.98
  with pytest.raises(ValueError, match=r"8000 Hz is not supported.*16000 Hz, 24000 Hz"):
    fitted.encode(audio_lib.resample(wave, 16000, 8000), 8000)
  with pytest.raises(ValueError, match="mono"):
    fitted.encode(np.stack([wave, wave], 1), 16000)


def test_training_the_tower_does_not_move_fitted_units(audio_cfg, waves):
  model = AudioEncoder(audio_cfg, Runtime(), rngs=nnx.Rngs(7))
  state = nnx.state(model)
  encoder = units.FrozenEncoder.from_tower(audio_cfg, state, 1)
  fitted = units.KMeansUnits.fit(encoder, [audio_lib.log_mel(w) for w in waves[:3]], 16, seed=0)
  before = [fitted.encode(w, 16000) for w in waves[:3]]
  # "Train": perturb every parameter of the source state and write it back into the module.
  key = iter(jax.random.split(jax.random.key(0), 64))
  nnx.update(model, jax.tree.map(lambda p: p + 0.5 * jax.random.normal(next(key), p.shape, p.dtype), state))
  for w, ids in zip(waves[:3], before):
    np.testing.assert_array_equal(fitted.encode(w, 16000), ids)
  # The perturbation is real: a copy taken now gives other ids with the same centroids.
  moved = units.KMeansUnits(units.FrozenEncoder.from_tower(audio_cfg, model, 1), fitted.centroids)
  assert moved.version != fitted.version
  assert not all(np.array_equal(moved.encode(w, 16000), ids) for w, ids in zip(waves[:3], before))


def test_save_load_round_trip_and_damaged_files(fitted, waves, tmp_path):
  d = tmp_path / "units"
  fitted.save(d)
  manifest = json.loads((d / "units.json").read_text())
  assert manifest["kind"] == "kmeans" and manifest["version"] == fitted.version
  assert manifest["vocab_size"] == K and manifest["frame_rate"] == 50 and manifest["layer"] == 1
  assert manifest["audio"]["d_model"] == 32 and manifest["fit"]["frames_used"] > K
  loaded = units.load(d)
  assert isinstance(loaded, units.KMeansUnits) and loaded.version == fitted.version
  for w in waves[:3]:
    np.testing.assert_array_equal(loaded.encode(w, 16000), fitted.encode(w, 16000))

  def damaged(name, edit):
    bad = tmp_path / f"bad_{name}_{len(os.listdir(tmp_path))}"
    shutil.copytree(d, bad)
    edit(bad / name)
    return bad

  with pytest.raises(units.UnitsError, match="no such speech-units directory"):
    units.load(tmp_path / "nowhere")
  with pytest.raises(units.UnitsError, match=r"units\.json: missing"):
    units.load(damaged("units.json", os.remove))
  with pytest.raises(units.UnitsError, match=r"units\.json: unreadable"):
    units.load(damaged("units.json", lambda p: p.write_text("{not json")))
  with pytest.raises(units.UnitsError, match=r"centroids\.npy: missing"):
    units.load(damaged("centroids.npy", os.remove))
  with pytest.raises(units.UnitsError, match=r"encoder\.safetensors: unreadable"):
    units.load(damaged("encoder.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])))

  def flip_centroid(p):
    c = np.load(p)
    c[0, 0] += 1.0
    np.save(p, c)

  with pytest.raises(units.UnitsError, match="hash to version .* changed or damaged"):
    units.load(damaged("centroids.npy", flip_centroid))
  with pytest.raises(units.UnitsError, match="unknown kind 'vq'"):
    units.load(damaged("units.json", lambda p: p.write_text(p.read_text().replace('"kmeans"', '"vq"'))))


def test_kmeans_limits():
  with pytest.raises(ValueError, match="vocab_size=8 is more than the 5 frames"):
    clustering.fit(np.zeros((5, 3), np.float32), 8)
  x = np.random.default_rng(0).normal(size=(300, 4)).astype(np.float32)
  x[:100] += 10.0
  centroids, err = clustering.fit(x, 2, seed=3)
  assert sorted(np.round(centroids[:, 0]).tolist()) == [0.0, 10.0] and err < 5.0
  y = np.random.default_rng(1).normal(size=(2000, 8)).astype(np.float32)
  seeded, lloyd = clustering.fit(y, 16, seed=0, iterations=0)[1], clustering.fit(y, 16, seed=0, iterations=10)[1]
  assert lloyd < 0.95 * seeded  # Lloyd iterations improve on the k-means++ seeding
  sample = clustering.FrameSample(50, seed=1).extend([x[:120], x[120:]])
  assert sample.frames.shape == (50, 4) and sample.seen == 300
  again = clustering.FrameSample(50, seed=1).extend([x[:120], x[120:]])
  np.testing.assert_array_equal(sample.frames, again.frames)
  assert {tuple(r) for r in sample.frames} <= {tuple(r) for r in x}


def test_code_index(tmp_path, fitted):
  clip = _clips()[0]
  index = units.CodeIndex.for_units(fitted)
  ids = fitted.encode_file(clip)
  sha1 = index.add(clip, ids)
  path = tmp_path / "codes.json"
  index.save(path)
  loaded = units.CodeIndex.load(path)
  assert loaded.version == fitted.version and loaded.vocab_size == K and loaded.frame_rate == 50
  moved = tmp_path / "moved.wav"
  shutil.copy(clip, moved)  # the corpus moved: same bytes, same codes
  np.testing.assert_array_equal(loaded.lookup(moved), ids)
  np.testing.assert_array_equal(loaded.lookup_hash(sha1), ids)
  assert loaded.lookup(_clips()[1]) is None
  with pytest.raises(units.UnitsError, match="no such codes index"):
    units.CodeIndex.load(tmp_path / "none.json")
  body = json.loads(path.read_text())
  body["codes"][sha1] = [0, K]
  (tmp_path / "bad.json").write_text(json.dumps(body))
  with pytest.raises(units.UnitsError, match=rf"bad\.json: codes of {sha1}: ids must lie in \[0, {K}\)"):
    units.CodeIndex.load(tmp_path / "bad.json")
  del body["units_version"]
  (tmp_path / "bad2.json").write_text(json.dumps(body))
  with pytest.raises(units.UnitsError, match="bad2.json: key 'units_version' is missing"):
    units.CodeIndex.load(tmp_path / "bad2.json")


def _cli(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "omni_jax.units", *args], cwd=cwd, capture_output=True, text=True,
                        timeout=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Records in the project's JSONL format: assistant `speech` (pytest-audioeval + one eSpeak NG clip at its
  own 22,050 Hz rate) and one user audio part."""
  from data import espeak

  root = tmp_path_factory.mktemp("corpus")
  media = root / "media"
  media.mkdir()
  clips = _clips()  # 3 English clips
  for p in clips:
    shutil.copy(p, media / os.path.basename(p))
  wave, rate = espeak.synthesize("Speech units for the talker.", "en")
  soundfile.write(media / "espeak.wav", wave.astype(np.float32) / 32768.0, rate, subtype="PCM_16")
  names = [os.path.basename(p) for p in clips] + ["espeak.wav"]
  lines = [{"messages": [{"role": "user", "content": "Say something."},
                         {"role": "assistant", "content": "Something.", "speech": f"media/{n}"}]} for n in names[1:]]
  lines.append({"messages": [{"role": "user", "content": [{"type": "audio", "audio": f"media/{names[0]}"}]},
                             {"role": "assistant", "content": "Heard.", "speech": f"media/{names[1]}"}]})
  (root / "speech.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + "{broken\n")
  return root, names


def test_cli_fit_and_encode_end_to_end(corpus, tmp_path):
  root, names = corpus
  data = str(root / "*.jsonl")
  # A parameters checkpoint of a tiny Thinker (not the config's init): fit copies its audio tower.
  config = tiny.get_config()
  _, state, _ = omni.create_sharded(config, sharding.make_mesh(config.mesh), seed=11)
  ckpt = tmp_path / "ckpt"
  checkpoint.save_params(str(ckpt), state, config)
  out = tmp_path / "units"
  fit = _cli("fit", "--config", "configs/tiny.py", "--checkpoint", str(ckpt), "--data", data, "--include_user_audio",
             "--layer", "2", "--vocab_size", "16", "--seed", "5", "--out", str(out))
  assert fit.returncode == 0, fit.stderr
  summary = fit.stdout.strip().splitlines()[-1]
  assert summary.startswith(f"fit kmeans units on {len(names)} files (0 skipped)") and "layer 2, vocab 16" in summary
  fitted = units.load(out)
  assert f"version {fitted.version}" in summary and f"skipped 1 of {len(names) + 1} records" in fit.stderr
  # The same fit in process, from the checkpoint's tower, is the same unit set.
  order = names[1:] + names[:1]  # the records' order: assistant speech, then the user audio
  encoder = units.FrozenEncoder.from_tower(thinker_audio(config), state["thinker"]["audio_tower"], 2)
  same = units.KMeansUnits.fit(encoder, [audio_lib.features_from_file(root / "media" / n) for n in order], 16,
                               seed=5)
  assert same.version == fitted.version

  codes = tmp_path / "codes.json"
  enc = _cli("encode", "--units", str(out), "--data", data, "--out", str(codes))
  assert enc.returncode == 0, enc.stderr
  speech = len(names) - 1
  assert enc.stdout.strip().startswith(f"encoded {speech} files (0 already in the index, 0 skipped)")
  index = units.CodeIndex.load(codes)
  assert index.version == fitted.version and len(index) == speech
  moved = tmp_path / "elsewhere.wav"
  shutil.copy(root / "media" / "espeak.wav", moved)
  np.testing.assert_array_equal(index.lookup(moved), fitted.encode_file(root / "media" / "espeak.wav"))
  assert index.lookup(root / "media" / names[0]) is None  # user audio: only with --include_user_audio
  again = _cli("encode", "--units", str(out), "--data", data, "--include_user_audio", "--out", str(codes))
  assert again.returncode == 0 and f"encoded {len(names)} files ({speech} already in the index" in again.stdout
  assert len(units.CodeIndex.load(codes)) == len(names)


def test_cli_refuses_bad_paths_and_other_units(corpus, fitted, tmp_path):
  root, _ = corpus
  data = str(root / "*.jsonl")
  for args, message in (
      (("fit", "--config", "configs/none.py", "--data", data, "--out", str(tmp_path / "u")),
       "--config: configs/none.py does not exist"),
      (("fit", "--config", "configs/tiny.py", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "u")),
       "--data:"),
      (("encode", "--units", str(tmp_path / "nothing"), "--data", data, "--out", str(tmp_path / "c.json")),
       "no such speech-units directory"),
      (("frobnicate",), "give one command")):
    result = _cli(*args)
    assert result.returncode == 2, (args, result.stderr)
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
  # An index made with other units is not extended.
  fitted.save(tmp_path / "units")
  units.CodeIndex("0123456789abcdef", K).save(tmp_path / "other.json")
  result = _cli("encode", "--units", str(tmp_path / "units"), "--data", data, "--out", str(tmp_path / "other.json"))
  assert result.returncode == 2 and "made with speech units 0123456789abcdef" in result.stderr


def test_fit_without_checkpoint_copies_the_configs_seeded_init():
  from omni_jax.units import cli

  config = tiny.get_config()
  audio, tower, source = cli._audio_tower(config, None)
  _, state, _ = omni.create_sharded(config, sharding.make_mesh(config.mesh))
  assert audio == thinker_audio(config) and source == f"random init (config seed {config.get('seed', 0)})"
  np.testing.assert_array_equal(np.asarray(tower["conv1"]["kernel"][...]),
                                np.asarray(state["thinker"]["audio_tower"]["conv1"]["kernel"][...]))

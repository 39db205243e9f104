"""Training the DiT (objective token2wav_flow): the time sampling and condition-dropout masks, the loss on the
real frames only, startup errors for bad config keys, DiT triples through the real pipeline (skips counted),
and a short run of train.py's loop on the demo corpus's spoken replies: the loss falls, the checkpoint restores
and samples a mel, and that mel follows the codes (closer to its own target than to another reply's, and
closer than the same model's mel without codes)."""

import json
import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import soundfile
from flax import nnx

from omni_jax import checkpoint, towers
from omni_jax.errors import ConfigError
from omni_jax.models import omni
from omni_jax.token2wav import mel as mel_lib
from omni_jax.token2wav import objective, sampling
from omni_jax.token2wav import targets as flow_targets
from omni_jax.units import codes as codes_lib

STEPS = 160  # of the demo run (0.1 s each on 2 idle cores; a few minutes on a loaded machine)


def _config(codes_path=None, **flow):
  from configs import demo_token2wav  # noqa: PLC0415

  c = demo_token2wav.get_config()
  if codes_path is not None:
    c.data.speech_codes = str(codes_path)
  c.train.token2wav.update(flow)
  return c


# --------------------------------------------------------------------------------------- masks and the loss


def test_time_sampling_follows_the_documented_distributions():
  key = jax.random.key(0)
  t = {s: np.asarray(objective.sample_time(key, 40000, flow_targets.FlowConfig(time_sampling=s)))
       for s in flow_targets.TIME_SAMPLING}
  assert all(v.min() >= 0 and v.max() <= 1 for v in t.values())
  assert np.mean(t["uniform"]) == pytest.approx(0.5, abs=0.01)
  # cosine: t = 1 - cos(pi u / 2), the sway -1 warp of the inference grid; E[t] = 1 - 2 / pi.
  assert np.mean(t["cosine"]) == pytest.approx(1 - 2 / np.pi, abs=0.01)
  assert np.mean(t["cosine"] < 0.5) == pytest.approx(2 / 3, abs=0.01)  # P(u < 2/3): more steps near the noise
  assert np.median(t["logit_normal"]) == pytest.approx(0.5, abs=0.01)
  assert np.mean(np.abs(t["logit_normal"] - 0.5) < 0.25) > np.mean(np.abs(t["uniform"] - 0.5) < 0.25) + 0.1


def test_condition_dropout_masks():
  flow = flow_targets.FlowConfig(drop_audio=0.3, drop_code=0.2)
  audio, code = (np.asarray(m) for m in objective.dropout_masks(jax.random.key(1), 50000, flow))
  assert np.all(audio[code])  # a code-dropped row is the unconditional row: its speaker is dropped too
  assert code.mean() == pytest.approx(0.2, abs=0.01)
  assert audio.mean() == pytest.approx(0.2 + 0.8 * 0.3, abs=0.01)
  assert (audio & ~code).mean() == pytest.approx(0.8 * 0.3, abs=0.01)  # speaker-only drops exist
  none = [np.asarray(m) for m in objective.dropout_masks(jax.random.key(1), 1000, flow_targets.FlowConfig(
      drop_audio=0.0, drop_code=0.0))]
  assert not none[0].any() and not none[1].any()


@pytest.fixture(scope="module")
def tiny_dit():
  """The demo config's DiT alone (the objective reads model.token2wav.code2wav_dit_model and .flow)."""
  from omni_jax.models.dit import DiT, DiTConfig  # noqa: PLC0415

  c = _config("codes.json")
  return nnx.split(DiT(DiTConfig.from_config(c.model.token2wav.dit), rngs=nnx.Rngs(0))), \
      flow_targets.FlowConfig.from_config(c)


def _as_model(graphdef, state, flow):
  return types.SimpleNamespace(token2wav=types.SimpleNamespace(code2wav_dit_model=nnx.merge(graphdef, state),
                                                               flow=flow))


def _dit_batch(rows=3, frames=48, ref=40, seed=0):
  rng = np.random.default_rng(seed)
  lengths = np.array([48, 30, 0][:rows], np.int32)
  return {"token2wav_codes": jnp.asarray(rng.integers(0, 65, (rows, frames // 2)), jnp.int32),
          "token2wav_mel": jnp.asarray(rng.normal(-5, 2, (rows, frames, 80)), jnp.float32),
          "token2wav_lengths": jnp.asarray(lengths),
          "token2wav_reference": jnp.asarray(rng.normal(-5, 2, (rows, ref, 80)), jnp.float32)}


def test_flow_loss_is_the_rectified_flow_error_on_real_frames_with_the_dropped_conditions(tiny_dit):
  (graphdef, state), flow = tiny_dit
  batch = _dit_batch()
  rng = jax.random.key(7)

  @jax.jit
  def both(state, batch):
    model = _as_model(graphdef, state, flow)
    got, ev = objective.flow_loss(model, batch, rng), objective.flow_loss(model, batch, rng, evaluate=True)
    # The same draws by hand: x_t = (1 - t) x0 + t x1, target x1 - x0, rows dropped as dropout_masks says.
    dit = model.token2wav.code2wav_dit_model
    k_time, k_noise, k_drop = jax.random.split(rng, 3)
    t = objective.sample_time(k_time, 3, flow)
    x1 = batch["token2wav_mel"]
    x0 = jax.random.normal(k_noise, x1.shape)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
    audio, code = objective.dropout_masks(k_drop, 3, flow)
    ref = jnp.where(audio[:, None, None], 0.0, batch["token2wav_reference"])
    codes = jnp.where(code[:, None], 0, batch["token2wav_codes"])
    frames = jnp.array([48, 30, 48])  # real frames; the empty row attends to all (its loss is not counted)
    v = dit(xt, ref, jnp.zeros((3, 16)), codes, t, frames=frames)
    v_cond = dit(xt, batch["token2wav_reference"], jnp.zeros((3, 16)), batch["token2wav_codes"], t, frames=frames)
    return got, ev, v - (x1 - x0), v_cond - (x1 - x0), audio

  got, ev, d, d_cond, audio = jax.device_get(both(state, batch))
  assert np.any(audio) and not np.all(audio)  # this key drops some rows' speaker, not all
  err, err_cond = np.mean(np.square(d), axis=-1), np.mean(np.square(d_cond), axis=-1)
  assert float(got["count"]) == 78 == float(objective.num_frames(batch))  # row 1: 30 real frames; row 2 none
  np.testing.assert_allclose(float(got["loss_sum"]), err[0].sum() + err[1, :30].sum(), rtol=1e-5)
  # Evaluation drops nothing: the conditional loss.
  np.testing.assert_allclose(float(ev["loss_sum"]), err_cond[0].sum() + err_cond[1, :30].sum(), rtol=1e-5)
  kept = ~audio[:2]  # real rows whose conditions stayed: the same error; dropped ones differ
  np.testing.assert_allclose(err[:2][kept], err_cond[:2][kept], rtol=1e-6)
  assert not np.allclose(err[:2][~kept], err_cond[:2][~kept], rtol=1e-7, atol=0)
  # A batch without DiT rows contributes nothing.
  none = objective.flow_loss(_as_model(graphdef, state, flow), {"input_ids": jnp.zeros((2, 4), jnp.int32)}, rng)
  assert float(none["count"]) == 0


@pytest.mark.parametrize("key, value, message", [
    ("train.token2wav.time_sampling", "sway", "config.train.token2wav.time_sampling"),
    ("train.token2wav.drop_code", 1.0, "config.train.token2wav.drop_code"),
    ("train.token2wav.max_frames", 481, "config.train.token2wav.max_frames"),
    ("train.token2wav.ref_frames", 1, "config.train.token2wav.ref_frames"),
    ("train.token2wav.drop_rate", 0.1, "config.train.token2wav: unknown keys ['drop_rate']"),
])
def test_bad_config_keys_fail_at_startup(key, value, message):
  c = _config("codes.json")
  section, name = key.rsplit(".", 1)
  node = c
  for part in section.split("."):
    node = node[part]
  with c.unlocked():
    node[name] = value
  with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
    towers.validate(c)


def test_training_the_dit_without_a_codes_index_fails_when_the_data_starts():
  from data import demo_corpus  # noqa: F401, PLC0415 - registers the config's source, as train.py does
  from omni_jax.input import pipeline  # noqa: PLC0415

  with pytest.raises(ConfigError, match="config.train.objectives.token2wav_flow: .* config.data.speech_codes"):
    pipeline.build_dataset(_config(), split="train")


# --------------------------------------------------------------------------------------- the real pipeline


def _quantizer_codes(path, vocab=64, seed=0):
  """Stand-in speech units for the tests (no units fit): each 2-frame mel pair -> the nearest of `vocab` random
  unit vectors after a fixed random projection (a deterministic code that carries the content)."""
  mel = mel_lib.log_mel_file(path)
  n = mel.shape[0] // 2
  pairs = mel[:2 * n].reshape(n, 2, 80).mean(1)
  rng = np.random.default_rng(seed)
  proj, book = rng.standard_normal((80, 16)), rng.standard_normal((vocab, 16))
  z = (pairs - pairs.mean(1, keepdims=True)) @ proj
  z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-6
  return np.argmax(z @ (book / np.linalg.norm(book, axis=1, keepdims=True)).T, axis=1)


def _tiny_corpus(tmp_path):
  """Five spoken replies of two speakers (tones), one without codes, one unreadable; a codes index."""
  media = tmp_path / "media"
  media.mkdir()
  index = codes_lib.CodeIndex("unitsT", 64)
  lines = []
  for i in range(5):
    wav = media / f"a{i}.wav"
    if i == 4:
      wav.write_bytes(b"not audio")
    else:
      t = np.arange(int(16000 * (0.5 + 0.2 * i))) / 16000
      soundfile.write(wav, (0.3 * np.sin(2 * np.pi * (220 + 60 * i) * t)).astype(np.float32), 16000)
    if i != 3:  # reply 3 is not in the index: skipped as no_speech_codes
      index.add(wav, np.arange(int(50 * (0.5 + 0.2 * i))) % 64)
    lines.append(json.dumps({"id": f"q{i}", "messages": [
        {"role": "user", "content": f"question {i}"},
        {"role": "assistant", "content": f"answer {i}", "speech": f"media/a{i}.wav",
         "speaker": "Ethan" if i % 2 else "Chelsie"}]}))
  (tmp_path / "spoken.jsonl").write_text("\n".join(lines) + "\n")
  index.save(tmp_path / "codes.json")
  return tmp_path / "spoken.jsonl", tmp_path / "codes.json"


def test_spoken_replies_become_dit_rows_through_the_pipeline(tmp_path):
  from omni_jax.input import pipeline  # noqa: PLC0415
  from omni_jax.talker import targets as talker_targets  # noqa: PLC0415

  jsonl, codes_path = _tiny_corpus(tmp_path)
  c = _config(codes_path, max_frames=96, ref_frames=40)
  c.data.source = "jsonl"
  c.data.datasets = ml_collections.ConfigDict({"spoken": str(jsonl)})
  c.data.mixture = ml_collections.ConfigDict({"spoken": 1.0})
  c.data.tfds_data_dir = str(tmp_path / "tfds")
  c.data.shuffle = False
  c.data.buckets = (dict(seq_len=64, max_images=0, max_image_patches=0, max_videos=0, max_video_patches=0,
                         max_audios=0, max_audio_frames=0),)
  c.train.batch_size = 4
  towers.validate(c)
  talker_targets.settle_units(c)
  it = pipeline.DataIterator(pipeline.build_dataset(c, split="train"))
  batch = next(it)
  towers.check_batch(batch)
  assert batch["token2wav_mel"].shape == (4, 96, 80) and batch["token2wav_codes"].shape == (4, 48)
  assert batch["token2wav_reference"].shape == (4, 40, 80)
  lengths = sorted(int(x) for x in batch["token2wav_lengths"])
  # Replies 0, 1, 2: 25 / 35 / 45 codes, 50 / 70 / 90 mel frames (cut to the codes); 96 frames fit them.
  assert set(lengths) == {50, 70, 90}  # the endless train stream: the fourth row starts the next epoch
  skipped = it.metrics()
  assert skipped.get("skipped/no_speech_codes", 0) >= 1 and skipped.get("skipped/bad_speech_audio", 0) >= 1, skipped
  for r in range(4):
    n = int(batch["token2wav_lengths"][r])
    if not n:
      continue
    i = [50, 70, 90].index(n)
    want = mel_lib.log_mel_file(tmp_path / "media" / f"a{i}.wav")[:n]
    np.testing.assert_allclose(batch["token2wav_mel"][r, :n], want, atol=1e-5)
    assert np.all(batch["token2wav_mel"][r, n:] == np.float32(np.log(mel_lib.LOG_FLOOR)))
    np.testing.assert_array_equal(batch["token2wav_codes"][r, :n // 2], np.arange(n // 2) % 64)
    assert not batch["token2wav_codes"][r, n // 2:].any()
    # The reference: ANOTHER clip of the same speaker (Chelsie: 0 and 2 -> each other; Ethan: 1 has no other
    # readable clip with codes... its pool holds every spoken clip of the speaker: 1, 3), tiled to 40 frames.
    other = {0: 2, 2: 0, 1: 3}[i]
    ref = mel_lib.log_mel_file(tmp_path / "media" / f"a{other}.wav")
    np.testing.assert_allclose(batch["token2wav_reference"][r], ref[np.arange(40) % len(ref)], atol=1e-5)
  it.close()


# --------------------------------------------------------------------------------------- a run on the demo corpus


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  """train.py's loop: the tiny DiT on the demo corpus's 12 spoken replies (the Thinker and Talker frozen)."""
  import train_testlib as lib  # noqa: PLC0415
  from data import demo_corpus  # noqa: PLC0415
  from omni_jax.train import loop  # noqa: PLC0415

  root = os.path.expanduser(demo_corpus.DEFAULT_DIR)
  demo_corpus.ensure(root)
  work = tmp_path_factory.mktemp("dit")
  index = codes_lib.CodeIndex("quantizer", 64)
  clips = sorted(os.path.join(root, "media", "speech", f) for f in os.listdir(os.path.join(root, "media", "speech"))
                 if f.startswith("a"))
  for clip in clips:
    index.add(clip, _quantizer_codes(clip))
  index.save(work / "codes.json")
  c = _config(work / "codes.json", max_frames=192, ref_frames=100)
  c.data.worker_count = 0
  c.data.buckets = (dict(seq_len=192, max_images=0, max_image_patches=0, max_videos=0, max_video_patches=0,
                         max_audios=1, max_audio_frames=600, talker_seq_len=0),)
  c.model.talker.units_version = "quantizer"
  c.train.update(dict(steps=STEPS, batch_size=4, lr=4e-3, warmup_steps=10, log_every=10, eval_every=STEPS,
                      checkpoint_every=STEPS, async_checkpointing=False))
  c.eval.update(dict(at_start=True, samples_per_dataset=6, batch_size=4, steps=2))  # the held-out replies
  c.data.speech_codes = str(work / "codes.json")
  loop.run(c, str(work / "run"), lib.hooks(), devices=lib.one_device())
  with open(work / "run" / "metrics.jsonl") as f:
    metrics = [json.loads(line) for line in f]
  return work, clips, metrics


def _restore(workdir):
  step_dir = checkpoint.params_dir(workdir)
  config = checkpoint.load_config(checkpoint.find_config(step_dir))
  graphdef, abstract = omni.abstract_model(config)
  return config, nnx.merge(graphdef, checkpoint.restore_params(step_dir, abstract))


@pytest.mark.slow
def test_the_flow_loss_falls_on_the_demo_corpus(demo_run):
  _, _, metrics = demo_run
  evals = [m for m in metrics if "eval/token2wav_flow/loss" in m]
  train = [m["train/token2wav_flow/loss"] for m in metrics if "train/token2wav_flow/loss" in m]
  first, last = evals[0]["eval/token2wav_flow/loss"], evals[-1]["eval/token2wav_flow/loss"]
  assert evals[0]["step"] == 0 and evals[-1]["step"] == STEPS
  assert last < 0.25 * first, (first, last)  # measured: 37.5 -> 3.8
  assert np.mean(train[-3:]) < 0.5 * train[0], train


@pytest.mark.slow
def test_the_checkpoint_restores_and_its_mel_follows_the_codes(demo_run):
  work, clips, _ = demo_run
  config, model = _restore(work / "run")
  assert model.token2wav.flow.ref_frames == 100  # the training settings travel with the checkpoint's config
  dit = model.token2wav.code2wav_dit_model
  index = codes_lib.CodeIndex.load(work / "codes.json")
  sampler = sampling.SamplerConfig(num_steps=10, guidance_scale=0.5, method="rk4")
  pick = clips[:4]
  targets_ = [mel_lib.log_mel_file(p) for p in pick]
  n = min(min(len(index.lookup(p)), len(t) // 2) for p, t in zip(pick, targets_))
  n = min(n, 96)
  codes = np.stack([index.lookup(p)[:n] for p in pick]).astype(np.int32)
  target = np.stack([t[:2 * n] for t in targets_])
  voice = mel_lib.log_mel_file(clips[-1])  # one reference clip of the (single) demo speaker, not compared below
  ref = np.stack([voice[np.arange(100) % len(voice)]] * 4)
  cond = np.zeros((4, dit.cfg.enc_emb_dim), np.float32)
  noise = jax.random.normal(jax.random.key(3), (4, 2 * n, 80))
  mel = np.asarray(sampling.sample(dit, codes, cond, ref, noise=noise, sampler=sampler))
  blind = np.asarray(sampling.sample(dit, np.zeros_like(codes), cond, ref, noise=noise, sampler=sampler))
  assert mel.shape == (4, 2 * n, 80) and np.all(np.isfinite(mel))
  l1 = lambda a, b: float(np.mean(np.abs(a - b)))  # noqa: E731 - L1 on the natural-log mel
  own = [l1(mel[i], target[i]) for i in range(4)]
  other = [l1(mel[i], target[(i + 1) % 4]) for i in range(4)]
  blind_own = [l1(blind[i], target[i]) for i in range(4)]
  blind_other = [l1(blind[i], target[(i + 1) % 4]) for i in range(4)]
  # Its own target is the closest (a DiT that ignores its codes has no reason to land nearer its own target
  # than another's).
  assert all(o < x for o, x in zip(own, other)) and np.mean(own) < 0.85 * np.mean(other), (own, other)
  # The control: the same model and noise without codes (guidance's unconditional input) tells the replies apart
  # far less, so the gap comes from the codes. (Its L1 to the own target can be lower: an average-like mel.)
  gap, blind_gap = np.mean(other) - np.mean(own), np.mean(blind_other) - np.mean(blind_own)
  assert gap > blind_gap + 0.1 * np.mean(other), (own, other, blind_own, blind_other)
  del config

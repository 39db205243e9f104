"""Spoken replies as audio (omni_jax/token2wav/voice.py, OmniChat.speak, generate.py --speak --wav_out).

A tiny Thinker + Talker + Token2Wav with random weights, saved the way the converter saves (params/ + config.json
+ speakers.safetensors written by omni_jax.convert.speakers from spk_dict-shaped tensors): the reply's WAV is 24 kHz
mono with 480 samples per speech code; the DiT is conditioned on the named speaker's stored cond / ref_mel; the
vocoder is Griffin-Lim for a checkpoint trained here and BigVGAN when the weights came from transformers (the
converter's hf_assets/token2wav_config.json, a transformers directory, or a run initialised from one); a model
without Token2Wav writes codes only, or fails when the WAV was asked for.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import soundfile

from omni_jax import checkpoint, sharding, towers
from omni_jax.convert import speakers
from omni_jax.generate import api
from omni_jax.models import dit as dit_lib
from omni_jax.token2wav import griffin_lim, sampling, synthesis, voice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEAK = dict(max_new_tokens=4, do_sample=False, talker_max_new_tokens=10, talker_do_sample=False)
ENC = 8  # the DiT's speaker-vector width


def _config():
  from configs import tiny  # noqa: PLC0415

  c = tiny.get_config()
  c.mesh = {"data": 1}
  c.model.token2wav = ml_collections.ConfigDict(dict(
      dit=dit_lib.config_dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, ff_mult=2,
                              emb_dim=16, block_size=4, look_ahead_layers=[1], look_backward_layers=[0],
                              num_embeds=64, enc_emb_dim=ENC, enc_dim=8, enc_channels=[16, 16, 16, 16, 48],
                              enc_attention_channels=8, enc_se_channels=8, dropout=0.0),
      bigvgan=dict(upsample_initial_channel=64, resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1]]),
      dtype="float32"))
  return c


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A parameters checkpoint with the released voices' tensors (as spk_dict.pt holds them: cond [1, 8],
  ref_mel [1, T, 80]) written by the converter's own writer."""
  from omni_jax.models import omni as omni_lib  # noqa: PLC0415

  path = str(tmp_path_factory.mktemp("speak"))
  c = _config()
  _, state, _ = omni_lib.create_sharded(c, sharding.make_mesh({"data": 1}, jax.devices()[:1]), seed=3)
  checkpoint.save_params(path, state, c)
  rng = np.random.default_rng(0)
  table = {name: {"bos_token": int(bos), "cond": rng.standard_normal((1, ENC), np.float32),
                  "ref_mel": rng.standard_normal((1, 30, 80), np.float32) - 4.0}
           for name, bos in sorted(dict(c.model.talker.speakers).items())}
  speakers.save_tensors(path, table)
  return path, table


@pytest.fixture(scope="module")
def model(ckpt):
  return api.load(ckpt[0])


def _wav(path):
  info = soundfile.info(str(path))
  audio, rate = soundfile.read(str(path), dtype="float32")
  return info, audio, rate


def test_speak_to_file_writes_24khz_wav_and_png_in_the_stored_voice(model, ckpt, tmp_path):
  _, table = ckpt
  codes_json, wav, png = tmp_path / "reply.codes.json", tmp_path / "reply.wav", tmp_path / "reply.png"
  speech = api.speak_to_file(model, "Say hello.", str(codes_json), speaker="Ethan", wav_out=str(wav),
                             mel_png=str(png), require_wav=True, **SPEAK)
  n = len(speech.codes)
  assert n > 0
  info, audio, rate = _wav(wav)
  assert (rate, info.channels, info.subtype) == (24000, 1, "PCM_16")
  assert len(audio) == n * 2 * 240 == len(speech.audio)  # 2 mel frames per code, 240 samples per frame
  np.testing.assert_allclose(audio, speech.audio, atol=1 / 32767)  # 16-bit quantisation
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
  written = json.loads(codes_json.read_text())
  assert written["codes"] == speech.codes.tolist() and written["speaker"] == "Ethan"
  assert written["vocoder"] == "griffin_lim" and written["sample_rate"] == 24000  # trained here: no real BigVGAN
  # The DiT mel is the one the stored Ethan tensors condition (seed config.generate.voice.seed = 0) ...
  token2wav = model.voicer.token2wav
  ethan = table["Ethan"]
  want = sampling.sample(token2wav.code2wav_dit_model, jnp.asarray(speech.codes[None]),
                         jnp.asarray(ethan["cond"]), jnp.asarray(ethan["ref_mel"]), seed=0)
  np.testing.assert_allclose(speech.mel, np.asarray(want)[0], atol=1e-5)
  # ... and the audio is that mel through the Griffin-Lim fallback.
  np.testing.assert_allclose(speech.audio, griffin_lim.mel_to_audio(speech.mel, seed=0), atol=1e-6)
  other = model.voice(speech.codes, "Chelsie")
  assert np.abs(other.mel - speech.mel).mean() > 1e-3  # another voice conditions another mel
  np.testing.assert_array_equal(model.voice(speech.codes, "Ethan").audio, speech.audio)  # seeded


def test_bigvgan_path_bfloat16_and_clip_voices(model, ckpt, tmp_path):
  _, table = ckpt
  codes = np.array([3, 17, 17, 40, 2, 63, 5], np.int32)
  model.set_voice_options(vocoder="bigvgan")
  try:
    out = model.voice(codes, "Chelsie", seed=4)
    assert out.vocoder == "bigvgan" and out.audio.shape == (7 * 480,) and out.audio.dtype == np.float32
    chelsie = table["Chelsie"]
    want = synthesis.synthesize(model.voicer.token2wav, codes[None], chelsie["cond"], chelsie["ref_mel"], seed=4)
    np.testing.assert_allclose(out.audio, want.audio[0], atol=1e-6)
    model.set_voice_options(vocoder="bigvgan", dtype="bfloat16")
    half = model.voice(codes, "Chelsie", seed=4)
    assert half.audio.dtype == np.float32 and half.audio.shape == out.audio.shape
    assert model.voicer.token2wav.code2wav_dit_model.rt.dtype == jnp.bfloat16
    rel = np.abs(half.mel - out.mel).max() / np.abs(out.mel).max()
    assert 0 < rel < 0.05, rel  # bfloat16 really ran, and stays close
  finally:
    model.set_voice_options()
  assert model.voice(np.zeros(0, np.int32), "Chelsie").audio.shape == (0,)
  # A DiT trained here conditions on a reference clip only (zero cond): any recording can be the voice.
  clip = tmp_path / "clip.wav"
  voice.write_wav(clip, (0.3 * np.sin(np.linspace(0, 300, 7200))).astype(np.float32))  # 0.3 s: 30 frames
  name = model.voicer.add_clip_voice(str(clip), name="Ethan")
  try:
    v = model.voicer.voices[name]
    assert not v.cond.any() and v.cond.shape == (ENC,) and v.ref_mel.shape == (30, 80)
    assert model.voice(codes, "Ethan").audio.shape == (7 * 480,)
  finally:
    model._voicer = None  # back to the stored voices
  with pytest.raises(voice.VoiceError, match="speaker 'Nobody' has no cond / ref_mel"):
    model.voice(codes, "Nobody")


def test_vocoder_choice(tmp_path):
  path = tmp_path / "trained_here"  # a parameters checkpoint of a run without init_from
  (path / "params").mkdir(parents=True)
  (path / "config.json").write_text(json.dumps({"model": {}}))
  path = str(path)
  assert not voice.converted_vocoder(path)
  assert voice.choose_vocoder("auto", path) == "griffin_lim"
  assert voice.choose_vocoder("bigvgan", path) == "bigvgan"
  conv = tmp_path / "converted"  # what `python -m omni_jax.convert --hf_dir` writes for a full Omni checkpoint
  (conv / "params").mkdir(parents=True)
  (conv / "hf_assets").mkdir()
  (conv / "hf_assets" / "token2wav_config.json").write_text("{}")
  assert voice.choose_vocoder("auto", str(conv)) == "bigvgan"
  assert voice.choose_vocoder("griffin_lim", str(conv)) == "griffin_lim"
  run = tmp_path / "finetuned"  # a training run started from it (config.init_from, followed through)
  (run / "params").mkdir(parents=True)
  (run / "config.json").write_text(json.dumps({"init_from": str(conv)}))
  assert voice.converted_vocoder(str(run))
  (run / "config.json").write_text(json.dumps({"init_from": path}))
  assert not voice.converted_vocoder(str(run))
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  (hf_dir / "model.safetensors").write_bytes(b"")
  (hf_dir / "config.json").write_text(json.dumps({"token2wav_config": {"dit_config": {}}}))
  assert voice.converted_vocoder(str(hf_dir))
  (hf_dir / "config.json").write_text(json.dumps({"thinker_config": {}}))
  assert not voice.converted_vocoder(str(hf_dir))
  with pytest.raises(voice.VoiceError, match="is not one of"):
    voice.choose_vocoder("wavenet", path)
  c = ml_collections.ConfigDict({"generate": {"voice": {"vocoder": "hifigan"}}})
  with pytest.raises(Exception, match="config.generate.voice.vocoder"):
    voice.settings_of(c)[2].validate("generate.voice")


def test_without_token2wav_codes_only_or_a_clear_error(model, tmp_path):
  bare = api.OmniChat(model.generator, model.tokenizer, towers.without(model.config, "token2wav"))
  out = tmp_path / "codes.json"
  speech = api.speak_to_file(bare, "Say hello.", str(out), wav_out=str(tmp_path / "r.wav"), **SPEAK)
  assert speech.audio is None and not (tmp_path / "r.wav").exists()
  assert "wav" not in json.loads(out.read_text()) and json.loads(out.read_text())["codes"] == speech.codes.tolist()
  with pytest.raises(voice.VoiceError, match="no Token2Wav"):
    api.speak_to_file(bare, "Say hello.", str(out), wav_out=str(tmp_path / "r.wav"), require_wav=True, **SPEAK)


@pytest.mark.slow  # a fresh process: load and compile again (~20 s idle, 40 s on the shared 2 cores)
def test_generate_py_speak_writes_reply_wav(ckpt, tmp_path):
  path, _ = ckpt
  wav, png, codes = tmp_path / "reply.wav", tmp_path / "mel.png", tmp_path / "reply.codes.json"
  proc = subprocess.run([sys.executable, "generate.py", "--checkpoint", path, "--prompt", "Say hello.", "--greedy",
                         "--max_new_tokens", "4", "--speak", "--talker_greedy", "--talker_max_new_tokens", "10",
                         "--speaker", "Chelsie", "--codes_out", str(codes), "--wav_out", str(wav),
                         "--mel_png", str(png)], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  written = json.loads(codes.read_text())
  info, audio, rate = _wav(wav)
  assert rate == 24000 and info.channels == 1 and len(audio) == 480 * len(written["codes"]) > 0
  assert written["vocoder"] == "griffin_lim" and png.is_file()
  assert "s of speech (griffin_lim)" in proc.stdout

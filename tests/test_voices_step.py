"""`python -m omni_jax.token2wav.new_voice voices`: the step of run.sh main that gives a trained Token2Wav checkpoint
its voices (speakers.safetensors: a zero speaker vector and a clip's mel tiled to the DiT's reference length,
what training conditioned on). The whole main job, this step included, ending with `generate.py --speak`
writing a WAV: tests/test_demo_learns.py."""

import json
import os

import numpy as np
import soundfile


def test_the_voices_step_writes_what_training_conditions_on(tmp_path, capsys):
  from omni_jax.token2wav import voice  # noqa: PLC0415
  from omni_jax.token2wav import new_voice  # noqa: PLC0415

  ckpt = tmp_path / "ckpt"  # a parameters checkpoint's layout: params/ + config.json (nothing is restored)
  (ckpt / "params").mkdir(parents=True)
  (ckpt / "config.json").write_text(json.dumps({
      "model": {"token2wav": {"dit": {"enc_emb_dim": 8}},
                "talker": {"speakers": {"Chelsie": 1, "Ethan": 2}, "default_speaker": "Chelsie"}},
      "train": {"token2wav": {"ref_frames": 40}}}))
  clip = str(tmp_path / "clip.wav")
  soundfile.write(clip, 0.1 * np.sin(np.arange(8000) * 0.05).astype(np.float32), 16000)  # 0.5 s
  assert new_voice.main(["voices", "--checkpoint", str(ckpt), "--clip", clip, "--clip", f"Ada={clip}"]) == 0
  assert "is not one of the Talker's speakers" in capsys.readouterr().err  # Ada: Token2Wav only
  voices, where = voice.voices_of(str(ckpt))
  assert where == str(ckpt / "speakers.safetensors") and sorted(voices) == ["Ada", "Chelsie"]
  expected = voice.voice_from_clip(clip, enc_emb_dim=8, ref_frames=40)  # zero cond, the mel tiled to ref_frames
  np.testing.assert_array_equal(voices["Chelsie"].cond, expected.cond)
  np.testing.assert_allclose(voices["Chelsie"].ref_mel, expected.ref_mel, rtol=1e-6)
  assert not os.path.isdir(ckpt / "checkpoints") and voices["Chelsie"].ref_mel.shape == (40, 80)
  # Mistakes are one line and exit status 2.
  assert new_voice.main(["voices", "--checkpoint", str(ckpt), "--clip", str(tmp_path / "none.wav")]) == 2
  assert new_voice.main(["voices", "--checkpoint", str(tmp_path / "nowhere"), "--clip", clip]) == 2
  err = capsys.readouterr().err
  assert "none.wav does not exist" in err and "nowhere" in err and "Traceback" not in err

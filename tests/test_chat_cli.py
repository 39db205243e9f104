"""chat.py (omni_jax/serve/terminal.py): a piped terminal conversation on the tiny speaking checkpoint.

Attachments reach the next message, the conversation keeps its history (the same line asked twice gets two
different greedy replies), /speak on writes the spoken reply as a 24 kHz WAV, bad commands and missing files are
reported without ending the conversation, /quit ends it.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile

import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_piped_conversation(tiny_speech_checkpoint, tmp_path):
  import skimage.data  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415

  image = str(tmp_path / "astronaut.png")
  Image.fromarray(skimage.data.astronaut()).resize((56, 56)).save(image)
  lines = ["/image " + image, "What is in the picture?", "/speak off",  # markers between replies
           "Hello there.", "/speak off", "Hello there.", "/audio " + str(tmp_path / "missing.wav"), "/bogus",
           "/speak on", "Say it.", "/quit", "Never read."]
  out = subprocess.run([sys.executable, "chat.py", "--checkpoint", tiny_speech_checkpoint, "--greedy",
                        "--max_new_tokens", "6", "--out_dir", str(tmp_path / "replies")],
                       input="\n".join(lines) + "\n", capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env=xla_env.env(1))  # one host device, as a user's CPU chat has
  assert out.returncode == 0, out.stderr[-3000:]
  markers = r"\[(?:image .* attached to the next message|speech (?:on|off))\]\n"
  parts = re.split(markers, out.stdout)
  assert len(parts) == 5, out.stdout  # attached, off, off, on: four markers
  replies = [p.rstrip("\n") for p in parts[1:4]]  # the image question, "Hello there." twice
  spoken = parts[4]
  assert all(replies), out.stdout
  assert replies[1] != replies[2]  # turn 3 sees turns 1-2: the history is kept
  m = re.search(r"\[spoken reply: (.*reply_4\.wav), ([\d.]+) s\]", spoken)
  assert m, out.stdout
  wave, rate = soundfile.read(m.group(1), dtype="int16")
  assert rate == 24000 and wave.ndim == 1 and wave.size % 480 == 0 and wave.size > 0 and np.abs(wave).max() > 0
  assert abs(float(m.group(2)) - wave.size / 24000) < 0.01
  assert "missing.wav: no such file" in out.stderr and "unknown command /bogus" in out.stderr
  assert not os.path.exists(tmp_path / "replies" / "reply_5.wav")  # nothing after /quit

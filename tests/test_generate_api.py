"""The front doors of generation: omni_jax.generate.load(...).chat / stream_chat / chat_batch and generate.py.

A tiny model with the real Qwen vocabulary and tokenizer (the bundled qwen.tiktoken), random weights; an image
and a speech clip that ship in PyPI wheels.
"""

import os
import subprocess
import sys

import pytest
import skimage.data
from PIL import Image

import xla_env
from configs import tiny
from omni_jax import checkpoint
from omni_jax import generate
from omni_jax.models import omni
from omni_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
  c = tiny.get_config()
  c.mesh = {"data": 1}
  c.data.media = dict(image_min_pixels=4 * 28 * 28, image_max_pixels=16 * 28 * 28)
  return c


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A converter-style parameters checkpoint (params/ + config.json) of the tiny config."""
  path = str(tmp_path_factory.mktemp("ckpt"))
  c = _config()
  import jax  # noqa: PLC0415

  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  _, state, _ = omni.create_sharded(c, mesh, seed=3)
  checkpoint.save_params(path, state, c)
  return path


@pytest.fixture(scope="module")
def model(ckpt):
  return generate.load(ckpt)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("media") / "astronaut.png")
  Image.fromarray(skimage.data.astronaut()).save(path)
  return path


def test_chat_stream_and_batch_agree(model, image):
  kw = dict(max_new_tokens=6, do_sample=False)
  reply = model.chat("What is in the picture?", image=image, **kw)
  assert isinstance(reply, str) and reply
  assert "".join(model.stream_chat("What is in the picture?", image=image, **kw)) == reply
  batch = model.chat_batch([generate.prompts.conversation("What is in the picture?", images=[image]),
                            generate.prompts.conversation("Hello there, how are you today?")], **kw)
  assert batch[0] == reply
  assert batch[1] == model.chat("Hello there, how are you today?", **kw)


def test_sampling_settings_and_errors(model, image):
  a = model.chat("Say something.", max_new_tokens=8, do_sample=True, temperature=1.5, top_k=100, seed=1)
  assert a == model.chat("Say something.", max_new_tokens=8, do_sample=True, temperature=1.5, top_k=100, seed=1)
  with pytest.raises(ValueError, match="top_p"):
    model.chat("x", top_p=0.0)
  with pytest.raises(TypeError, match="unknown generation arguments"):
    model.chat("x", beams=4)
  with pytest.raises(generate.prompts.preprocess.SampleError, match="missing.png"):
    model.chat("x", image=os.path.join(os.path.dirname(image), "missing.png"))


@pytest.mark.slow
def test_generate_py_on_a_trained_workdir(tmp_path):
  """train.py for 2 steps, then generate.py on its workdir prints a reply; a bad checkpoint is one line."""
  env = xla_env.env(1, JAX_PLATFORMS="cpu")
  work = str(tmp_path / "work")
  subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", work,
                  "--config.train.steps=2", "--config.train.checkpoint_every=2", "--config.train.batch_size=2",
                  "--config.train.seq_len=64", "--config.train.log_every=1"], cwd=ROOT, env=env, check=True,
                 capture_output=True)
  out = subprocess.run([sys.executable, "generate.py", "--checkpoint", work, "--prompt", "Hello!",
                        "--max_new_tokens", "5", "--greedy"], cwd=ROOT, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip(), "generate.py printed no reply"
  bad = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "x"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
  assert bad.returncode == 2 and "error:" in bad.stderr and "nothing" in bad.stderr

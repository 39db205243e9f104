"""Shared helpers of the training tests: a tiny config with a small vocabulary, and a few steps on a mesh."""

import json
import os

import jax
import numpy as np

from configs import tiny
from omni_jax import sharding
from omni_jax.evaluate import hook as eval_hook
from omni_jax.talker import targets as talker_targets
from omni_jax.thinker import inputs as thinker_inputs
from omni_jax.train import data as data_lib
from omni_jax.train import loop
from omni_jax.train import state as state_lib
from omni_jax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Special token ids inside the small vocabulary (as in tests/hf_reference.py).
SMALL_IDS = dict(audio_token_id=1, image_token_id=2, video_token_id=3, audio_start_token_id=4, audio_end_token_id=5,
                 vision_start_token_id=7, vision_end_token_id=8, pad_token_id=0, user_token_id=6, eos_token_ids=(9,))
# The Talker's text-stream rows and voices inside the small vocabulary.
SMALL_TALKER_IDS = {"tts_text_start_token_id": 250, "tts_text_end_token_id": 251, "tts_text_pad_token_id": 252,
                    "speakers.Chelsie": 253, "speakers.Ethan": 254}


def small_talker_ids(c):
  for key, value in SMALL_TALKER_IDS.items():
    node, *rest = key.split(".")
    if rest:
      c.model.talker[node][rest[0]] = value
    else:
      c.model.talker[key] = value


def config(**train):
  """configs/tiny.py with a 256-token vocabulary, 8 x 32 batches and per-step logging."""
  c = tiny.get_config()
  c.model.thinker.text.vocab_size = 256
  c.model.thinker.update(SMALL_IDS)
  small_talker_ids(c)
  c.data.synthetic.vocab_size = 256
  c.train.update(dict(steps=6, batch_size=8, seq_len=32, log_every=1, warmup_steps=2, lr=3e-3,
                      checkpoint_every=0, eval_every=0, async_checkpointing=True))
  c.train.update(train)
  c.eval.update(dict(steps=1, batch_size=8))
  return c


def hooks():
  """train.py's training-loop hooks: the Talker's speech-unit check and the evaluation."""
  return [loop.Settle(talker_targets.settle_units), eval_hook.Evaluate()]


def thinker_logits(thinker, batch):
  """Logits [B, L, V] of a Thinker on a batch (under sharding.activate on a mesh)."""
  positions, media = thinker_inputs.model_inputs(batch, thinker.ids)
  return thinker(batch["input_ids"], positions, batch["segment_ids"], **media)


def one_device():
  """loop.run's devices where a test checks what a run does, not how a mesh splits it: a tiny model on one host
  device compiles and runs in about half the time it takes on eight. (The mesh tests compare meshes with one
  device step by step; tests/test_train_loop.py and the multi-process tests run the loop on several devices.)"""
  return jax.devices()[:1]


def mesh_of(shape):
  """A mesh over the first prod(shape) devices (dict(data=1) = one device)."""
  n = int(np.prod([v for v in shape.values()]))
  return sharding.make_mesh(shape, devices=jax.devices()[:n])


_SETUPS = {}


def setup_of(c, mesh):
  """state_lib.Setup (and its jitted step, once built) cached per config and mesh: tests recompile less."""
  key = (c.to_json(), tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat))
  if key not in _SETUPS:
    _SETUPS[key] = [state_lib.Setup(c, mesh), None]
  return _SETUPS[key]


def train_steps(c, mesh, n, state=None):
  """(losses, metrics list, state, setup) after n steps on `mesh` from the synthetic source's first batches."""
  entry = setup_of(c, mesh)
  setup = entry[0]
  state = setup.init() if state is None else state
  rows = data_lib.process_rows(mesh, c.sharding_rules, c.train.batch_size, c.train.seq_len)
  source = data_lib.make_source(c, "train", c.train.batch_size, rows)
  source.set_state({"next_batch": int(jax.device_get(state.step))})
  out = []
  for _ in range(n):
    batch = data_lib.to_global(next(source), mesh, c.sharding_rules, c.train.batch_size)
    if entry[1] is None:
      entry[1] = step_lib.jit_train_step(setup)
    state, m = entry[1](state, batch)
    out.append(jax.device_get(m))
  return [float(m["loss"]) for m in out], out, state, setup


def jsonl_losses(workdir):
  """{step: train/loss} from a run's metrics.jsonl (a re-run step keeps its latest value)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if "train/loss" in rec:
        out[rec["step"]] = rec["train/loss"]
  return out


# Runs of train.py in subprocesses: the same config as config(**train), spelled as flags.
def flags(**train):
  out = ["--config", os.path.join(ROOT, "configs", "tiny.py"), "--config.model.thinker.text.vocab_size=256",
         *[f"--config.model.thinker.{k}={v}" for k, v in SMALL_IDS.items()],
         *[f"--config.model.talker.{k}={v}" for k, v in SMALL_TALKER_IDS.items()],
         "--config.data.synthetic.vocab_size=256", "--config.eval.steps=1", "--config.eval.batch_size=8"]
  base = dict(steps=6, batch_size=8, seq_len=32, log_every=1, warmup_steps=2, lr=3e-3, checkpoint_every=0,
              eval_every=0)
  base.update(train)
  return out + [f"--config.train.{k}={v}" for k, v in base.items()]


def launch(workdir, *, env=None, extra=(), log_as=None, **train):
  """Popen of `python train.py` (stdout+stderr to <log_as or workdir>.log)."""
  import subprocess
  import sys

  os.makedirs(workdir, exist_ok=True)
  log = open(str(log_as or workdir).rstrip("/") + ".log", "w")
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--workdir", str(workdir), *flags(**train), *extra]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_for_step(workdir, step, proc, timeout=240):
  """Block until metrics.jsonl logs `step` (or the process ends / time runs out)."""
  import time

  end = time.time() + timeout
  path = os.path.join(workdir, "metrics.jsonl")
  while time.time() < end and proc.poll() is None:
    if os.path.exists(path) and max(jsonl_losses(workdir), default=0) >= step:
      return True
    time.sleep(0.02)
  return False


def log_text(log_as):
  with open(str(log_as).rstrip("/") + ".log") as f:
    return f.read()

"""Speech-code generation (omni_jax.generate.talker) against transformers' greedy Talker generation.

Greedy codes from the same Thinker outputs equal those of transformers' Qwen2_5OmniForConditionalGeneration
.generate (talker_do_sample=False), for one prompt and for a left-padded batch whose rows stop at different
steps; sampling with the released defaults is reproducible, never chooses the codec bos and cuts the codes at
the first stop id; meshes give the one-device codes; OmniChat.speak and generate.py --speak return the codes.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import hf_reference as ref
from omni_jax import sharding
from omni_jax.generate import Generator, SamplingParams
from omni_jax.generate.talker import SpeechGenerator

pytestmark = pytest.mark.parity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD, BOS = 112, 113


def _prompt(ids, mask) -> dict:
  return dict(input_ids=ids.astype(np.int32), segment_ids=mask.astype(np.int32),
              labels=np.full(ids.shape, -100, np.int32), kind=np.zeros(ids.shape, np.int32))


def _load(config, graphdef, state, mesh_shape=None):
  devices = jax.devices() if mesh_shape else jax.devices()[:1]
  mesh = sharding.make_mesh(mesh_shape or {"data": 1}, devices)
  shardings = sharding.state_shardings(state, mesh, config.sharding_rules)
  params = jax.device_put(state, shardings)
  return (Generator(graphdef, params, config, mesh, shardings),
          SpeechGenerator(graphdef, params, config, mesh, shardings))


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
  model = ref.build_omni(seed=5)
  config, graphdef, state = ref.converted(model, tmp_path_factory.mktemp("omni"))
  config.model.talker.speakers = dict(ref.SPEAKERS)
  return model, config, graphdef, state


def _first_after(row: np.ndarray, start: int) -> int:
  """A value of `row` at index >= start that does not occur before it (so a stop there ends the row there)."""
  for i in range(start, len(row)):
    if row[i] not in row[:i]:
      return int(row[i])
  raise AssertionError(f"no fresh value in {row}")


@pytest.mark.parametrize("rows", [1, 3])
def test_greedy_codes_equal_transformers(omni, rows):
  """The stop ids are chosen from the models' own greedy outputs, so rows stop early and at different steps:
  the Thinker at an id row 0 reaches at step >= 2, the Talker at a code row 0 reaches at step >= 3 (used as the
  codec end id on both sides)."""
  model, config, graphdef, state = omni
  rng = np.random.default_rng(rows)
  ids = ref.text_ids(rng, rows, 10, 200)
  mask = np.ones_like(ids)
  for r in range(1, rows):  # left padding of different lengths
    mask[r, :2 * r], ids[r, :2 * r] = 0, 0
  run = lambda stops, n: ref.hf_speech(model, torch.tensor(ids), torch.tensor(mask), thinker_max_new_tokens=8,  # noqa: E731
                                       talker_max_new_tokens=n, talker_eos_token_id=stops)
  eos = _first_after(run((PAD,), 1)["thinker_tokens"][0], 2)
  model.thinker.generation_config.update(eos_token_id=eos, pad_token_id=0)
  try:
    end = _first_after(run((PAD,), 16)["codes"][0], 3)
    hf = run((PAD, end), 16)
  finally:
    model.thinker.generation_config.update(eos_token_id=None, pad_token_id=None)
  config.model.thinker.eos_token_ids = (eos,)
  config.model.talker.tts_codec_end_token_id = end
  config.model.talker.num_codes = min(end, PAD)
  generator, speech = _load(config, graphdef, state)
  prompt = _prompt(ids, mask)
  thinker = generator.generate(prompt, max_new_tokens=8, sampling=SamplingParams())
  # transformers stops when every row has stopped; our rows then hold pad to max_new_tokens.
  np.testing.assert_array_equal(thinker.tokens[:, :hf["thinker_tokens"].shape[1]], hf["thinker_tokens"])
  out = speech.generate(prompt, thinker.tokens, max_new_tokens=16, sampling=SamplingParams(repetition_penalty=1.05),
                        return_logits=True)
  hf_codes = hf["codes"]
  np.testing.assert_allclose(out.logits[:, :hf_codes.shape[1]], hf["logits"].numpy(), atol=1e-4, rtol=0)
  np.testing.assert_array_equal(out.codes[:, :hf_codes.shape[1]], hf_codes)
  # transformers' cut: the codes before the first stop id (codec pad or end).
  stop = np.isin(hf_codes, (PAD, end))
  hf_lengths = np.where(stop.any(axis=1), stop.argmax(axis=1), hf_codes.shape[1])
  np.testing.assert_array_equal(out.lengths, hf_lengths)
  assert out.lengths[0] < 16  # row 0 did stop
  if rows > 1:
    assert len(set(out.lengths.tolist())) > 1 or len(set(thinker.lengths.tolist())) > 1


def test_sampling_defaults_reproducible_no_bos_cut_at_stop(omni):
  _, config, graphdef, state = omni
  generator, speech = _load(config, graphdef, state)
  rng = np.random.default_rng(7)
  ids = ref.text_ids(rng, 2, 8, 200)
  mask = np.ones_like(ids)
  prompt = _prompt(ids, mask)
  tokens = generator.generate(prompt, max_new_tokens=5, sampling=SamplingParams()).tokens
  released = speech.sampling()
  assert (released.do_sample, released.top_k, released.top_p, released.temperature,
          released.repetition_penalty) == (True, 40, 0.8, 0.9, 1.05)
  a = speech.generate(prompt, tokens, max_new_tokens=24, seed=1)
  np.testing.assert_array_equal(a.codes, speech.generate(prompt, tokens, max_new_tokens=24, seed=1).codes)
  assert not np.array_equal(a.codes, speech.generate(prompt, tokens, max_new_tokens=24, seed=2).codes)
  # A flat distribution (temperature 50, no filters) would pick the bos 24*2/120 times on average: never here.
  hot = speech.generate(prompt, tokens, max_new_tokens=24, seed=3,
                        sampling=SamplingParams(do_sample=True, temperature=50.0))
  assert not np.isin(hot.codes, BOS).any()
  for out in (a, hot):
    for row, n in zip(out.codes, out.lengths):
      assert not np.isin(row[:n], speech.stop_ids).any()
      assert n == len(row) or row[n] in speech.stop_ids
  top1 = speech.generate(prompt, tokens, max_new_tokens=12, sampling=SamplingParams(do_sample=True, top_k=1,
                                                                                    repetition_penalty=1.05))
  greedy = speech.generate(prompt, tokens, max_new_tokens=12, sampling=SamplingParams(repetition_penalty=1.05))
  np.testing.assert_array_equal(top1.codes, greedy.codes)
  with pytest.raises(Exception, match="no speaker 'Nobody'"):
    speech.generate(prompt, tokens, speaker="Nobody", max_new_tokens=2)


@pytest.mark.parametrize("shape", [(2, 2, 2)])
def test_meshes_give_the_one_device_codes(omni, shape):
  _, config, graphdef, state = omni
  rng = np.random.default_rng(11)
  ids = ref.text_ids(rng, 4, 8, 200)
  mask = np.ones_like(ids)
  mask[1, :3], mask[3, :5] = 0, 0
  prompt = _prompt(ids, mask)
  generator, one = _load(config, graphdef, state)
  tokens = generator.generate(prompt, max_new_tokens=4, sampling=SamplingParams()).tokens
  params = SamplingParams(do_sample=True, temperature=1.3, top_k=40, repetition_penalty=1.05)
  expected = one.generate(prompt, tokens, max_new_tokens=8, sampling=params, seed=4, speaker=["Chelsie", "Ethan"] * 2)
  _, mesh = _load(config, graphdef, state, dict(zip(("data", "fsdp", "tensor"), shape)))
  got = mesh.generate(prompt, tokens, max_new_tokens=8, sampling=params, seed=4, speaker=["Chelsie", "Ethan"] * 2)
  np.testing.assert_array_equal(got.codes, expected.codes)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
  """A converter-style checkpoint of configs/tiny.py (Thinker + Talker, the real Qwen tokenizer)."""
  from configs import tiny  # noqa: PLC0415
  from omni_jax import checkpoint  # noqa: PLC0415
  from omni_jax.models import omni as omni_lib  # noqa: PLC0415

  path = str(tmp_path_factory.mktemp("tiny"))
  c = tiny.get_config()
  c.mesh = {"data": 1}
  _, state, _ = omni_lib.create_sharded(c, sharding.make_mesh({"data": 1}, jax.devices()[:1]), seed=2)
  checkpoint.save_params(path, state, c)
  return path


def test_speak_and_generate_py_speak(tiny_ckpt, tmp_path):
  from omni_jax import generate  # noqa: PLC0415

  model = generate.load(tiny_ckpt)
  kw = dict(max_new_tokens=5, do_sample=False, talker_max_new_tokens=6, talker_do_sample=False)
  speech = model.speak("Say hello.", speaker="Ethan", **kw)
  assert speech.text == model.chat("Say hello.", max_new_tokens=5, do_sample=False)
  assert speech.codes.dtype == np.int32 and speech.codes.ndim == 1 and len(speech.codes) <= 6
  both = model.speak_batch([generate.prompts.conversation("Say hello.")] * 2, speaker="Ethan", **kw)
  np.testing.assert_array_equal(both[1].codes, speech.codes)
  with pytest.raises(TypeError, match="talker_beams"):
    model.speak("x", talker_beams=2)
  out = tmp_path / "reply.codes.json"
  proc = subprocess.run([sys.executable, "generate.py", "--checkpoint", tiny_ckpt, "--prompt", "Say hello.",
                         "--greedy", "--max_new_tokens", "5", "--speak", "--talker_greedy", "--speaker", "Ethan",
                         "--talker_max_new_tokens", "6", "--codes_out", str(out)],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  written = json.loads(out.read_text())
  assert written["text"] == speech.text and written["speaker"] == "Ethan"
  assert written["codes"] == speech.codes.tolist()

"""Speech codes against transformers' greedy Talker generation.

Greedy codes equal those of transformers' Qwen2_5OmniForConditionalGeneration.generate (talker_do_sample=False),
for one prompt and for a batch whose rows stop at different steps: the conversation engine's spoken replies
(the Talker one text token behind the Thinker, in one loop) and the teacher-forced oracle's codes for the same
Thinker outputs (tests/decode_oracle.py, whose per-step logits also agree); the engine's sampling with the
released defaults is reproducible, never chooses the codec bos and ends a reply at the first stop id; meshes
give the one-device codes; OmniChat.speak and generate.py --speak return the codes.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import decode_oracle as oracle
import hf_reference as ref
import reply_testlib
import xla_env
from omni_jax import sharding
from omni_jax.generate import Generator, SamplingParams
from omni_jax.generate.talker import TalkerSettings

pytestmark = pytest.mark.parity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD, BOS = 112, 113


def _prompt(ids, mask) -> dict:
  return dict(input_ids=ids.astype(np.int32), segment_ids=mask.astype(np.int32),
              labels=np.full(ids.shape, -100, np.int32), kind=np.zeros(ids.shape, np.int32))


def _load(config, graphdef, state, mesh_shape=None) -> Generator:
  devices = jax.devices() if mesh_shape else jax.devices()[:1]
  mesh = sharding.make_mesh(mesh_shape or {"data": 1}, devices)
  shardings = sharding.state_shardings(state, mesh, config.sharding_rules)
  return Generator(graphdef, jax.device_put(state, shardings), config, mesh, shardings)


def _spoken(generator, ids, mask, *, max_new_tokens: int, speaker="Chelsie", **talker) -> list:
  """The engine's spoken replies (greedy text) to the rows of a left-padded id batch, decoded together.
  speaker: a name or one per row; talker: ReplySettings' Talker fields (max_codes, talker_sampling, ...; stop:
  default codec pad and end)."""
  settings = TalkerSettings(generator.config)
  samples = [reply_testlib.text_sample(row[m > 0]) for row, m in zip(ids, mask)]
  talker.setdefault("stop", settings.stop_ids)
  rows = [dict(talker, speaker=t) for t in settings.speaker_tokens(speaker, len(samples))]
  return reply_testlib.replies(reply_testlib.chat(generator), samples, max_new_tokens=max_new_tokens, talker=rows)


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
  generator = _load(config, graphdef, state)
  prompt = _prompt(ids, mask)
  thinker = oracle.generate(generator, prompt, max_new_tokens=8, sampling=SamplingParams())
  # transformers stops when every row has stopped; our rows then hold pad to max_new_tokens.
  np.testing.assert_array_equal(thinker.tokens[:, :hf["thinker_tokens"].shape[1]], hf["thinker_tokens"])
  greedy = SamplingParams(repetition_penalty=1.05)
  out = oracle.speech_codes(generator, prompt, thinker.tokens, max_new_tokens=16, sampling=greedy, return_logits=True)
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
  # The engine: each row's text and codes (the stop code ends the codes; transformers' rows go on in pad).
  for b, r in enumerate(_spoken(generator, ids, mask, max_new_tokens=8, max_codes=16, talker_sampling=greedy)):
    np.testing.assert_array_equal(r.tokens, thinker.tokens[b, :thinker.lengths[b]])
    np.testing.assert_array_equal(r.codes, hf_codes[b, :len(r.codes)])
    assert len(r.codes) == hf_lengths[b] + 1 or len(r.codes) == hf_lengths[b] == 16


def test_sampling_defaults_reproducible_no_bos_cut_at_stop(omni):
  _, config, graphdef, state = omni
  generator = _load(config, graphdef, state)
  speech = TalkerSettings(config)
  rng = np.random.default_rng(7)
  ids = ref.text_ids(rng, 2, 8, 200)
  mask = np.ones_like(ids)
  released = speech.sampling()
  assert (released.do_sample, released.top_k, released.top_p, released.temperature,
          released.repetition_penalty) == (True, 40, 0.8, 0.9, 1.05)
  codes = lambda n, sampling, seed=0: [r.codes for r in _spoken(  # noqa: E731
      generator, ids, mask, max_new_tokens=5, max_codes=n, talker_sampling=sampling, talker_seed=seed)]
  a = codes(24, released, 1)
  assert a == codes(24, released, 1)
  assert a != codes(24, released, 2)
  # A flat distribution (temperature 50, no filters) would pick the bos 24*2/120 times on average: never here.
  hot = codes(24, SamplingParams(do_sample=True, temperature=50.0), 3)
  assert not np.isin(np.concatenate(hot), BOS).any()
  for row in a + hot:  # a reply's codes end at its first stop id, or at the budget
    assert not np.isin(row[:-1], speech.stop_ids).any()
    assert len(row) == 24 or row[-1] in speech.stop_ids
  top1 = codes(12, SamplingParams(do_sample=True, top_k=1, repetition_penalty=1.05))
  assert top1 == codes(12, SamplingParams(repetition_penalty=1.05))
  with pytest.raises(Exception, match="no speaker 'Nobody'"):
    speech.speaker_tokens("Nobody", 1)


@pytest.mark.parametrize("shape", [(2, 2, 2)])
def test_meshes_give_the_one_device_codes(omni, shape):
  _, config, graphdef, state = omni
  rng = np.random.default_rng(11)
  ids = ref.text_ids(rng, 4, 8, 200)
  mask = np.ones_like(ids)
  mask[1, :3], mask[3, :5] = 0, 0
  kw = dict(max_new_tokens=4, max_codes=8, speaker=["Chelsie", "Ethan"] * 2, talker_seed=4,
            talker_sampling=SamplingParams(do_sample=True, temperature=1.3, top_k=40, repetition_penalty=1.05))
  expected = [r.codes for r in _spoken(_load(config, graphdef, state), ids, mask, **kw)]
  mesh = _load(config, graphdef, state, dict(zip(("data", "fsdp", "tensor"), shape)))
  assert [r.codes for r in _spoken(mesh, ids, mask, **kw)] == expected


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
                        cwd=ROOT, env=xla_env.env(1), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  written = json.loads(out.read_text())
  assert written["text"] == speech.text and written["speaker"] == "Ethan"
  assert written["codes"] == speech.codes.tolist()

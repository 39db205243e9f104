"""The Token2Wav tower: converted from transformers (config and tensors, bit-exact round trip), and codes ->
speech equal to transformers' Qwen2_5OmniToken2WavModel with the same starting noise."""

import json

import numpy as np
import pytest
import torch
from flax import nnx

import hf_reference as ref
from omni_jax import towers
from omni_jax.convert import hf
from omni_jax.token2wav import synthesis


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  model = ref.build_omni(seed=4)
  directory = tmp_path_factory.mktemp("t2w")
  config, graphdef, state = ref.converted(model, directory / "hf")
  return model, config, nnx.merge(graphdef, state), state, directory


def test_token2wav_converts_both_ways_bit_exact(converted):
  model, config, ours, state, directory = converted
  assert [t.name for t in towers.built(config)] == ["thinker", "talker", "token2wav"]
  towers.validate(config)
  assert config.model.token2wav.dit.block_size == ref.TOKEN2WAV["dit_config"]["block_size"]
  tensors = hf.state_to_tensors(state, config=config)
  torch_state = {k: v.numpy() for k, v in model.state_dict().items() if k.startswith("token2wav.")
                 and not k.endswith((".filter",))}
  mine = {k: v for k, v in tensors.items() if k.startswith("token2wav.")}
  assert set(mine) == set(torch_state)
  for k, v in torch_state.items():
    np.testing.assert_array_equal(mine[k], v, err_msg=k)
  hf.save(str(directory / "out"), config, state)
  with open(directory / "out" / "config.json") as f:
    written = json.load(f)["token2wav_config"]
  assert written["dit_config"]["look_ahead_layers"] == ref.TOKEN2WAV["dit_config"]["look_ahead_layers"]
  assert written["bigvgan_config"]["upsample_initial_channel"] == 64


def _reference_speech(model, monkeypatch, seed: int, num_codes: int):
  """((codes, cond, ref_mel), noise, speech): inputs drawn from `seed` (numpy) and transformers' speech of them
  from that starting noise (its torch.randn made to return it)."""
  g = torch.Generator().manual_seed(seed)
  codes = torch.randint(0, 100, (1, num_codes), generator=g)
  cond, ref_mel = torch.randn(1, 8, generator=g), torch.randn(1, 12, 80, generator=g)
  noise = torch.randn(1, 2 * num_codes, 80, generator=g)
  monkeypatch.setattr(torch, "randn", lambda *a, **k: noise.clone())
  with torch.no_grad():
    want = model.token2wav(codes, cond, ref_mel).reshape(-1).numpy()
  return (codes.numpy(), cond.numpy(), ref_mel.numpy()), noise.numpy(), want


def test_codes_to_speech_equal_transformers(converted, monkeypatch):
  model, config, ours, _, _ = converted
  args, noise, want = _reference_speech(model, monkeypatch, seed=0, num_codes=7)
  got = synthesis.synthesize(ours.token2wav, *args, noise=noise).audio
  assert got.shape == (1, 14 * 240)
  np.testing.assert_allclose(got[0], want, atol=1e-4)


def test_dit_layers_held_per_layer_speak_as_the_stacked_ones(converted, monkeypatch):
  """config.generate.layer_buffers: "auto" keeps a CPU's DiT stacked; "split" (GPUs' "auto") holds its layers one
  buffer each (the DiT then runs them unrolled, with no slice copies on a GPU): the same speech, whole and
  streamed, still transformers'; the model it was made from keeps its stacks."""
  from omni_jax.models import scan  # noqa: PLC0415
  from omni_jax.token2wav import sampling, streaming  # noqa: PLC0415
  from omni_jax.token2wav import voice as voice_lib  # noqa: PLC0415

  model, config, ours, _, _ = converted
  assert voice_lib.with_layer_buffers(ours.token2wav, config) is ours.token2wav  # "auto" on a CPU
  config = config.copy_and_resolve_references()
  config.generate.layer_buffers = "split"
  split = voice_lib.with_layer_buffers(ours.token2wav, config)
  assert scan.is_split(nnx.state(split.code2wav_dit_model))
  assert not scan.is_split(nnx.state(ours.token2wav.code2wav_dit_model))
  args, noise, want = _reference_speech(model, monkeypatch, seed=1, num_codes=9)
  got = synthesis.synthesize(split, *args, noise=noise).audio[0]
  np.testing.assert_allclose(got, want, atol=1e-4)
  np.testing.assert_allclose(got, synthesis.synthesize(ours.token2wav, *args, noise=noise).audio[0], atol=1e-5)
  sampler = sampling.SamplerConfig(num_steps=3, method="euler")
  streamed = [np.concatenate(streaming.synthesize_chunked(t2w, args[0][0], args[1][0], args[2][0], seed=0,
                                                          sampler=sampler))
              for t2w in (split, ours.token2wav)]
  np.testing.assert_allclose(streamed[0], streamed[1], atol=1e-5)
  config.generate.layer_buffers = "both"
  with pytest.raises(voice_lib.ConfigError, match="config.generate.layer_buffers"):
    voice_lib.with_layer_buffers(ours.token2wav, config)

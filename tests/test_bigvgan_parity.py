"""BigVGAN (omni_jax/models/bigvgan.py) against transformers' Qwen2_5OmniToken2WavBigVGANModel: the waveform of a
tiny perturbed vocoder (float32) within 1e-4, the layers it adds to omni_jax.layers against torch, the weight
table both ways."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_reference import TOKEN2WAV, perturb
from omni_jax import defaults, sharding
from omni_jax.config import Runtime
from omni_jax.convert.rules import CheckpointMismatch
from omni_jax.errors import ConfigError
from omni_jax.layers.conv import Conv1d, ConvTranspose1d
from omni_jax.models import bigvgan
from omni_jax.token2wav import bigvgan_weights
from torch_weights import bigvgan_from_torch, bigvgan_to_torch, load_bigvgan

PREFIX = bigvgan_weights.DISK_PREFIX
run = nnx.jit(lambda model, mel: model(mel))


def _hf_vocoder(seed: int = 0):
  from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniBigVGANConfig  # noqa: PLC0415
  from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (  # noqa: PLC0415
      Qwen2_5OmniToken2WavBigVGANModel)

  torch.manual_seed(seed)
  model = perturb(Qwen2_5OmniToken2WavBigVGANModel(Qwen2_5OmniBigVGANConfig(**TOKEN2WAV["bigvgan_config"])).eval(),
                  seed + 1)
  g = torch.Generator().manual_seed(seed + 2)
  with torch.no_grad():  # SnakeBeta's log-scale alpha/beta start at 0: move them well away from e^0 = 1
    for name, p in model.named_parameters():
      if name.endswith((".alpha", ".beta")):
        p.add_(0.5 * torch.randn(p.shape, generator=g))
    model.conv_post.weight.mul_(40.0)  # a waveform spanning much of [-1, 1], so that 1e-4 is a tight bound
  return model


@pytest.fixture(scope="module")
def pair():
  hf = _hf_vocoder()
  state_dict = {PREFIX + k: v.detach().numpy() for k, v in hf.state_dict().items()}
  ours = bigvgan_from_torch(bigvgan.BigVGANConfig.from_hf(hf.config.to_dict()), state_dict)
  return hf, ours, state_dict


def _mel(frames: int, seed: int) -> np.ndarray:
  # Natural-log mels spanning the vocoder's clamp: below the -115 dB floor (exp(-11)) up to above its ceiling.
  return np.random.default_rng(seed).uniform(-13.0, 3.0, size=(2, frames, 80)).astype(np.float32)


@pytest.mark.parity
@pytest.mark.parametrize("frames", [4, 9])
def test_waveform_matches_transformers(pair, frames):
  hf, ours, _ = pair
  mel = _mel(frames, frames)
  with torch.no_grad():
    want = hf(torch.from_numpy(mel.transpose(0, 2, 1))).numpy()
  got = np.asarray(run(ours, jnp.asarray(mel)))
  assert got.shape == (2, frames * 240) == want.shape and got.dtype == np.float32
  assert np.abs(want).max() > 0.3 and np.std(want) > 3e-3 and (np.abs(want) < 1).all()  # a signal, not clamped
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parity
def test_bfloat16_runtime_is_close(pair):
  hf, ours, state_dict = pair
  low = bigvgan_from_torch(ours.cfg, state_dict, Runtime(dtype=jnp.bfloat16))
  mel = _mel(6, 1)
  full, half = np.asarray(run(ours, jnp.asarray(mel))), np.asarray(run(low, jnp.asarray(mel)))
  assert half.dtype == np.float32 and half.shape == full.shape
  assert 0 < np.abs(half - full).max() < 0.1  # computed in bfloat16 (differs), still the same waveform
  assert np.corrcoef(half.ravel(), full.ravel())[0, 1] > 0.99


@pytest.mark.parity
def test_kaiser_filter_and_resampling_match_transformers():
  from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as m  # noqa: PLC0415

  for cutoff, width, taps in [(0.25, 0.3, 12), (0.2, 0.1, 9), (0.25, 0.6, 6)]:
    np.testing.assert_allclose(bigvgan.kaiser_sinc_filter(cutoff, width, taps),
                               m.kaiser_sinc_filter1d(cutoff, width, taps).numpy().ravel(), atol=1e-7)
  # The released (2, 12) and other ratios / odd filters, down to one frame (where the edge padding is all).
  for ratio, taps, length in [(2, 12, 11), (2, 12, 1), (3, 18, 7), (2, 7, 5), (4, 16, 2)]:
    x = np.random.default_rng(length).normal(size=(2, length, 3)).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 2, 1))
    up, down = m.Qwen2_5OmniUpSample1d(ratio, taps), m.Qwen2_5OmniDownSample1d(ratio, taps)
    want_up, want_down = up(xt).numpy().transpose(0, 2, 1), down(xt).numpy().transpose(0, 2, 1)
    # This platform's choice, and both implementations (TPUs lower the convolutions).
    for upsample, downsample in [(bigvgan.upsample, bigvgan.downsample),
                                 (bigvgan._upsample_by_slices, bigvgan._downsample_by_slices),
                                 (bigvgan._upsample_by_convolution, bigvgan._downsample_by_convolution)]:
      np.testing.assert_allclose(upsample(jnp.asarray(x), ratio, taps), want_up, atol=1e-6)
      np.testing.assert_allclose(downsample(jnp.asarray(x), ratio, taps), want_down, atol=1e-6)


def test_resampling_lowers_to_slices_on_cpus_and_gpus_and_to_convolutions_on_tpus():
  """The fixed filter is a grouped convolution for the TPU compiler only (faster there); CPUs and GPUs get
  fusible shifted slices, and a GPU no cuDNN call to autotune per activation."""
  step = jax.jit(lambda x: bigvgan.downsample(bigvgan.upsample(x)))
  lowered = {p: step.trace(jnp.ones((1, 10, 4))).lower(lowering_platforms=(p,)).as_text()
             for p in ("cpu", "cuda", "tpu")}
  assert lowered["tpu"].count("stablehlo.convolution") == 2
  assert "convolution" not in lowered["cpu"] and "convolution" not in lowered["cuda"]


@pytest.mark.parametrize("kernel,stride,padding,length", [(11, 5, 3, 4), (4, 2, 1, 5), (7, 3, 2, 3), (3, 1, 0, 6),
                                                          (5, 3, 0, 2)])
def test_conv_transpose_matches_torch(kernel, stride, padding, length):
  layer = ConvTranspose1d(3, 2, kernel, stride=stride, padding=padding, names=("embed", "conv_out"), rngs=nnx.Rngs(0),
                          init_std=0.5)
  layer.bias.value = jnp.asarray([0.3, -0.2])
  x = np.random.default_rng(1).normal(size=(2, length, 3)).astype(np.float32)
  ref = torch.nn.ConvTranspose1d(3, 2, kernel, stride=stride, padding=padding)
  with torch.no_grad():
    ref.weight.copy_(torch.tensor(np.asarray(layer.kernel[...]).transpose(1, 2, 0)))
    ref.bias.copy_(torch.tensor([0.3, -0.2]))
    want = ref(torch.from_numpy(x.transpose(0, 2, 1))).numpy().transpose(0, 2, 1)
  got = np.asarray(layer(jnp.asarray(x)))
  assert got.shape == want.shape == (2, (length - 1) * stride - 2 * padding + kernel, 2)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_dilated_conv_matches_torch():
  layer = Conv1d(3, 4, 5, dilation=3, padding=6, names=("embed", "conv_out"), rngs=nnx.Rngs(0), init_std=0.5)
  x = np.random.default_rng(2).normal(size=(1, 17, 3)).astype(np.float32)
  ref = torch.nn.Conv1d(3, 4, 5, dilation=3, padding=6, bias=False)
  with torch.no_grad():
    ref.weight.copy_(torch.tensor(np.asarray(layer.kernel[...]).transpose(2, 1, 0)))
    want = ref(torch.from_numpy(x.transpose(0, 2, 1))).numpy().transpose(0, 2, 1)
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want, atol=1e-5)


def test_weights_round_trip_bit_exact(pair):
  _, ours, state_dict = pair
  back = bigvgan_to_torch(ours)
  assert set(back) == set(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  assert back[PREFIX + "ups.0.0.weight"].shape == (64, 32, 11)  # torch ConvTranspose1d layout [in, out, k]
  assert back[PREFIX + "conv_post.weight"].shape == (1, 1, 7)


def test_weight_mismatch_names_the_tensor(pair):
  _, ours, state_dict = pair
  missing = {k: v for k, v in state_dict.items() if not k.endswith("resblocks.4.activations.3.act.beta")}
  with pytest.raises(CheckpointMismatch, match=r"missing .*resblocks\.4\.activations\.3\.act\.beta"):
    load_bigvgan(ours, missing)
  wrong = dict(state_dict, **{PREFIX + "conv_pre.weight": np.zeros((64, 80, 5), np.float32)})
  with pytest.raises(CheckpointMismatch, match=r"conv_pre\.weight: shape \(64, 80, 5\)"):
    load_bigvgan(ours, wrong)


def test_every_parameter_has_logical_names_in_the_rule_table(pair):
  _, ours, _ = pair
  table = dict(defaults.SHARDING_RULES)
  for path, var in nnx.state(ours, nnx.Param).flat_state():
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == len(var.shape), path
    assert all(n is None or n in table for n in names), (path, names)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, context=1, tensor=1), jax.devices()[:1])
  sharding.state_specs(nnx.state(ours, nnx.Param), mesh, defaults.SHARDING_RULES)  # strict: unknown names raise


def test_bad_config_and_input_are_named(pair):
  with pytest.raises(ConfigError, match=r"config\.vocoder\.upsample_kernel_sizes"):
    bigvgan.BigVGANConfig.from_hf(dict(upsample_rates=[5, 3], upsample_kernel_sizes=[11]), "vocoder")
  with pytest.raises(ConfigError, match=r"config\.vocoder\.upsample_initial_channel"):
    bigvgan.BigVGANConfig.from_hf(dict(upsample_initial_channel=100), "vocoder")
  cfg = bigvgan.BigVGANConfig(upsample_initial_channel=64)
  assert cfg.hop_length == 240 and bigvgan.BigVGANConfig().hop_length * 100 == bigvgan.SAMPLE_RATE
  with pytest.raises(ValueError, match=r"\[batch, frames, 80\]"):
    pair[1](jnp.zeros((1, 80, 4)))


def test_released_size_layout_matches_transformers_state_dict():
  """The 7B vocoder (config defaults): our parameters map onto exactly transformers' tensor names and shapes
  (both built without weights: ours abstract, theirs on torch's meta device)."""
  from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniBigVGANConfig  # noqa: PLC0415
  from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (  # noqa: PLC0415
      Qwen2_5OmniToken2WavBigVGANModel)

  with torch.device("meta"):
    hf = Qwen2_5OmniToken2WavBigVGANModel(Qwen2_5OmniBigVGANConfig())
  want = {PREFIX + k: tuple(v.shape) for k, v in hf.state_dict().items()}
  abstract = nnx.eval_shape(lambda: bigvgan.BigVGAN(bigvgan.BigVGANConfig(), rngs=nnx.Rngs(0)))
  got = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    name = ".".join(str(p) for p in path)
    rule = next(r for r in bigvgan_weights.RULES if re.fullmatch(r.ours, name))
    got[re.sub(rule.ours, rule.disk, name)] = rule.to_disk(np.broadcast_to(np.float32(0), var.shape)).shape
  assert got == want
  assert want[PREFIX + "ups.0.0.weight"] == (1536, 768, 11) and len(want) == 2 + 12 + 18 * 24 + 3

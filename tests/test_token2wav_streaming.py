"""Chunked Token2Wav (token2wav.streaming) against whole-utterance synthesis (token2wav.synthesis, itself equal
to transformers'), on a tiny Token2Wav with perturbed random weights, float32, the same starting noise; and the
synthesizer a model's voice settings pick (synthesis.synthesizer_for), over the same DiT and BigVGAN programs.

Tolerances (docs/token2wav.md, "Streaming synthesis"), relative to the whole utterance's largest sample:
- Qwen's context (2 past blocks, 1 look-ahead block, 20 vocoder frames): 2e-2; measured up to 4.0e-3 with this
  model's 4-frame blocks, whose 1-block look-ahead gives the vocoder only 4 frames of real right context (with
  24-frame blocks the vocoder has its full 20 and bench/bench_token2wav.py measures ~1e-5);
- context covering the ODE's receptive field (past = velocity evaluations x 1 block, future 3 blocks more for
  the vocoder): 1e-5 (float rounding; measured ~3e-7), while without left context the mel misses by > 1e-3
  (measured 4e-3, against 2.4e-7): the check can fail.
"""

import copy
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from hf_reference import TOKEN2WAV, perturb
from omni_jax.errors import ConfigError
from omni_jax.models.bigvgan import BigVGANConfig
from omni_jax.models.dit import DiT, DiTConfig
from omni_jax.token2wav import griffin_lim, sampling, streaming, synthesis, vocoding
from omni_jax.token2wav import voice as voice_lib
from omni_jax.token2wav.sampling import SamplerConfig, sample
from omni_jax.token2wav.streaming import StreamingConfig, StreamingSynthesizer, synthesize_chunked
from torch_weights import DISK_PREFIX, bigvgan_from_torch, load_dit

QWEN_TOL = 2e-2  # relative; Qwen's context
EXACT_TOL = 1e-5  # relative; context over the receptive field
N_CODES = 31  # 62 mel frames: 15.5 blocks of 4 (a partial last block), longer than every vocoder bucket
SAMPLERS = {"euler": SamplerConfig(num_steps=4, method="euler"),  # 3 velocity evaluations
            "rk4": SamplerConfig(num_steps=3, method="rk4")}  # 8 velocity evaluations
EVALUATIONS = {"euler": 3, "rk4": 8}
VOCODER = dict(upsample_initial_channel=16, resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3, 5]],
               upsample_rates=[4, 3, 2], upsample_kernel_sizes=[8, 7, 4])
HOP = 24


@pytest.fixture(scope="module")
def model():
  """transformers' Token2Wav DiT and BigVGAN (perturbed, torch-initialised: fast) in ours. The DiT is
  tests/hf_reference.py's TOKEN2WAV (block 4, look-back layer 0, look-ahead layer 1); the vocoder a 3-stage,
  one-AMP-block BigVGAN (hop 24 instead of 240, receptive field ~9 frames), so that compiles stay short."""
  import torch  # noqa: PLC0415
  from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import (  # noqa: PLC0415
      Qwen2_5OmniBigVGANConfig, Qwen2_5OmniDiTConfig)
  from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (  # noqa: PLC0415
      Qwen2_5OmniToken2WavBigVGANModel, Qwen2_5OmniToken2WavDiTModel)

  torch.manual_seed(0)
  hf_dit = perturb(Qwen2_5OmniToken2WavDiTModel(Qwen2_5OmniDiTConfig(**copy.deepcopy(TOKEN2WAV["dit_config"]))), 1)
  hf_vocoder = perturb(Qwen2_5OmniToken2WavBigVGANModel(Qwen2_5OmniBigVGANConfig(**VOCODER)), 2)
  dit = nnx.eval_shape(lambda: DiT(DiTConfig.from_hf(hf_dit.config.to_dict()), rngs=nnx.Rngs(0)))
  load_dit(dit, hf_dit.state_dict())
  vocoder = bigvgan_from_torch(BigVGANConfig.from_hf(VOCODER), {
      DISK_PREFIX + k: v.detach().numpy() for k, v in hf_vocoder.state_dict().items()})
  return types.SimpleNamespace(code2wav_dit_model=dit, code2wav_bigvgan_model=vocoder)  # a Token2Wav's parts


@pytest.fixture(scope="module")
def voice():
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 121, (1, N_CODES))
  cond, ref_mel = rng.normal(size=(1, 8)).astype(np.float32), rng.normal(size=(1, 12, 80)).astype(np.float32)
  noise = rng.normal(size=(1, 2 * N_CODES, 80)).astype(np.float32)
  return codes, cond, ref_mel, noise


@pytest.fixture(scope="module")
def whole(model, voice):
  codes, cond, ref_mel, noise = voice
  return {m: synthesis.synthesize(model, codes, cond, ref_mel, noise=noise, sampler=s).audio[0]
          for m, s in SAMPLERS.items()}


def relative_error(chunks, want):
  got = np.concatenate(chunks, axis=-1)
  assert got.shape == want.shape  # the chunks add up to the whole utterance
  return float(np.abs(got - want).max() / np.abs(want).max())


QWEN = StreamingConfig(first_chunk_blocks=1, chunk_blocks=3)  # Qwen's context: 2 past blocks, 1 future, 20 frames


@pytest.mark.parametrize("method,first,chunk", [("euler", 1, 3), ("rk4", 1, 3), ("euler", 2, 1),
                                                pytest.param("rk4", 2, 1, marks=pytest.mark.slow)])
def test_chunks_equal_the_whole_utterance(model, voice, whole, method, first, chunk):
  codes, cond, ref_mel, noise = voice
  st = StreamingConfig(first_chunk_blocks=first, chunk_blocks=chunk)
  chunks = synthesize_chunked(model, codes[0], cond[0], ref_mel[0], noise=noise[0], sampler=SAMPLERS[method],
                              streaming=st)
  assert [c.shape for c in chunks[:2]] == [(first * 4 * HOP,), (chunk * 4 * HOP,)]
  assert 0 < relative_error(chunks, whole[method]) < QWEN_TOL


@pytest.mark.parametrize("method", ["euler", pytest.param("rk4", marks=pytest.mark.slow)])
def test_context_over_the_receptive_field_is_exact(model, voice, whole, method):
  codes, cond, ref_mel, noise = voice
  # Each velocity evaluation reaches one block further each way (one look-back, one look-ahead layer); the
  # vocoder's 12 frames of right context (3 blocks, over its ~9-frame receptive field) must be exact mel too.
  blocks = EVALUATIONS[method]
  exact = StreamingConfig(first_chunk_blocks=1, chunk_blocks=3, past_blocks=blocks, future_blocks=blocks + 3,
                          vocoder_context=12)
  synth = StreamingSynthesizer(model, cond, ref_mel, noise=noise, sampler=SAMPLERS[method], streaming=exact)
  chunks = synth.push(codes) + synth.finish()
  assert relative_error([c[0] for c in chunks], whole[method]) < EXACT_TOL
  want = sample(model.code2wav_dit_model, jnp.asarray(codes), jnp.asarray(cond), jnp.asarray(ref_mel),
                noise=jnp.asarray(noise), sampler=SAMPLERS[method])
  np.testing.assert_allclose(synth.mel, np.asarray(want), atol=1e-5)  # the mel: the whole utterance's
  # Without left context the mel is visibly off (measured 4e-3; window shapes shared with the other tests).
  blind = StreamingConfig(first_chunk_blocks=1, chunk_blocks=3, past_blocks=0, future_blocks=1, vocoder_context=12)
  synth = StreamingSynthesizer(model, cond, ref_mel, noise=noise, sampler=SAMPLERS[method], streaming=blind)
  synth.push(codes)
  synth.finish()
  assert np.abs(synth.mel - np.asarray(want)).max() > 1e-3


def test_codes_one_at_a_time_equal_all_at_once_and_chunks_are_timed(model, voice):
  codes, cond, ref_mel, noise = voice
  synth = StreamingSynthesizer(model, cond[0], ref_mel[0], noise=noise[0], sampler=SAMPLERS["euler"], streaming=QWEN)
  synth.warm_up()  # every program a synthesis runs (this utterance is longer than the vocoder buckets)
  programs = sampling._flow._cache_size(), vocoding._bigvgan._cache_size()  # noqa: SLF001
  at_once = synthesize_chunked(model, codes[0], cond[0], ref_mel[0], noise=noise[0], sampler=SAMPLERS["euler"],
                               streaming=QWEN)
  chunks, ready_after = [], []
  for i, code in enumerate(codes[0]):
    new = synth.push([code])
    chunks += new
    ready_after += [i + 1] * len(new)
  # Chunk k is out as soon as the codes of its look-ahead block are in: blocks of 4 frames = 2 codes, so
  # the first chunk (1 block) after 4 codes, then every 3 blocks = 6 codes; the tail waits for finish().
  assert ready_after == [4, 10, 16, 22, 28]
  assert synth.mel.shape == (52, 80)
  chunks += synth.finish()
  assert (sampling._flow._cache_size(), vocoding._bigvgan._cache_size()) == programs  # noqa: SLF001
  assert len(chunks) == len(at_once)
  for a, b in zip(chunks, at_once):
    np.testing.assert_array_equal(a, b)
  assert len(synth.times) == len(chunks) and synth.started <= synth.times[0]
  assert all(a <= b for a, b in zip(synth.times, synth.times[1:]))
  assert synth.first_chunk_latency == synth.times[0] - synth.started
  with pytest.raises(ValueError, match="finished"):
    synth.push([1])


def test_seeded_noise_is_drawn_per_block(model, voice, whole):
  codes, cond, ref_mel, noise = voice
  synth = StreamingSynthesizer(model, cond, ref_mel, seed=3, sampler=SAMPLERS["euler"], streaming=QWEN)
  chunks = synth.push(codes) + synth.finish()
  assert np.concatenate(chunks, -1).shape == (1, 2 * N_CODES * HOP)
  seeded = synth.noise(2 * N_CODES)
  assert seeded.shape == (1, 62, 80) and abs(float(seeded.std()) - 1) < 0.05
  np.testing.assert_array_equal(streaming.utterance_noise(3, 1, 62, 4, 80, start=8), seeded[:, 8:])
  want = sample(model.code2wav_dit_model, jnp.asarray(codes), jnp.asarray(cond), jnp.asarray(ref_mel),
                noise=jnp.asarray(seeded), sampler=SAMPLERS["euler"])
  np.testing.assert_allclose(synth.mel, np.asarray(want), atol=1e-4)  # another noise moves it by O(1)
  short = StreamingSynthesizer(model, cond, ref_mel, noise=noise[:, :40], sampler=SAMPLERS["euler"], streaming=QWEN)
  with pytest.raises(ValueError, match="longer noise"):
    short.push(codes)


def test_synthesizer_for_picks_the_vocoders_synthesizer(model, voice):
  codes, cond, ref_mel, _ = voice
  voices = {"Ada": voice_lib.Voice("Ada", cond[0], ref_mel[0])}
  settings = voice_lib.VoiceSettings(seed=3, griffin_lim_iters=2)
  bigvgan = voice_lib.Voicer(model, voices, vocoder="bigvgan", sampler=SAMPLERS["euler"], settings=settings,
                             streaming=QWEN, default_speaker="Ada")
  synth = synthesis.synthesizer_for(bigvgan)
  assert isinstance(synth, StreamingSynthesizer)
  chunks = synth.push(codes[0]) + synth.finish()
  np.testing.assert_array_equal(np.concatenate(chunks), np.concatenate(synthesize_chunked(
      model, codes[0], cond[0], ref_mel[0], seed=3, sampler=SAMPLERS["euler"], streaming=QWEN)))
  whole = synthesis.synthesize(model, codes, cond, ref_mel, noise=synth.noise(2 * N_CODES), sampler=SAMPLERS["euler"])
  assert relative_error(chunks, whole.audio[0]) < QWEN_TOL
  # A whole utterance as long as a streaming vocoder window runs the program streaming compiled for it.
  programs = vocoding._bigvgan._cache_size()  # noqa: SLF001
  synthesis.synthesize(model, codes[:, :12], cond, ref_mel, seed=0, sampler=SAMPLERS["euler"])  # 24 frames
  assert vocoding._bigvgan._cache_size() == programs  # noqa: SLF001

  gl = voice_lib.Voicer(model, voices, vocoder="griffin_lim", sampler=SAMPLERS["euler"], settings=settings,
                        streaming=QWEN, default_speaker="Ada")
  synth = synthesis.synthesizer_for(gl, "Ada")
  assert isinstance(synth, synthesis.WholeUtterance)
  assert synth.push(codes[0, :10]) == [] and synth.push(codes[0, 10:]) == []
  (audio,) = synth.finish()
  assert synth.finish() == []
  np.testing.assert_array_equal(audio, gl(codes[0], "Ada").audio)
  mel = sample(model.code2wav_dit_model, jnp.asarray(codes), jnp.asarray(cond), jnp.asarray(ref_mel), seed=3,
               sampler=SAMPLERS["euler"])
  np.testing.assert_allclose(audio, griffin_lim.mel_to_audio(np.asarray(mel[0]), n_iter=2, seed=3), atol=1e-6)
  with pytest.raises(voice_lib.VoiceError, match="speaker 'Bo'"):
    synthesis.synthesizer_for(gl, "Bo")


def test_config_keys():
  from omni_jax import defaults  # noqa: PLC0415

  sampler, st = streaming.from_config(defaults.base_config())
  assert sampler == SamplerConfig() and st == StreamingConfig()
  c = ml_collections.ConfigDict({"generate": {"token2wav": {"method": "euler", "streaming": {"chunk_blocks": 0}}}})
  with pytest.raises(ConfigError, match="generate.token2wav.streaming.chunk_blocks"):
    streaming.from_config(c)
  c.generate.token2wav.streaming = {"chunk_size": 3}
  with pytest.raises(ConfigError, match="generate.token2wav.streaming: unknown keys"):
    streaming.from_config(c)


@pytest.mark.slow
def test_batch_rows_equal_single_rows(model, voice):
  codes, cond, ref_mel, noise = voice
  rng = np.random.default_rng(1)
  codes2 = np.concatenate([codes, rng.integers(0, 121, (1, N_CODES))])
  cond2 = np.concatenate([cond, rng.normal(size=(1, 8)).astype(np.float32)])
  ref2 = np.concatenate([ref_mel, rng.normal(size=(1, 12, 80)).astype(np.float32)])
  noise2 = np.concatenate([noise, rng.normal(size=(1, 2 * N_CODES, 80)).astype(np.float32)])
  batched = np.concatenate(synthesize_chunked(model, codes2, cond2, ref2, noise=noise2, sampler=SAMPLERS["euler"],
                                              streaming=QWEN), axis=-1)
  assert batched.shape == (2, 2 * N_CODES * HOP)
  for row in range(2):
    single = synthesize_chunked(model, codes2[row], cond2[row], ref2[row], noise=noise2[row],
                                sampler=SAMPLERS["euler"], streaming=QWEN)
    np.testing.assert_allclose(batched[row], np.concatenate(single), atol=1e-6)

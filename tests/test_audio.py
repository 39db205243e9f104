"""Audio encoder and Thinker-with-audio parity against transformers (float32), conversion and config checks."""

import glob
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

import hf_reference as ref
from configs import tiny
from omni_jax import config as config_lib
from omni_jax import towers
from omni_jax import sharding
from omni_jax.convert import hf
from omni_jax.errors import ConfigError
from omni_jax.input.media import audio as features
from omni_jax.models import omni
from omni_jax.models.audio import AudioConfig, AudioEncoder, thinker_audio
from omni_jax.models.thinker import Thinker

pytestmark = pytest.mark.parity

AUDIO = ref.IDS["audio_token_index"]


def _speech_features():
  """Log-mels of the English pytest-audioeval speech clips."""
  import av

  site = os.path.dirname(os.path.dirname(av.__file__))
  clips = sorted(glob.glob(os.path.join(site, "pytest_audioeval", "samples", "audio", "en", "*.wav")))
  assert clips, "pytest-audioeval clips are part of the test dependencies"
  return [features.features_from_file(p) for p in clips]


def _load(hf_model, tmp_path):
  hf_model.save_pretrained(tmp_path)
  config = hf.config_from_hf(hf.read_config(tmp_path))
  graphdef, abstract = omni.abstract_model(config)
  return nnx.merge(graphdef, hf.load_state(str(tmp_path), abstract)), config


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  hf_model = ref.build_thinker("gqa2", seed=5)
  ours, config = _load(hf_model, tmp_path_factory.mktemp("hf_audio"))
  return hf_model, ours, config


def _hf_encode(hf_model, feats, lengths):
  used = [i for i, n in enumerate(lengths) if n > 0]
  cat = np.concatenate([feats[i][:, :lengths[i]] for i in used], axis=1)
  with torch.no_grad():
    out = hf_model.model.audio_tower(torch.from_numpy(cat), feature_lens=torch.tensor([int(lengths[i]) for i in used]))
  return out.last_hidden_state.numpy()


@jax.jit
def _encode(encoder, feats, lengths):
  return encoder(feats, lengths)


def _encoder_error(hf_model, encoder, batch, lengths, **sizes):
  expected = _hf_encode(hf_model, batch, lengths)
  fn = jax.jit(lambda e, x, n: e(x, n, **sizes)) if sizes else _encode
  got, count = fn(encoder, jnp.asarray(batch), jnp.asarray(lengths))
  got, count = np.asarray(got), int(count)
  assert count == expected.shape[0] == int(features.num_tokens(np.asarray(lengths)).sum())
  assert not got[count:].any(), "rows past the count must be zero"
  return np.abs(got[:count] - expected).max()


def test_encoder_single_audios_shorter_and_longer_than_a_chunk(models):
  hf_model, ours, _ = models
  speech = _speech_features()
  for length in (37, 150, 200, 437):  # < 1 chunk, exactly 1, several with a partial last chunk
    feat = speech[0][:, :length] if length <= speech[0].shape[1] else np.tile(speech[0], 2)[:, :length]
    batch, lengths = features.pad_batch([feat])
    err = _encoder_error(hf_model, ours.thinker.audio_tower, batch, lengths)
    assert err <= 1e-4, f"{length} frames: {err}"


def test_encoder_mixed_batch_with_static_sizes(models):
  """Mixed lengths, an unused row and garbage past each length, with explicit static chunk/token budgets."""
  hf_model, ours, _ = models
  speech = _speech_features()
  rng = np.random.default_rng(0)
  feats = [speech[0], speech[1][:, :120], np.tile(speech[2], 3)[:, :801], speech[1][:, :3]]
  batch, lengths = features.pad_batch(feats, max_audios=5, max_frames=1000)
  batch = np.where(np.arange(1000)[None, None] < lengths[:, None, None], batch,
                   rng.standard_normal(batch.shape).astype(np.float32))
  assert lengths.tolist()[-1] == 0 and features.chunk_count(lengths) == 2 + 1 + 5 + 1
  err = _encoder_error(hf_model, ours.thinker.audio_tower, batch, lengths)
  assert err <= 1e-4, err
  err = _encoder_error(hf_model, ours.thinker.audio_tower, batch, lengths, max_chunks=features.chunk_count(lengths),
                       max_tokens=int(features.num_tokens(lengths).sum()) + 3)
  assert err <= 1e-4, err


def test_encoder_odd_window_pools_across_chunks(tmp_path):
  """n_window=25 gives 25 tokens per chunk: pooled pairs straddle chunk boundaries, as in transformers."""
  hf_model = ref.build_thinker("gqa2", seed=2, audio_config=dict(ref._AUDIO, output_dim=32, n_window=25))
  ours, _ = _load(hf_model, tmp_path)
  rng = np.random.default_rng(1)
  feats = [rng.standard_normal((128, n)).astype(np.float32) for n in (51, 160, 9)]
  batch, lengths = features.pad_batch(feats)
  assert _encoder_error(hf_model, ours.thinker.audio_tower, batch, lengths) <= 1e-4


def _audio_prompt(rng, n_tokens, length, vocab):
  """text, <audio_bos> AUDIO*n <audio_eos> per audio, text; right-aligned in `length` (left padding)."""
  ids = list(rng.integers(10, vocab, size=3))
  for n in n_tokens:
    ids += [ref.IDS["audio_start_token_id"]] + [AUDIO] * n + [ref.IDS["audio_end_token_id"]]
    ids += list(rng.integers(10, vocab, size=2))
  assert len(ids) <= length
  row, mask = np.zeros(length, np.int64), np.zeros(length, np.int64)
  row[length - len(ids):], mask[length - len(ids):] = ids, 1
  return row, mask


def test_thinker_logits_with_audio_match_transformers(models):
  hf_model, ours, config = models
  speech = _speech_features()
  feats = [speech[0][:, :250], speech[1][:, :90], speech[2][:, :130]]  # row 0: one audio, row 1: two
  counts = [features.num_tokens(f.shape[1]) for f in feats]
  rng = np.random.default_rng(3)
  vocab = config.model.thinker.text.vocab_size
  rows = [_audio_prompt(rng, counts[:1], 90, vocab), _audio_prompt(rng, counts[1:], 90, vocab)]
  ids, mask = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
  batch, lengths = features.pad_batch(feats)
  feature_mask = (np.arange(batch.shape[2])[None] < lengths[:, None]).astype(np.int64)
  positions, _ = hf_model.model.get_rope_index(torch.tensor(ids), attention_mask=torch.tensor(mask))
  with torch.no_grad():
    expected = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        input_features=torch.from_numpy(batch), feature_attention_mask=torch.tensor(feature_mask),
                        position_ids=positions).logits.numpy()

  @jax.jit
  def forward(model, ids, pos, seg, feats, lengths):
    return model.thinker(ids, pos, seg, audio_features=feats, audio_lengths=lengths)

  got = np.asarray(forward(ours, jnp.asarray(ids), jnp.asarray(positions.numpy()), jnp.asarray(mask),
                           jnp.asarray(batch), jnp.asarray(lengths)))
  err = np.abs(got - expected)[mask.astype(bool)].max()
  assert err <= 1e-4, f"max abs logit difference {err}"
  without = np.asarray(ours.thinker(jnp.asarray(ids), jnp.asarray(positions.numpy()), jnp.asarray(mask)))
  assert np.abs(without - got)[mask.astype(bool)].max() > 1e-2, "the audio must change the logits"


def test_round_trip_of_audio_tensors_is_bit_exact(models, tmp_path):
  hf_model, ours, config = models
  src = tmp_path / "src"
  hf_model.save_pretrained(src)
  hf.save(tmp_path / "out", config, nnx.state(ours))
  before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
  audio = sorted(k for k in before if k.startswith("audio_tower."))
  assert len(audio) == 9 + 2 * 15 and set(audio) == {k for k in after if k.startswith("audio_tower.")}
  for k in audio:
    assert after[k].dtype == before[k].dtype and np.array_equal(after[k], before[k]), k
  written = hf.config_to_hf(config)["audio_config"]
  for key in hf._AUDIO_KEYS:
    assert written[key] == getattr(hf_model.config.audio_config, key), key


def _tiny(**audio):
  """configs/tiny.py with a 256-token vocabulary and the tiny reference's special ids (all < 256)."""
  c = tiny.get_config()
  c.model.thinker.text.vocab_size = 256
  for k, v in ref.IDS.items():
    c.model.thinker[k.replace("_index", "_id")] = v
  for k, v in audio.items():
    c.model.thinker.audio[k] = v
  return c


def test_freeze_stops_gradients_at_the_encoder_output():
  """model.thinker.audio.freeze: no gradient reaches the encoder; the LM still trains."""
  feats = jnp.asarray(np.random.default_rng(0).standard_normal((1, 128, 200)), jnp.float32)
  lengths = jnp.asarray([100])
  ids = jnp.asarray([[11, ref.IDS["audio_start_token_id"]] + [AUDIO] * 25 + [ref.IDS["audio_end_token_id"], 12]])
  pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), (3, 1, ids.shape[1]))

  def build(freeze):
    config = _tiny(freeze=freeze)
    config.model.thinker.text.num_hidden_layers = 1
    return Thinker(config_lib.thinker_text(config), config_lib.Runtime(), rngs=nnx.Rngs(0),
                   audio=thinker_audio(config), ids=config_lib.TokenIds.from_config(config.model.thinker))

  # Random parameters straight from the abstract shapes (an eager init costs more than the test).
  _, abstract, rest = nnx.split(nnx.eval_shape(lambda: build(False)), nnx.Param, ...)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda v: jnp.asarray(0.1 * rng.standard_normal(v.shape), v.dtype), abstract)
  for freeze in (False, True):
    graphdef = nnx.split(nnx.eval_shape(lambda: build(freeze)), nnx.Param, ...)[0]  # same params, other flag

    def loss(params):
      return nnx.merge(graphdef, params, rest)(ids, pos, jnp.ones_like(ids), audio_features=feats,
                                               audio_lengths=lengths).sum()

    grads = jax.jit(jax.grad(loss))(params)
    audio, text = (sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads[k])) for k in ("audio_tower", "model"))
    assert text > 0 and ((audio == 0) if freeze else (audio > 0)), (freeze, audio, text)


@pytest.mark.parametrize("key,value,message", [
    ("encoder_attention_heads", 3, "model.thinker.audio.encoder_attention_heads"),
    ("n_window", 2000, "model.thinker.audio.n_window"),
    ("activation_function", "swish9", "model.thinker.audio.activation_function"),
    ("d_model", 0, "model.thinker.audio.d_model"),
    ("freeze", "yes", "model.thinker.audio.freeze"),
    ("hidden_size", 32, "model.thinker.audio: unknown keys"),
])
def test_bad_audio_config_names_the_key(key, value, message):
  c = tiny.get_config()
  c.model.thinker.audio = ml_collections.ConfigDict(dict(c.model.thinker.audio.to_dict(), **{key: value}))
  with pytest.raises(ConfigError, match=message):
    towers.validate(c)


def test_released_configs_build_the_encoder_shapes():
  from configs import qwen2_5_omni_3b, qwen2_5_omni_7b

  for module, out_dim in ((qwen2_5_omni_7b, 3584), (qwen2_5_omni_3b, 2048)):
    c = module.get_config()
    towers.validate(c)
    audio = AudioConfig.from_config(c.model.thinker.audio, "model.thinker.audio")
    assert (audio.encoder_layers, audio.d_model, audio.encoder_attention_heads, audio.encoder_ffn_dim,
            audio.output_dim) == (32, 1280, 20, 5120, out_dim)
    assert audio.output_dim == c.model.thinker.text.hidden_size


def test_sharded_encoder_matches_one_device():
  """Every audio parameter has logical names with rules; a sharded forward equals the one-device result."""
  config = _tiny()
  feats = jnp.asarray(np.random.default_rng(0).standard_normal((4, 128, 400)), jnp.float32)
  lengths = jnp.asarray([400, 123, 0, 7])
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  graphdef, state = nnx.split(AudioEncoder(thinker_audio(config), config_lib.Runtime(), rngs=nnx.Rngs(0)))
  for path, var in nnx.to_flat_state(state):
    names = var.get_metadata()["out_sharding"]
    assert names is not None and len(names) == var.get_value().ndim, path
  specs = sharding.state_specs(state, mesh, config.sharding_rules)  # raises on a name without a rule
  assert any(any(spec.get_value()) for _, spec in nnx.to_flat_state(specs)), "nothing is sharded"
  placed = jax.device_put(state, sharding.state_shardings(state, mesh, config.sharding_rules))

  @jax.jit
  def encode(state, feats, lengths):
    with sharding.activate(mesh, config.sharding_rules):
      return nnx.merge(graphdef, state)(feats, lengths)[0]

  single = nnx.merge(graphdef, state)(feats, lengths)[0]
  np.testing.assert_allclose(np.asarray(encode(placed, feats, lengths)), np.asarray(single), atol=2e-5, rtol=1e-5)

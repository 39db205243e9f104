"""The Talker against transformers' Qwen2_5OmniTalkerForConditionalGeneration, on tiny perturbed models.

Logits of the converted Talker agree within 1e-4 (float32) on random inputs and positions, and during
generation for the prefill and every decode step with our KV cache; the per-step input vectors (prompt rows
with media rows zeroed, the speaker row, reply_0 + codec bos, then the text-track queue under the batched
first-eos rule) equal the ones transformers' Qwen2_5OmniForConditionalGeneration.generate builds; and the
inference inputs equal the training layout's teacher-forced sequence for the same codes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import decode_oracle as oracle
import hf_reference as ref
from omni_jax import sharding
from omni_jax.generate import Generator, SamplingParams
from omni_jax.generate.talker import TalkerSettings
from omni_jax.talker import inputs as inputs_lib
from omni_jax.talker import layout, objective

pytestmark = pytest.mark.parity

TOL = 1e-4
PATCH_DIM = 3 * 2 * 14 * 14
TALKER_VARIANTS = {"gqa": {}, "mha": dict(num_attention_heads=2, num_key_value_heads=2, head_dim=12, rope_parameters={
    "mrope_section": [2, 2, 2], "rope_type": "default", "rope_theta": 1e4})}


def _prompts(rng, with_image: bool):
  """Two left-padded text prompts (row 1 shorter); with_image puts a 1x4x4 image (4 placeholders) into row 0."""
  ids = ref.text_ids(rng, 2, 11, 200)
  mask = np.ones_like(ids)
  mask[1, :4], ids[1, :4] = 0, 0
  media = {}
  if with_image:
    ids[0, 3:9] = [7, 2, 2, 2, 2, 8]
    patches = rng.standard_normal((16, PATCH_DIM)).astype(np.float32)
    media = dict(pixel_values=patches, image_grid_thw=np.array([[1, 4, 4]]))
  return ids, mask, media


def _our_prompt(ids, mask, media) -> dict:
  batch = dict(input_ids=ids.astype(np.int32), segment_ids=mask.astype(np.int32),
               labels=np.full(ids.shape, -100, np.int32), kind=np.zeros(ids.shape, np.int32))
  if media:  # [B, P, patch_dim] + [B, N, 3], row 1 without images
    pv = media["pixel_values"]
    batch["pixel_values"] = np.stack([pv, np.zeros_like(pv)])
    batch["image_grid_thw"] = np.stack([media["image_grid_thw"], np.zeros_like(media["image_grid_thw"])]).astype(np.int32)
  return batch


_BUILT = {}


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
  """variant -> (HF model, our config, graphdef, state), each built once."""

  def get(variant: str):
    if variant not in _BUILT:
      model = ref.build_omni(seed=3, **TALKER_VARIANTS[variant])
      config, graphdef, state = ref.converted(model, tmp_path_factory.mktemp("omni"))
      config.model.talker.speakers = dict(ref.SPEAKERS)
      _BUILT[variant] = model, config, graphdef, state
    return _BUILT[variant]

  return get


def _generator(config, graphdef, state) -> Generator:
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  shardings = sharding.state_shardings(state, mesh, config.sharding_rules)
  return Generator(graphdef, jax.device_put(state, shardings), config, mesh, shardings)


@pytest.mark.parametrize("variant", list(TALKER_VARIANTS))
def test_talker_logits_match_transformers(omni, variant):
  model, _, graphdef, state = omni(variant)
  ours = nnx.merge(graphdef, state).talker
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 9, 32)).astype(np.float32)
  pos = np.stack([np.arange(9) + 3, np.arange(9) * 2, np.arange(9) // 2])[:, None].repeat(2, axis=1)
  with torch.no_grad():
    t = model.talker
    hidden = t.model(inputs_embeds=t.thinker_to_talker_proj(torch.tensor(x)), position_ids=torch.tensor(pos))
    expected = t.codec_head(hidden.last_hidden_state).float().numpy()
  got = ours(jnp.asarray(x), jnp.asarray(pos), jnp.ones((2, 9), jnp.int32))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("variant,with_image", [("gqa", False), ("mha", True)])
def test_inputs_and_generation_logits_match_transformers(omni, variant, with_image):
  """Batched, left padded, rows whose replies end at different steps (one before max_new_tokens, one not);
  with an image in one prompt (its placeholder rows keep only the Thinker's hidden states)."""
  model, config, graphdef, state = omni(variant)
  rng = np.random.default_rng(2)
  ids, mask, media = _prompts(rng, with_image)
  # transformers' generate hands unprefixed pixel_values to the Talker too, whose generate rejects them: the
  # patches go to the Thinker only, the grid to both (the Talker's positions need it).
  hf_media = {("thinker_" if k == "pixel_values" else "") + k: torch.tensor(v) for k, v in media.items()}
  n_text, n_codes, stops = 7, 9, (112, 114)
  first = ref.hf_speech(model, torch.tensor(ids), torch.tensor(mask), thinker_max_new_tokens=n_text,
                        talker_max_new_tokens=2, talker_eos_token_id=stops, **hf_media)
  eos = int(first["thinker_tokens"][0, 3])  # row 0's reply then ends at step <= 3; row 1 may run to the end
  model.thinker.generation_config.eos_token_id = eos
  model.thinker.generation_config.pad_token_id = 0
  try:
    hf = ref.hf_speech(model, torch.tensor(ids), torch.tensor(mask), thinker_max_new_tokens=n_text,
                       talker_max_new_tokens=n_codes, talker_eos_token_id=stops, **hf_media)
  finally:
    model.thinker.generation_config.eos_token_id = None
  config.model.thinker.eos_token_ids = (eos,)
  generator = _generator(config, graphdef, state)
  prompt = _our_prompt(ids, mask, media)
  thinker = oracle.generate(generator, prompt, max_new_tokens=n_text, sampling=SamplingParams())
  np.testing.assert_array_equal(thinker.tokens, hf["thinker_tokens"])

  # The per-step input vectors.
  cfg = TalkerSettings(config).cfg
  batch = inputs_lib.speech_batch(prompt, thinker.tokens, cfg, [ref.SPEAKERS["Chelsie"]] * 2, (eos,))
  pre = jax.jit(lambda s, b: inputs_lib.prefill_inputs(nnx.merge(graphdef, s), b, ids.shape[1]))(state, batch)
  with torch.no_grad():
    codec = model.talker.get_input_embeddings()
    expected = hf["inputs_embeds"].clone()
    expected[:, -1] += codec(torch.tensor(113))
    expected[:, -2] += codec(torch.tensor(112))
  real = np.concatenate([mask, np.ones((2, 2), mask.dtype)], axis=1) > 0
  np.testing.assert_allclose(np.asarray(pre["inputs"])[real], expected.numpy()[real], atol=TOL, rtol=0)
  queue = hf["queue"].numpy()  # transformers' R: decode step k reads R[min(k - 1, len - 1)]
  np.testing.assert_allclose(np.asarray(pre["queue"])[:, 1:], queue, atol=TOL, rtol=0)

  # Prefill + decode logits with the KV cache, and the greedy codes.
  out = oracle.speech_codes(generator, prompt, thinker.tokens, max_new_tokens=n_codes,
                            sampling=SamplingParams(repetition_penalty=1.05), return_logits=True)
  steps = hf["logits"].shape[1]
  np.testing.assert_allclose(out.logits[:, :steps], hf["logits"].numpy(), atol=TOL, rtol=0)
  np.testing.assert_array_equal(out.codes[:, :steps], hf["codes"])


def test_reply_lengths_follow_the_batched_first_eos_rule():
  tokens = np.array([[5, 9, 6, 0], [9, 0, 0, 0], [5, 5, 5, 5], [5, 5, 5, 9]])
  # first eos 1 -> N 2; eos at 0 is clamped to 1 -> 2; none -> n - 1 -> 4; at the last column -> 4.
  np.testing.assert_array_equal(inputs_lib.reply_lengths(tokens, (9,)), [2, 2, 4, 4])


def test_inference_inputs_equal_the_training_layout(omni):
  """The Talker rows inference feeds (prefill + codec(previous code) + queue row) equal the teacher-forced
  sequence training lays out for the same reply and codes, and so do the logits."""
  _, config, graphdef, state = omni("gqa")
  cfg = TalkerSettings(config).cfg
  rng = np.random.default_rng(4)
  ids = ref.text_ids(rng, 1, 8, 200).astype(np.int32)
  reply = ref.text_ids(rng, 1, 5, 200).astype(np.int32)
  prompt = dict(input_ids=ids, segment_ids=np.ones_like(ids))
  codes = rng.integers(0, 100, 6).astype(np.int32)
  spk = ref.SPEAKERS["Ethan"]
  # Inference: reply of 5 tokens (its last one counts as the stop id), codes fed one per decode step.
  batch = inputs_lib.speech_batch(prompt, reply, cfg, [spk], (int(reply[0, -1]),))
  # Training: layout.write with the same codes, through the objective's input builder.
  row = layout.empty_row(8 + 2 + len(codes))
  layout.write(row, 0, 0, 1, layout.SpokenReply(8, 5, codes, spk, inputs_lib.codec_ids(cfg)))
  train = {k: v[None] for k, v in row.items()}
  train.update(input_ids=np.concatenate([ids, reply], axis=1), segment_ids=np.ones((1, 13), np.int32))

  @jax.jit
  def both(state, batch, train):
    model = nnx.merge(graphdef, state)
    pre = inputs_lib.prefill_inputs(model, batch, 8)
    last = pre["queue"].shape[1] - 1
    steps = [pre["queue"][:, min(k + 1, last)] + model.talker.codec_embed(codes[k]) for k in range(len(codes))]
    inference = jnp.concatenate([pre["inputs"], jnp.stack(steps, axis=1)], axis=1)
    teacher, positions = objective.talker_inputs(model, train)
    # Decoding with the cache: the prefill, then each fed code (the last code is never fed: its successor is
    # the end id).
    cache = model.talker.init_cache(1, 32)
    logits, cache = model.talker(pre["inputs"], pre["positions"], pre["segment_ids"], cache)
    decoded = [logits[:, -1]]
    for k in range(len(codes) - 1):
      step, cache = model.talker(inference[:, 10 + k][:, None], positions[:, :, 10 + k][..., None],
                                 jnp.ones((1, 1), jnp.int32), cache)
      decoded.append(step[:, 0])
    full = model.talker(teacher, positions, train["talker_segment_ids"])
    return inference, teacher, jnp.stack(decoded, axis=1), full[:, 9:9 + len(codes)]

  inference, teacher, decoded, full = both(state, batch, train)
  np.testing.assert_allclose(np.asarray(inference[:, :-1]), np.asarray(teacher[:, :-1]), atol=1e-6, rtol=0)
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), atol=TOL, rtol=0)


def test_media_ids_are_zeroed_in_the_prompt_only(omni):
  """transformers zeroes the input embeddings of the prompt's media placeholders, not those of generated ids
  (a random Thinker may emit a placeholder id): the reply row keeps H + E."""
  _, config, graphdef, state = omni("gqa")
  model = nnx.merge(graphdef, state)
  cfg = TalkerSettings(config).cfg
  ids = np.array([[11, 12, 3, 13, 14]], np.int32)  # a VIDEO id in the prompt (no video given) ...
  reply = np.array([[15, 3, 16, 17]], np.int32)  # ... and in the reply
  batch = inputs_lib.speech_batch(dict(input_ids=ids, segment_ids=np.ones_like(ids)), reply, cfg, [150], ())
  pre = inputs_lib.prefill_inputs(model, batch, 5)
  full = np.concatenate([ids, reply], axis=1)
  hidden = model.thinker(jnp.asarray(full), pre["positions"][:, :, :1] * 0 + jnp.arange(9), jnp.ones((1, 9), jnp.int32),
                         return_hidden=True)[1]
  embeds = model.thinker.embed(jnp.asarray(full))
  np.testing.assert_allclose(np.asarray(pre["inputs"][0, 2]), np.asarray(hidden[0, 2]), atol=1e-6)  # zeroed E
  np.testing.assert_allclose(np.asarray(pre["queue"][0, 1]), np.asarray(hidden[0, 6] + embeds[0, 6]), atol=1e-6)

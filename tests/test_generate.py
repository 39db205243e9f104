"""Thinker generation (omni_jax.generate) against transformers' generate, on tiny perturbed models.

Greedy tokens equal transformers' token for token, for batches of prompts of different lengths mixing text,
images, videos, audio and audio-in-video: the conversation engine's replies (the library's only decode path)
and the whole-batch oracle's (tests/decode_oracle.py, left-padded), whose per-step logits also agree within
1e-4 (float32); prefill + decode steps equal one full forward pass; the engine's sampling is reproducible and
its processors equal transformers'; meshes give the one-device tokens; the engine streams its replies' tokens
in order.
"""

import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp

import decode_oracle as oracle
import hf_reference as ref
import reply_testlib
from omni_jax import positions as positions_lib
from omni_jax import sharding
from omni_jax.config import TokenIds
from omni_jax.generate import Generator, SamplingParams, prompts
from omni_jax.generate import engine as engine_lib
from omni_jax.generate import sampling as sampling_lib
from omni_jax.input import chat, preprocess
from omni_jax.input.media import audio as audio_media

pytestmark = pytest.mark.parity

# The tiny configs' special ids (hf_reference.IDS) under the names the chat renderer uses.
FMT = chat.ChatFormat(special={"<|AUDIO|>": 1, "<|IMAGE|>": 2, "<|VIDEO|>": 3, "<|audio_bos|>": 4,
                               "<|audio_eos|>": 5, "<|vision_bos|>": 7, "<|vision_eos|>": 8})
PATCH_DIM = 3 * 2 * 14 * 14


def load(hf_model, tmp_path, mesh_shape=None, **generate):
  """(our Generator on a mesh, config) for a transformers model."""
  config, graphdef, state = ref.converted(hf_model, tmp_path, **{f"generate.{k}": v for k, v in generate.items()})
  devices = jax.devices() if mesh_shape else jax.devices()[:1]
  mesh = sharding.make_mesh(mesh_shape or {"data": 1}, devices)
  shardings = sharding.state_shardings(state, mesh, config.sharding_rules)
  return Generator(graphdef, jax.device_put(state, shardings), config, mesh, shardings), config


def make_sample(rng, vocab: int, kinds, n_text: int, name="s") -> preprocess.Sample:
  """Text, then media items of `kinds` ("image", "video", "audio", "audio_in_video"), then n_text tokens."""
  ids = list(rng.integers(10, vocab, 3))
  images, videos, audios = [], [], []
  for kind in kinds:
    if kind == "image":
      grid = (1, 4, 6)
      images.append((rng.standard_normal((24, PATCH_DIM)).astype(np.float32), grid))
      ids += chat.media_ids(chat.ImageItem(grid), FMT)
    elif kind == "audio":
      frames = int(rng.integers(120, 260))
      audios.append(rng.standard_normal((128, frames)).astype(np.float32))
      ids += chat.media_ids(chat.AudioItem(frames), FMT)
    else:  # a video, with its audio track for "audio_in_video"
      grid, spg = (3, 4, 4), 1.0
      videos.append((rng.standard_normal((48, PATCH_DIM)).astype(np.float32), grid, spg))
      frames = None
      if kind == "audio_in_video":
        frames = 330  # 82 tokens: two interleaved chunks on the audio side
        audios.append(rng.standard_normal((128, frames)).astype(np.float32))
      ids += chat.media_ids(chat.VideoItem(grid, spg, frames), FMT)
    ids += list(rng.integers(10, vocab, 2))
  ids += list(rng.integers(10, vocab, n_text))
  ids = np.asarray(ids, np.int32)
  return preprocess.Sample(name, 0, ids, np.full_like(ids, -100), images, videos, audios,
                           "audio_in_video" in kinds)


def hf_inputs(batch: dict, samples) -> dict:
  """transformers' generate kwargs for the same prompts (media in global placeholder order)."""
  out = dict(input_ids=torch.tensor(batch["input_ids"].astype(np.int64)),
             attention_mask=torch.tensor((batch["segment_ids"] > 0).astype(np.int64)))
  images = [im for s in samples for im in s.images]
  videos = [v for s in samples for v in s.videos]
  audios = [a for s in samples for a in s.audios]
  if images:
    out.update(pixel_values=torch.tensor(np.concatenate([r for r, _ in images])),
               image_grid_thw=torch.tensor([list(g) for _, g in images]))
  if videos:
    out.update(pixel_values_videos=torch.tensor(np.concatenate([v[0] for v in videos])),
               video_grid_thw=torch.tensor([list(v[1]) for v in videos]),
               video_second_per_grid=torch.tensor([v[2] for v in videos]))
  if audios:
    buf, lengths = audio_media.pad_batch(audios)
    out.update(input_features=torch.tensor(buf),
               feature_attention_mask=torch.tensor((np.arange(buf.shape[2])[None] < lengths[:, None]).astype(np.int64)))
  if any(s.use_audio_in_video for s in samples):
    out["use_audio_in_video"] = True
  return out


def hf_greedy(hf_model, inputs, max_new_tokens, eos, **kw):
  with torch.no_grad():
    r = hf_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                          eos_token_id=eos, output_logits=True, return_dict_in_generate=True, **kw)
  length = inputs["input_ids"].shape[1]
  return r.sequences[:, length:].numpy(), torch.stack(r.logits, 1).numpy()


def assert_same_replies(replies, hf_tokens):
  """The engine's replies are transformers' rows (which end in pad after the row's eos)."""
  for b, r in enumerate(replies):
    np.testing.assert_array_equal(r.tokens, hf_tokens[b, :len(r.tokens)])
    assert (hf_tokens[b, len(r.tokens):] == 0).all(), f"row {b} ended early"


def assert_same_generation(ours, hf_tokens, hf_logits, max_new_tokens, tol=1e-4):
  n = hf_tokens.shape[1]
  np.testing.assert_array_equal(ours.tokens[:, :n], hf_tokens)
  assert (ours.tokens[:, n:] == 0).all() and n <= max_new_tokens
  for b in range(hf_tokens.shape[0]):  # the steps at which the row was still generating
    k = int(ours.lengths[b])
    err = np.abs(ours.logits[b, :k] - hf_logits[b, :k]).max()
    assert err <= tol, f"row {b}: max abs logit difference {err}"


BATCHES = {
    # One row each: text only, an image, an audio, a video: four prompt lengths, left padding.
    "mixed": ([], ["image"], ["audio"], ["video"]),
    "audio_in_video": (["audio_in_video"], ["audio_in_video", "image"]),
}


@pytest.mark.parametrize("variant", list(ref.TEXT_VARIANTS))
@pytest.mark.parametrize("case", list(BATCHES))
def test_greedy_generation_matches_transformers(variant, case, tmp_path):
  hf_model = ref.build_thinker(variant, seed=len(variant) + len(case))
  gen, config = load(hf_model, tmp_path)
  vocab = config.model.thinker.text.vocab_size
  rng = np.random.default_rng(len(case))
  samples = [make_sample(rng, vocab, kinds, n_text=2 + 3 * i) for i, kinds in enumerate(BATCHES[case])]
  batch = prompts.prompt_batch(samples, pad_id=0, length_multiple=16)
  assert (batch["segment_ids"][:, 0] == 0).any(), "the batch must exercise left padding"
  inputs = hf_inputs(batch, samples)
  n = 10
  # An eos id the reference emits mid-way in row 0, so that stopping and the pad filler are exercised.
  free, _ = hf_greedy(hf_model, inputs, n, eos=None)
  eos = int(free[0, 3])
  hf_tokens, hf_logits = hf_greedy(hf_model, inputs, n, eos=eos)
  ours = oracle.generate(gen, batch, max_new_tokens=n, sampling=SamplingParams(), eos_token_ids=(eos,),
                         return_logits=True)
  assert ours.lengths[0] <= 4
  assert_same_generation(ours, hf_tokens, hf_logits, n)
  replies = reply_testlib.replies(reply_testlib.chat(gen, (eos,)), samples, max_new_tokens=n)
  assert_same_replies(replies, hf_tokens)


def test_prefill_and_decode_steps_equal_one_forward_pass(tmp_path):
  hf_model = ref.build_thinker("gqa4", seed=5)
  model, config = ref.ours(hf_model, tmp_path)
  ids = TokenIds.from_config(config.model.thinker)
  rng = np.random.default_rng(3)
  sample = make_sample(rng, config.model.thinker.text.vocab_size, ["image"], n_text=3)
  batch = prompts.prompt_batch([sample, make_sample(rng, 160, [], n_text=1)], pad_id=0, length_multiple=8)
  extra = rng.integers(10, 160, size=(2, 5)).astype(np.int32)  # k = 5 decode steps
  pixels, grids = jnp.asarray(batch["pixel_values"]), jnp.asarray(batch["image_grid_thw"])
  thinker = model.thinker
  seg = jnp.asarray(batch["segment_ids"])
  pos, deltas = positions_lib.rope_index(batch["input_ids"], ids=ids, segment_ids=seg,
                                         image_grid_thw=grids.reshape(-1, 3))
  cache = thinker.model.init_cache(2, batch["input_ids"].shape[1] + 8)
  logits, cache = thinker(jnp.asarray(batch["input_ids"]), pos, seg, cache=cache, pixel_values=pixels,
                          image_grid_thw=grids)
  steps = [logits]
  n_real = (batch["segment_ids"] > 0).sum(1)
  for k in range(extra.shape[1]):
    step_pos = positions_lib.decode_positions(deltas, n_real + k)
    out, cache = thinker(jnp.asarray(extra[:, k:k + 1]), step_pos, jnp.ones((2, 1), jnp.int32), cache=cache)
    steps.append(out)
  cached = np.concatenate([np.asarray(s) for s in steps], axis=1)

  full_ids = np.concatenate([batch["input_ids"], extra], axis=1)
  full_seg = np.concatenate([batch["segment_ids"], np.ones_like(extra)], axis=1)
  full_pos, _ = positions_lib.rope_index(full_ids, ids=ids, segment_ids=full_seg, image_grid_thw=grids.reshape(-1, 3))
  full = np.asarray(thinker(jnp.asarray(full_ids), full_pos, jnp.asarray(full_seg), pixel_values=pixels,
                            image_grid_thw=grids))
  real = full_seg > 0
  err = np.abs(cached - full)[real].max()
  assert err <= 1e-5, f"cached decode vs full forward: {err}"


def test_sampling_is_reproducible_and_top_k_1_is_greedy(tmp_path):
  gen, config = load(ref.build_thinker("gqa2", seed=11), tmp_path)
  rng = np.random.default_rng(4)
  samples = [make_sample(rng, 200, [], 4), make_sample(rng, 200, [], 9)]
  chat = reply_testlib.chat(gen, ())
  tokens = lambda sampling, seed=0: [r.tokens for r in reply_testlib.replies(  # noqa: E731
      chat, samples, max_new_tokens=12, sampling=sampling, seed=seed)]
  hot = SamplingParams(do_sample=True, temperature=1.5, top_k=50, top_p=0.95)
  a, b, c = tokens(hot, 1), tokens(hot, 1), tokens(hot, 2)
  assert a == b
  assert a != c, "another seed must draw other tokens"
  greedy = tokens(SamplingParams())
  assert tokens(SamplingParams(do_sample=True, top_k=1, temperature=0.7), 3) == greedy
  assert a != greedy


def test_repetition_penalty_matches_transformers(tmp_path):
  hf_model = ref.build_thinker("mha", seed=2)
  gen, config = load(hf_model, tmp_path)
  rng = np.random.default_rng(6)
  samples = [make_sample(rng, 128, [], 3), make_sample(rng, 128, ["image"], 1)]
  batch = prompts.prompt_batch(samples, pad_id=0, length_multiple=8)
  inputs = hf_inputs(batch, samples)
  plain, _ = hf_greedy(hf_model, inputs, 16, eos=None)
  penalised, logits = hf_greedy(hf_model, inputs, 16, eos=None, repetition_penalty=1.8)
  assert (plain != penalised).any(), "the case must be one where the penalty changes the output"
  ours = oracle.generate(gen, batch, max_new_tokens=16, sampling=SamplingParams(repetition_penalty=1.8),
                         eos_token_ids=(), return_logits=True)
  assert_same_generation(ours, penalised, logits, 16)
  replies = reply_testlib.replies(reply_testlib.chat(gen, ()), samples, max_new_tokens=16,
                                  sampling=SamplingParams(repetition_penalty=1.8))
  assert_same_replies(replies, penalised)


def test_logit_processors_equal_transformers():
  from transformers.generation import logits_process as lp

  rng = np.random.default_rng(0)
  logits = rng.standard_normal((4, 50)).astype(np.float32) * 3
  seen = np.zeros((4, 50), bool)
  prompt = rng.integers(0, 50, (4, 7))
  seen[np.arange(4)[:, None], prompt] = True
  for params in [SamplingParams(do_sample=True, temperature=0.7, top_k=5, top_p=0.8, repetition_penalty=1.3),
                 SamplingParams(do_sample=True, top_p=0.3), SamplingParams(do_sample=True, top_k=1),
                 SamplingParams(repetition_penalty=0.7)]:
    procs = lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(params.repetition_penalty)])
    if params.do_sample:
      procs += [lp.TemperatureLogitsWarper(params.temperature)] if params.temperature != 1 else []
      procs += [lp.TopKLogitsWarper(params.top_k)] if params.top_k else []
      procs += [lp.TopPLogitsWarper(params.top_p)] if params.top_p < 1 else []
    expected = procs(torch.tensor(prompt), torch.tensor(logits)).numpy()
    rows = sampling_lib.RowSampling(*(np.repeat(np.asarray(v)[None], 4) for v in sampling_lib.RowSampling.of(params)))
    got = np.asarray(sampling_lib.process_rows(jnp.asarray(logits), jnp.asarray(seen), rows))  # the engine's rule
    np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))
    np.testing.assert_allclose(got[~np.isinf(got)], expected[~np.isinf(expected)], rtol=1e-6)


def test_top_k_candidates_filter_as_the_whole_vocabulary(monkeypatch):
  """Rows whose top-k bounds them to the TOP_K_CANDIDATES largest scores are filtered on those alone: every row
  gets the whole-vocabulary path's scores (ties at the k-th score, a tie run past the candidates, top-p after
  top-k, rows that need the whole vocabulary beside them), and a row's scores do not depend on its neighbours."""
  rng = np.random.default_rng(3)
  logits = (rng.standard_normal((7, 1000)) * 3).astype(np.float32)
  logits[1] = np.round(logits[1])  # many equal scores around every k-th
  logits[2, rng.permutation(1000)[:80]] = 9.0  # 80 equal largest scores: top-20 keeps all 80, past the 64
  logits[5, rng.permutation(1000)[:10]] = 20.0  # 10 equal ones holding the mass: top-p cuts inside them, by id
  seen = np.zeros_like(logits, bool)
  settings = [dict(top_k=5, top_p=0.8), dict(top_k=20, top_p=0.9), dict(top_k=20, top_p=0.9), dict(top_k=0, top_p=0.7),
              dict(top_k=63, top_p=0.95, temperature=0.7), dict(top_k=20, top_p=0.5), dict(do_sample=False, top_k=5)]
  params = [sampling_lib.RowSampling.of(SamplingParams(**dict(dict(do_sample=True), **kw))) for kw in settings]
  stack = lambda ps: sampling_lib.RowSampling(*(np.stack(v) for v in zip(*ps)))  # noqa: E731
  got = np.asarray(sampling_lib.process_rows(jnp.asarray(logits), jnp.asarray(seen), stack(params)))
  for i, p in enumerate(params):  # alone, a row takes the path its own settings allow
    alone = sampling_lib.process_rows(jnp.asarray(logits[i:i + 1]), jnp.asarray(seen[i:i + 1]), stack([p]))
    np.testing.assert_array_equal(np.asarray(alone)[0], got[i])
  monkeypatch.setattr(sampling_lib, "TOP_K_CANDIDATES", 1)  # no row fits: every row sorts the whole vocabulary
  whole = np.asarray(sampling_lib.process_rows(jnp.asarray(logits), jnp.asarray(seen), stack(params)))
  np.testing.assert_array_equal(got, whole)
  assert np.isfinite(whole[2]).sum() > 64 and np.isfinite(whole[6]).all()  # the tie run kept, the greedy row whole
  assert 1 < np.isfinite(whole[5]).sum() < 10  # top-p kept part of the equal scores


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_meshes_give_the_one_device_tokens(shape, tmp_path):
  hf_model = ref.build_thinker("gqa4", seed=9)
  rng = np.random.default_rng(8)
  samples = [make_sample(rng, 160, ["image"] if i % 3 == 0 else [], n_text=i) for i in range(8)]
  params = SamplingParams(do_sample=True, temperature=1.3, top_k=40)
  kw = dict(max_new_tokens=8, sampling=params, seed=5)
  one, _ = load(hf_model, tmp_path / "one")
  expected = [r.tokens for r in reply_testlib.replies(reply_testlib.chat(one, ()), samples, **kw)]
  mesh = dict(zip(("data", "fsdp", "tensor"), shape))
  gen, _ = load(hf_model, tmp_path / "mesh", mesh_shape=mesh)
  got = [r.tokens for r in reply_testlib.replies(reply_testlib.chat(gen, ()), samples, **kw)]
  assert got == expected


def test_the_engine_streams_each_reply_in_order(tmp_path):
  """engine.run's events, per reply, are its tokens in order, and the stream ends at each reply's eos."""
  gen, _ = load(ref.build_thinker("gqa2", seed=1), tmp_path)
  rng = np.random.default_rng(2)
  samples = [make_sample(rng, 200, [], 3), make_sample(rng, 200, [], 6)]
  full = reply_testlib.replies(reply_testlib.chat(gen, ()), samples, max_new_tokens=9)
  row = full[1].tokens
  k = next(i for i in range(3, 9) if row[i] not in row[:i])  # an eos that ends row 1 mid-reply
  chat = reply_testlib.chat(gen, (row[k],))
  expected = [r.tokens for r in reply_testlib.replies(chat, samples, max_new_tokens=9)]
  assert expected[1] == row[:k + 1]
  engine = chat.engine(max_len=64, slots=2, max_new_tokens=9)
  replies = [engine_lib.Reply(chat.prefilled(engine, s), engine_lib.ReplySettings(9), keep=False) for s in samples]
  streamed = [[], []]
  for reply, kind, token in engine.run(replies):
    assert kind == "token"
    streamed[replies.index(reply)].append(token)
  assert streamed == expected


def test_cache_is_sharded_by_the_rule_table():
  """Rows over data/fsdp, kv heads over tensor, slots and head_dim replicated (config.sharding_rules)."""
  from configs import tiny
  from omni_jax.layers.attention import KVCache

  rules = tiny.get_config().sharding_rules
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  spec = sharding.logical_to_spec(KVCache.NAMES, (2, 8, 4, 64, 16), mesh, rules)
  assert spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"), "tensor", None, None)


@pytest.mark.parametrize("new_slots", [1, 3, 8])
def test_one_row_writes_its_slots_as_a_slice_and_drops_past_the_end(new_slots):
  """A single row with its own index (one conversation in the engine) writes k / v with a slice update, not a
  scatter (which XLA:GPU runs as a transpose of the whole cache at every step), and means the same as the
  scatter: the new slots from the row's index, those past max_len dropped, every other slot untouched."""
  from omni_jax.layers.attention import write_layer_slots

  def scatter(cache, new, layer, index):  # the rule: one slot at a time, out-of-range ones dropped
    return cache.at[layer, jnp.arange(1)[:, None], :, index[:, None] + jnp.arange(new.shape[1])[None]].set(
        new, mode="drop")

  rng = np.random.default_rng(new_slots)
  cache = jnp.asarray(rng.normal(size=(3, 1, 2, 8, 4)), jnp.float32)
  new = jnp.asarray(rng.normal(size=(1, new_slots, 2, 4)), jnp.float32)
  for index in sorted({0, 2, 8 - new_slots, 8 - new_slots + 1, 7, 8, 11}):
    for layer in (0, 2, jnp.int32(1)):
      ours = write_layer_slots(cache, new, layer, jnp.array([index], jnp.int32))
      np.testing.assert_array_equal(np.asarray(ours), np.asarray(scatter(cache, new, layer, jnp.array([index]))),
                                    err_msg=f"index {index}, layer {layer}")
  program = jax.jit(write_layer_slots).lower(cache, new, jnp.int32(1), jnp.array([3], jnp.int32)).as_text()
  assert "dynamic_update_slice" in program and "scatter" not in program


def test_one_row_attends_over_its_cache_as_it_does_among_others():
  """A single row reads its layer's cache with KV heads as the batch (the cache's own layout: XLA:GPU copies
  it otherwise); a row among others through [B, slots, kv_heads, D] views. The same attention: a prompt chunk
  and two decode steps of row 0 alone equal row 0 beside another row (GQA, perturbed weights and biases)."""
  from flax import nnx
  from omni_jax.layers.attention import Attention, KVCache

  layer = Attention(32, num_heads=6, num_kv_heads=2, head_dim=8, bias=(True, True, True, True), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  state = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), state)
  rng = np.random.default_rng(0)
  chunks = [rng.normal(size=(2, n, 32)).astype(np.float32) for n in (5, 1, 1)]

  @jax.jit
  def step(state, cache, x):
    cache, mask = cache.append(jnp.ones(x.shape[:2], bool))
    out, (k, v) = nnx.merge(graphdef, state)(x, mask, kv_cache=(cache.k, cache.v, 0, cache.index - x.shape[1]))
    return out, cache._replace(k=k, v=v)

  outs = {}
  for rows in (1, 2):
    cache = KVCache.create(1, rows, 16, 2, 8)
    cache = cache._replace(index=jnp.zeros((rows,), jnp.int32))
    outs[rows] = []
    for x in chunks:
      out, cache = step(state, cache, jnp.asarray(x[:rows]))
      outs[rows].append(np.asarray(out[0]))
  for alone, among in zip(outs[1], outs[2]):
    np.testing.assert_allclose(alone, among, rtol=1e-5, atol=1e-6)


def test_a_long_prefill_attends_tile_by_tile_and_equals_the_forward_pass():
  """A 4K-token prefill into a cache never holds [B, heads, L, max_len] scores (the cache's SegmentMask goes
  the blocked way past 256 MiB of them): its compiled temporaries are a small fraction of those scores, and
  its hidden states equal the cache-free forward pass on the real (not left-padded) tokens."""
  from flax import nnx
  from omni_jax.config import Runtime, TextConfig
  from omni_jax.models.text import DecoderStack

  cfg = TextConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=8, mrope_section=(2, 1, 1))
  stack = DecoderStack(cfg, Runtime(), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(stack)
  length, pad = 4096, 37
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, length, 64)), jnp.float32)
  seg = jnp.asarray((np.arange(length) >= pad)[None], jnp.int32)  # left padding, as the engine's prompts
  pos = jnp.broadcast_to(jnp.maximum(jnp.arange(length) - pad, 0)[None, None], (3, 1, length))

  def prefill(state, cache, x):
    return nnx.merge(graphdef, state)(x, pos, seg, cache)[0]

  cache = stack.init_cache(1, length)
  compiled = jax.jit(prefill).lower(state, cache, x).compile()
  scores = 4 * cfg.num_attention_heads * length * length
  assert compiled.memory_analysis().temp_size_in_bytes < scores / 8
  ours = compiled(state, cache, x)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, pos, seg)[0])(state, x)
  np.testing.assert_allclose(np.asarray(ours)[0, pad:], np.asarray(forward)[0, pad:], atol=2e-5, rtol=1e-5)


def test_cache_dtype_is_configurable(tmp_path):
  """config.generate.cache_dtype: a bfloat16 cache holds bf16 keys/values and stays close to float32."""
  sample = make_sample(np.random.default_rng(1), 200, ["image"], 3)
  logits = []
  for name, kw in (("f32", {}), ("bf16", dict(cache_dtype="bfloat16"))):
    gen, _ = load(ref.build_thinker("gqa2", seed=4), tmp_path / name, **kw)
    chat = reply_testlib.chat(gen)
    conv = chat.prefilled(chat.engine(max_len=64, max_new_tokens=6), sample)
    assert {a.dtype for a in jax.tree.leaves(conv.cache.k)} == {np.dtype(jnp.bfloat16 if kw else jnp.float32)}
    logits.append(np.asarray(conv.logits[0]))
  err = np.abs(logits[0] - logits[1]).max()
  assert 0 < err < 0.05, err  # rounded keys/values: different, but close

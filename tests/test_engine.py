"""The conversation engine (omni_jax.generate.engine): continuous batching equals decoding alone.

A tiny model with a Talker and random weights. Replies of different lengths, settings and modes (text, spoken,
sampled) share the slots, inserted while others decode and finishing early; each equals its reply decoded in
an engine of one slot, token for token and code for code, and leaves its conversation's cache as it would
alone (rows never share a cache index).
"""

import jax
import numpy as np
import pytest

from configs import tiny
from omni_jax import checkpoint
from omni_jax import generate
from omni_jax import sharding
from omni_jax.generate import engine as engine_lib
from omni_jax.generate import prompts
from decode_oracle import process
from omni_jax.generate.sampling import RowSampling, SamplingParams, choose_rows, process_rows
from omni_jax.models import omni

PROMPTS = ["Hello there, how are you?", "Tell me a story about a cat.", "What is two plus two?",
           "Name three colours.", "Say something short."]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ckpt"))
  c = tiny.get_config()
  c.mesh = {"data": 1}
  _, state, _ = omni.create_sharded(c, sharding.make_mesh({"data": 1}, jax.devices()[:1]), seed=5)
  checkpoint.save_params(path, state, c)
  return generate.load(path)


def make_engine(model, slots: int, steps: int) -> engine_lib.Engine:
  g = model.generator
  return engine_lib.Engine(g.graphdef, g.params, model.config, g.mesh, num_slots=slots, max_len=256,
                           max_new_tokens=16, speech=True, max_codes=16, vocab_limit=g.vocab_limit,
                           steps_per_call=steps)


def conversation(model, engine, prompt: str, length_multiple: int = 32) -> engine_lib.Conversation:
  sample = prompts.prompt_sample([{"role": "user", "content": prompt}], model.preprocessor)
  batch = prompts.prompt_batch([sample], pad_id=model.generator.ids.pad_token_id, length_multiple=length_multiple)
  batch = {k: v for k, v in batch.items() if k not in ("labels", "kind", "use_audio_in_video")}
  conv = engine.conversation()
  engine.prefill(conv, batch, sample.input_ids)
  return conv


def settings(model, i: int) -> engine_lib.ReplySettings:
  """Per-request settings that differ: lengths (one stops after 2 tokens), speech, sampling."""
  speech = model.speech
  sampled = SamplingParams(do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
  return engine_lib.ReplySettings(
      max_new_tokens=(12, 2, 9, 16, 5)[i], sampling=sampled if i == 3 else SamplingParams(), seed=i,
      speak=i in (0, 2, 3), speaker=speech.speaker_tokens(None, 1)[0], max_codes=(16, 0, 7, 12, 0)[i],
      talker_sampling=speech.sampling(do_sample=i == 3), talker_seed=10 + i, stop=() if i == 0 else speech.stop_ids)


def decode(model, slots: int, steps: int, which):
  engine = make_engine(model, slots, steps)
  replies = [engine_lib.Reply(conversation(model, engine, PROMPTS[i]), settings(model, i)) for i in which]
  order = []
  for reply, kind, _ in engine.run(replies):
    order.append((replies.index(reply), kind))
  return replies, order


def test_batched_replies_equal_solo_ones(model):
  alone = {i: decode(model, 1, 3, [i])[0][0] for i in range(len(PROMPTS))}
  # 5 replies over 2 slots, 3 steps a call: the 3rd waits for the short 2nd and joins mid-decode.
  together, order = decode(model, 2, 3, range(len(PROMPTS)))
  for i, (a, b) in enumerate(zip(together, (alone[i] for i in range(len(PROMPTS))))):
    assert a.tokens == b.tokens, i
    assert a.codes == b.codes, i
    assert len(a.tokens) == settings(model, i).max_new_tokens or a.tokens[-1] in model.stop_ids
    ca, cb = a.conversation, b.conversation
    assert ca.history == cb.history and ca.slots == cb.slots and int(ca.top) == int(cb.top)
    np.testing.assert_array_equal(np.asarray(ca.cache.valid), np.asarray(cb.cache.valid))
    valid = np.asarray(ca.cache.valid)[0]  # slots past a row's writes hold whatever an idle step left there
    np.testing.assert_allclose(np.asarray(ca.cache.k)[:, 0, :, valid], np.asarray(cb.cache.k)[:, 0, :, valid],
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ca.talker_cache.valid), np.asarray(cb.talker_cache.valid))
  assert len(together[1].tokens) == 2 and together[0].codes and not together[1].codes
  # The 3rd reply started before the 1st ended: a freed slot is taken at the next call.
  first_of_third = order.index((2, "token"))
  last_of_first = max(k for k, e in enumerate(order) if e[0] == 0)
  assert first_of_third < last_of_first


def test_a_conversation_goes_on_after_its_reply(model):
  """Release puts the reply in the conversation: a second turn in a batch equals the same turn alone."""
  results = []
  for slots, others in ((1, 0), (2, 1)):
    engine = make_engine(model, slots, 3)
    conv = conversation(model, engine, PROMPTS[0])
    first = engine_lib.Reply(conv, settings(model, 0))
    side = [engine_lib.Reply(conversation(model, engine, PROMPTS[4]), settings(model, 4)) for _ in range(others)]
    list(engine.run([first] + side))
    turn = model.tokenizer.encode("<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n")
    sample_ids = [first.tokens[-1]] + list(turn)
    batch = prompts.prompt_batch([_text_sample(sample_ids)], pad_id=model.generator.ids.pad_token_id,
                                 length_multiple=16)
    engine.prefill(conv, {k: v for k, v in batch.items() if k not in ("labels", "kind", "use_audio_in_video")},
                   sample_ids)
    second = engine_lib.Reply(conv, settings(model, 2))
    list(engine.run([second]))
    results.append((second.tokens, second.codes))
  assert results[0] == results[1]


def _text_sample(ids):
  from omni_jax.input import preprocess  # noqa: PLC0415

  ids = np.asarray(ids, np.int32)
  return preprocess.Sample("turn", 0, ids, np.zeros_like(ids), [], [], [], False)


def test_cancel_frees_the_slot_and_keeps_what_was_decoded(model):
  engine = make_engine(model, 1, 3)
  a = engine.submit(engine_lib.Reply(conversation(model, engine, PROMPTS[0]), settings(model, 0)))
  b = engine.submit(engine_lib.Reply(conversation(model, engine, PROMPTS[2]), settings(model, 2)))
  engine.admit()
  engine.step()
  assert a.slot == 0 and b.slot is None
  engine.cancel(a)
  assert a.finished and engine.replies == [None]
  assert a.conversation.history[-(len(a.tokens) - 1):] == a.tokens[:-1]
  engine.admit()
  assert b.slot == 0


def test_a_reply_cut_back_on_cancel_leaves_the_conversation_of_a_shorter_reply(model):
  """Barge-in: a spoken reply cancelled after 10 tokens but cut back to the 4 its listener was sent leaves the
  caches (the Thinker's and the Talker's prefix), history and positions of a reply that stopped at 4 tokens:
  the next turn decodes the same tokens and codes."""
  import dataclasses  # noqa: PLC0415

  results = []
  for cut in (True, False):
    engine = make_engine(model, 1, 3)
    conv = conversation(model, engine, PROMPTS[0])
    s = settings(model, 0)
    first = engine.submit(engine_lib.Reply(conv, s if cut else dataclasses.replace(s, max_new_tokens=4)))
    engine.admit()
    while not first.finished and (not cut or len(first.tokens) < 10):
      engine.step()
    if cut:
      assert len(first.tokens) == 10
      engine.cancel(first, keep_tokens=4)
    assert len(first.tokens) == 4 and not conv.in_reply
    turn = model.tokenizer.encode("<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n")
    ids = [first.tokens[-1]] + list(turn)
    batch = prompts.prompt_batch([_text_sample(ids)], pad_id=model.generator.ids.pad_token_id, length_multiple=16)
    engine.prefill(conv, {k: v for k, v in batch.items() if k not in ("labels", "kind", "use_audio_in_video")}, ids)
    second = engine_lib.Reply(conv, settings(model, 2))
    list(engine.run([second]))
    results.append((first.tokens, conv.history, second.tokens, second.codes))
  assert results[0] == results[1]


def test_decode_reads_a_window_of_a_long_cache_and_equals_decoding_over_all_of_it(model, monkeypatch):
  """A conversation near the end of the engine's first cache window (256 slots of 512): its spoken reply
  decodes in windows that grow mid-reply (256 slots, then the Thinker's whole cache and 512 of the Talker's
  530), next to a short conversation's reply, and equals the same replies decoded over the whole caches: every
  token and code, and the caches each conversation keeps (its valid slots, keys and values)."""

  def run(whole: bool):
    if whole:  # the windows as large as the caches: no call reads fewer slots than it has
      monkeypatch.setattr(engine_lib, "WINDOW_LEAST", 1 << 20)
    g = model.generator
    engine = engine_lib.Engine(g.graphdef, g.params, model.config, g.mesh, num_slots=2, max_len=512,
                               max_new_tokens=16, speech=True, max_codes=16, vocab_limit=g.vocab_limit,
                               steps_per_call=3)
    windows = []
    measure = engine.cache_windows
    monkeypatch.setattr(engine, "cache_windows", lambda: windows.append(measure()) or windows[-1])
    long = conversation(model, engine, "Tell me a story about a cat. " * 28, length_multiple=8)
    assert 244 <= long.slots <= 250, long.slots  # the reply's 12 tokens and 16 codes cross slot 256
    replies = [engine_lib.Reply(long, settings(model, 0)), engine_lib.Reply(conversation(model, engine, PROMPTS[2]),
                                                                           settings(model, 2))]
    list(engine.run(replies))
    caches = [np.asarray(x) for c in (long.cache, long.talker_cache) for x in (c.valid, c.k, c.v)]
    return [(r.tokens, r.codes) for r in replies], long.slots, caches, windows

  windowed, slots, caches, windows = run(False)
  whole, whole_slots, whole_caches, whole_windows = run(True)
  assert windows[0] == (256, 256) and (512, 512) in windows and set(windows) <= {(256, 256), (512, 256),
                                                                                (256, 512), (512, 512)}, windows
  assert set(whole_windows) == {(512, 512 + 2 + 16)}
  assert windowed == whole and len(windowed[0][1]) == 16  # the first reply spoke on past slot 256
  assert slots == whole_slots > 256
  for i in (0, 3):  # the Thinker's cache and the Talker's prefix: the same slots valid, the same keys and values
    valid = caches[i][0]
    assert valid[256:slots].all()  # written past the first window
    np.testing.assert_array_equal(caches[i], whole_caches[i])
    for j in (i + 1, i + 2):
      np.testing.assert_allclose(caches[j][:, 0, :, valid], whole_caches[j][:, 0, :, valid], atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_row_sampling_equals_sampling_params(seed):
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal((5, 300)).astype(np.float32) * 3
  seen = rng.random((5, 300)) < 0.1
  rows = [SamplingParams(), SamplingParams(repetition_penalty=1.3),
          SamplingParams(do_sample=True, temperature=0.7, top_k=20),
          SamplingParams(do_sample=True, top_p=0.8, repetition_penalty=0.9),
          SamplingParams(do_sample=True, temperature=1.5, top_k=7, top_p=0.5)]
  per_row = RowSampling(*(np.stack(v) for v in zip(*(RowSampling.of(p) for p in rows))))
  got = np.asarray(process_rows(logits, seen, per_row))
  for r, p in enumerate(rows):
    want = np.asarray(process(logits[r:r + 1], seen[r:r + 1], p))[0]
    np.testing.assert_allclose(got[r], want, rtol=1e-6)
  keys = jax.vmap(jax.random.key)(np.arange(5))
  tokens = np.asarray(choose_rows(got, keys, per_row))
  assert tokens[0] == logits[0].argmax() and np.isfinite(got[np.arange(5), tokens]).all()


def test_on_gpus_the_choice_is_the_same_behind_one_conditional(monkeypatch):
  """next_tokens on a GPU runs the penalty, the filter and the draw unconditionally behind one conditional (each
  conditional is a host round trip there): the same tokens as the chain of conditionals, for greedy rows, rows
  with a penalty, sampled rows and a row whose top-k needs the whole vocabulary, alone and mixed."""
  from omni_jax.generate import sampling
  from omni_jax.layers import kernels

  rng = np.random.default_rng(0)
  logits = rng.standard_normal((5, 300)).astype(np.float32) * 3
  seen = rng.random((5, 300)) < 0.1
  keys = jax.vmap(jax.random.key)(np.arange(5))
  rules = [SamplingParams(), SamplingParams(repetition_penalty=1.3), SamplingParams(do_sample=True, top_k=20),
           SamplingParams(do_sample=True, top_p=0.8, repetition_penalty=0.9),
           SamplingParams(do_sample=True, temperature=1.5, top_k=100, top_p=0.5)]
  mixes = [[rules[0]] * 5, [rules[0], rules[1]] * 2 + [rules[0]], [rules[2]] * 5, rules]
  for platform, most in (("cpu", 4), ("gpu", 2)):  # conditionals in the program: CPUs skip what no row uses
    monkeypatch.setattr(kernels, "platform", lambda platform=platform: platform)
    choose = jax.jit(lambda *args: sampling.next_tokens(*args))  # traced anew for each platform
    for mix in mixes:
      per_row = RowSampling(*(np.stack(v) for v in zip(*(RowSampling.of(p) for p in mix))))
      want = choose_rows(process_rows(logits, seen, per_row), keys, per_row)
      np.testing.assert_array_equal(np.asarray(choose(logits, seen, keys, per_row)), np.asarray(want),
                                    err_msg=f"{platform}: {mix}")
    assert choose.lower(logits, seen, keys, per_row).as_text().count("stablehlo.case") == most, platform


def test_per_layer_weight_buffers_decode_the_same_replies(model, monkeypatch):
  """config.generate.layer_buffers="split" (GPUs' default): the Generator holds each stacked weight as one buffer
  per layer (their values the stacked ones' slices) and every program runs the layers unrolled over them; the
  replies, spoken ones and their caches included, are the stacked weights' own. Where a compiler would copy a
  stacked cache's slices (jax >= 0.11), the caches are one buffer per layer too."""
  from flax import nnx

  from omni_jax.generate.model import Generator, decoder_stacks
  from omni_jax.models import scan

  g = model.generator
  assert not g.split_layers and not scan.is_split(g.params)  # "auto" on a CPU: stacked
  config = model.config.copy_and_resolve_references()
  config.generate.layer_buffers = "split"
  split = Generator(g.graphdef, g.params, config, g.mesh, g.param_shardings, vocab_limit=g.vocab_limit)
  assert split.split_layers and scan.is_split(split.params)
  # The decoders' stacks only, as the towers declare them: the encoders' and Token2Wav's stay stacked (and scanned).
  assert decoder_stacks() == (("thinker", "model", "layers"), ("talker", "model", "layers"))
  for path, leaf in jax.tree_util.tree_flatten_with_path(split.params, is_leaf=lambda x: isinstance(
      x, scan.LayerSlices))[0]:
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    decoder = any(keys[:3] == stack for stack in decoder_stacks())
    assert isinstance(leaf, scan.LayerSlices) == decoder, keys
  assert {k for k in ("visual", "audio_tower") if k in g.params["thinker"]} and "talker" in g.params
  stacked_q = g.params["thinker"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"].get_value()
  per_layer = split.params["thinker"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"].get_value()
  assert len(per_layer) == stacked_q.shape[0]
  np.testing.assert_array_equal(np.asarray(per_layer.layers[1]), np.asarray(stacked_q[1]))
  before = split.params
  split.params = g.params  # evaluation sets the same parameters again: split once
  assert split.params is before
  split.params = None  # dropped between evaluations, then given again: split again
  assert split.params is None and split.param_shardings is not None
  split.params = g.params
  assert scan.is_split(split.params) and split.params is not before

  decoders = nnx.merge(split.graphdef, split.params)
  for copied in (False, True):  # True last: the split run below keeps per-layer caches
    monkeypatch.setattr(scan, "STACKED_CACHE_SLICES_COPIED", copied)
    for decoder in (decoders.thinker.model, decoders.talker.model):
      assert isinstance(decoder.init_cache(1, 8).k, tuple) == copied
    assert not isinstance(nnx.merge(g.graphdef, g.params).thinker.model.init_cache(1, 8).k, tuple)

  expected, _ = decode(model, 2, 3, range(len(PROMPTS)))
  model.generator = split
  try:
    got, _ = decode(model, 2, 3, range(len(PROMPTS)))
  finally:
    model.generator = g
  for i, (a, b) in enumerate(zip(got, expected)):
    assert a.tokens == b.tokens and a.codes == b.codes, i
    # The caches are one buffer per layer too (each layer reads its own), holding the stacked cache's rows.
    for ours, theirs in ((a.conversation.cache, b.conversation.cache),
                         (a.conversation.talker_cache, b.conversation.talker_cache)):
      assert isinstance(ours.k, tuple) and len(ours.k) == theirs.k.shape[0] and ours.k[0].shape[0] == 1
      for x, y in ((ours.k, theirs.k), (ours.v, theirs.v)):
        np.testing.assert_allclose(np.concatenate([np.asarray(layer) for layer in x]), np.asarray(y),
                                   rtol=1e-5, atol=1e-5)
  config.generate.layer_buffers = "sideways"
  with pytest.raises(ValueError, match="config.generate.layer_buffers"):
    Generator(g.graphdef, g.params, config, g.mesh, g.param_shardings)

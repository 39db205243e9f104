"""Whole-batch decode programs, kept as test oracles: the library replies through the conversation engine
(omni_jax.generate.engine) only.

These are the former Generator.generate and SpeechGenerator.generate: one jitted program per prompt shape and
settings, a left-padded batch decoded in one lax.while_loop, optionally returning every step's raw logits.
They stay because parity tests compare logits step by step with transformers (the engine returns ids only),
and because the teacher-forced Talker (one Thinker pass over prompt + given reply) is an independent check of
the engine's Talker, which speaks one text token behind the Thinker.

  out = decode_oracle.generate(generator, batch, max_new_tokens=8, return_logits=True)   # Output
  speech = decode_oracle.speech_codes(generator, batch, out.tokens, speaker="Chelsie")  # SpeechOutput
"""

import weakref
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from omni_jax import config as config_lib
from omni_jax import positions as positions_lib
from omni_jax import sharding
from omni_jax.generate.model import Generator
from omni_jax.generate.sampling import SamplingParams
from omni_jax.generate.talker import TalkerSettings
from omni_jax.layers.attention import KVCache
from omni_jax.talker import inputs as talker_inputs
from omni_jax.thinker.inputs import model_inputs
from omni_jax.train import step as step_lib


class Output(NamedTuple):
  """Generated ids [B, max_new_tokens] (pad after a row's stop token), their count per row (the stop token
  included), and, when asked for, the raw logits each token was chosen from [B, max_new_tokens, V]."""
  tokens: np.ndarray
  lengths: np.ndarray
  logits: Optional[np.ndarray] = None


class SpeechOutput(NamedTuple):
  """codes [B, max_new_tokens]: the chosen codec ids (the stop id, then codec pad, after a row's end);
  lengths [B]: the speech codes of each row, i.e. the codes before its first stop id (what Token2Wav voices);
  logits [B, max_new_tokens, V] of each step when asked for."""
  codes: np.ndarray
  lengths: np.ndarray
  logits: Optional[np.ndarray] = None

  def row(self, i: int) -> np.ndarray:
    return self.codes[i, :self.lengths[i]]


class _Loop(NamedTuple):
  step: jax.Array
  cache: KVCache
  logits: jax.Array  # [B, V] float32: the next token's logits
  seen: jax.Array  # [B, V] bool (repetition penalty) or [B, 0]
  tokens: jax.Array  # [B, N]
  lengths: jax.Array  # [B]
  done: jax.Array  # [B]
  all_logits: jax.Array  # [B, N, V] or [B, 0, V]


def _sharded_cache(decoder, batch: int, length: int, dtype=None) -> KVCache:
  return decoder.init_cache(batch, length, dtype).map_kv()


def _next_token(logits, seen, done, key, step, *, sampling: SamplingParams, eos, pad_token_id: int,
                suppress: Sequence[int], vocab_limit: Optional[int], keep: Sequence[int]):
  """One choice per row: (token [B], done after it, seen after it). Ids >= vocab_limit (but those in keep) and
  those in suppress are never chosen; one key for the batch, folded with the step."""
  vocab = logits.shape[-1]
  if vocab_limit is not None and vocab_limit < vocab:
    ids = jnp.arange(vocab)
    allowed = (ids < vocab_limit) | jnp.isin(ids, jnp.asarray(tuple(keep) or (-1,), jnp.int32))
    logits = jnp.where(allowed[None], logits, -jnp.inf)
  if len(suppress):
    logits = logits.at[:, jnp.asarray(tuple(suppress), jnp.int32)].set(-jnp.inf)
  token = choose(process(logits, seen, sampling), jax.random.fold_in(key, step), sampling)
  token = jnp.where(done, pad_token_id, token)
  if sampling.penalises:
    seen = seen.at[jnp.arange(token.shape[0]), token].set(True)
  return token, done | jnp.isin(token, eos), seen


def _decode_loop(feed: Callable, cache, logits, seen, key, *, max_new_tokens: int, return_logits: bool,
                 **choice) -> _Loop:
  """feed(cache, token [B], step) -> (cache, next logits [B, V]) runs a chosen token through the model; the
  loop ends at max_new_tokens or when every row stopped (later tokens of a stopped row are pad)."""
  b, vocab = logits.shape

  def body(c: _Loop) -> _Loop:
    token, done, seen = _next_token(c.logits, c.seen, c.done, key, c.step, **choice)
    lengths = c.lengths + (~c.done).astype(jnp.int32)
    all_logits = c.all_logits.at[:, c.step].set(c.logits) if return_logits else c.all_logits
    more = (c.step + 1 < max_new_tokens) & ~jnp.all(done)  # the last step needs no forward pass
    cache, next_logits = jax.lax.cond(more, lambda cache: feed(cache, token, c.step), lambda cache: (cache, c.logits),
                                      c.cache)
    return _Loop(c.step + 1, cache, next_logits, seen, c.tokens.at[:, c.step].set(token), lengths, done, all_logits)

  init = _Loop(jnp.zeros((), jnp.int32), cache, logits, seen,
               jnp.full((b, max_new_tokens), choice["pad_token_id"], jnp.int32), jnp.zeros((b,), jnp.int32),
               jnp.zeros((b,), bool), jnp.zeros((b, max_new_tokens if return_logits else 0, vocab), jnp.float32))
  return jax.lax.while_loop(lambda c: (c.step < max_new_tokens) & ~jnp.all(c.done), body, init)


def _thinker_fn(graphdef, ids: config_lib.TokenIds, *, max_new_tokens, sampling, eos_token_ids, pad_token_id,
                cache_len, cache_dtype, return_logits, vocab_limit, mesh, rules):
  """(params, prompt batch, key data) -> (tokens, lengths, logits): a left-padded prefill with media, then the
  loop feeding each token at position n_real + k + delta on all three rope rows."""
  eos = jnp.asarray(tuple(eos_token_ids) or (-1,), jnp.int32)

  def fn(params, batch, key_data):
    thinker = nnx.merge(graphdef, params).thinker
    key = jax.random.wrap_key_data(key_data)
    input_ids, seg = batch["input_ids"], batch["segment_ids"]
    b = input_ids.shape[0]
    rows = jnp.arange(b)
    with sharding.activate(mesh, rules):
      positions, media = model_inputs(batch, ids)
      valid = seg > 0
      n_real, deltas = valid.sum(axis=1).astype(jnp.int32), positions_lib.position_deltas(positions, valid)
      cache = _sharded_cache(thinker.model, b, cache_len, cache_dtype)
      hidden, cache = thinker.model(thinker.embed_inputs(input_ids, **media), positions, seg, cache)
      last = jnp.max(jnp.where(valid, jnp.arange(input_ids.shape[1]), 0), axis=1)  # each row's last real token
      logits = thinker.logits(hidden[rows, last][:, None])[:, 0].astype(jnp.float32)
      # The prompt's real tokens count for the repetition penalty; padding does not (transformers 5 alike).
      seen = (jnp.zeros((b, logits.shape[-1]), bool).at[rows[:, None], input_ids].max(valid) if sampling.penalises
              else jnp.zeros((b, 0), bool))

      def feed(cache, token, step):
        pos = positions_lib.decode_positions(deltas, n_real + step)
        hidden, cache = thinker.model(thinker.embed(token[:, None]), pos, jnp.ones((b, 1), jnp.int32), cache)
        return cache, thinker.logits(hidden)[:, 0].astype(jnp.float32)

      out = _decode_loop(feed, cache, logits, seen, key, max_new_tokens=max_new_tokens, return_logits=return_logits,
                         sampling=sampling, eos=eos, pad_token_id=pad_token_id, suppress=(), vocab_limit=vocab_limit,
                         keep=tuple(eos_token_ids))
    return out.tokens, out.lengths, out.all_logits

  return fn


def _speech_fn(graphdef, *, prompt_len, max_new_tokens, sampling, stop_ids, pad_id, suppress, cache_len, cache_dtype,
               return_logits, code_limit, mesh, rules):
  """(params, speech batch, key data) -> (codes, counts incl. the stop id, logits): the Talker's prefill of the
  L + 2 rows (omni_jax.talker.inputs), then the loop feeding codec_embed(code) + the next text-track row."""

  def fn(params, batch, key_data):
    model = nnx.merge(graphdef, params)
    talker = model.talker
    key = jax.random.wrap_key_data(key_data)
    with sharding.activate(mesh, rules):
      pre = talker_inputs.prefill_inputs(model, batch, prompt_len)
      b = pre["inputs"].shape[0]
      cache = _sharded_cache(talker.model, b, cache_len, cache_dtype)
      logits, cache = talker(pre["inputs"], pre["positions"], pre["segment_ids"], cache)
      queue, last = pre["queue"], pre["queue"].shape[1] - 1
      base = pre["positions"][:, :, -1:]  # [3, B, 1]: the position of reply_0's row

      def feed(cache, code, step):  # code c_step in: row L+1+(step+1)
        j = jnp.minimum(step + 1, last)
        x = (queue[:, j] + talker.codec_embed(code)).astype(queue.dtype)
        out, cache = talker(x[:, None], base + step + 1, jnp.ones((b, 1), jnp.int32), cache)
        return cache, out[:, 0]

      seen = pre["seen"] if sampling.penalises else jnp.zeros((b, 0), bool)
      out = _decode_loop(feed, cache, logits[:, -1], seen, key, max_new_tokens=max_new_tokens,
                         return_logits=return_logits, sampling=sampling, eos=jnp.asarray(tuple(stop_ids), jnp.int32),
                         pad_token_id=pad_id, suppress=suppress, vocab_limit=code_limit,
                         keep=tuple(i for i in stop_ids if i >= 0))
    return out.tokens, out.lengths, out.all_logits

  return fn


_PROGRAMS: "weakref.WeakKeyDictionary[Generator, dict]" = weakref.WeakKeyDictionary()


def _program(generator: Generator, make: Callable, batch: Mapping[str, np.ndarray], **static):
  """The jitted program of `make` for this generator, batch shapes and settings (built once)."""
  compiled = _PROGRAMS.setdefault(generator, {})
  key = (make, tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items())), tuple(sorted(static.items())))
  if key not in compiled:
    g = generator
    replicated = NamedSharding(g.mesh, PartitionSpec())
    compiled[key] = jax.jit(make(g.graphdef, mesh=g.mesh, rules=g.rules, **static),
                            in_shardings=(g.param_shardings, step_lib.batch_shardings(batch, g.mesh, g.rules),
                                          replicated), out_shardings=replicated)
  return compiled[key]


def _cache_dtype(generator: Generator):
  name = generator.defaults.get("cache_dtype")
  return config_lib.dtype_of(name, "generate.cache_dtype") if name else None


def generate(generator: Generator, batch: Mapping[str, Any], *, max_new_tokens: Optional[int] = None,
             sampling: Optional[SamplingParams] = None, seed: Optional[int] = None,
             eos_token_ids: Optional[Sequence[int]] = None, return_logits: bool = False) -> Output:
  """The Thinker's replies to a left-padded prompt batch (omni_jax.batch fields; segment_ids 0 = padding).
  Defaults: config.generate (max_new_tokens, the sampling rule, seed, cache_dtype) and the model's eos ids;
  ids at or past generator.vocab_limit are never chosen, the eos ids aside."""
  g = generator
  max_new_tokens = g.new_tokens(max_new_tokens)
  batch = {k: np.asarray(v) for k, v in batch.items()}
  program = _program(
      g, _thinker_fn, batch, ids=g.ids, max_new_tokens=max_new_tokens, sampling=sampling or g.sampling(),
      eos_token_ids=tuple(int(i) for i in (g.ids.eos_token_ids if eos_token_ids is None else eos_token_ids)),
      pad_token_id=int(g.ids.pad_token_id), cache_len=batch["input_ids"].shape[1] + max_new_tokens,
      cache_dtype=_cache_dtype(g), return_logits=return_logits, vocab_limit=g.vocab_limit)
  seed = int(g.defaults.get("seed", 0) if seed is None else seed)
  tokens, lengths, logits = program(g.params, batch, jax.random.key_data(jax.random.key(seed)))
  return Output(np.asarray(tokens), np.asarray(lengths), np.asarray(logits) if return_logits else None)


def speech_codes(generator: Generator, prompt: Mapping[str, Any], tokens: np.ndarray, *, speaker=None,
                 max_new_tokens: Optional[int] = None, sampling: Optional[SamplingParams] = None,
                 seed: Optional[int] = None, eos_token_ids: Optional[Sequence[int]] = None,
                 stop_ids: Optional[Sequence[int]] = None, return_logits: bool = False) -> SpeechOutput:
  """The teacher-forced Talker: speech codes for the Thinker's replies `tokens` [B, N] (pad after a row's stop
  id) to `prompt` (the left-padded batch they answer). speaker: a name, one per row, or None (default_speaker).
  eos_token_ids: the Thinker's stop ids, which end each row's text track (transformers' batched first-eos
  rule). stop_ids: the codes that end a row (default codec pad and end; () runs every row to max_new_tokens).
  Defaults: config.generate.talker (the released decoding)."""
  g, talker = generator, TalkerSettings(generator.config)
  d = talker.defaults
  max_new_tokens = int(d["max_new_tokens"] if max_new_tokens is None else max_new_tokens)
  prompt = {k: np.asarray(v) for k, v in prompt.items()}
  tokens = np.asarray(tokens)
  eos = tuple(int(i) for i in (g.ids.eos_token_ids if eos_token_ids is None else eos_token_ids))
  batch = talker_inputs.speech_batch(prompt, tokens, talker.cfg, talker.speaker_tokens(speaker, tokens.shape[0]), eos)
  prompt_len = prompt["input_ids"].shape[1]
  stop_ids = talker.stop_ids if stop_ids is None else tuple(int(i) for i in stop_ids)
  program = _program(
      g, _speech_fn, batch, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
      sampling=sampling or talker.sampling(), stop_ids=stop_ids or (-1,), pad_id=talker.cfg.tts_codec_pad_token_id,
      suppress=(talker.cfg.tts_codec_start_token_id,), cache_len=prompt_len + 2 + max_new_tokens,
      cache_dtype=_cache_dtype(g), return_logits=return_logits, code_limit=talker.code_limit)
  seed = int(d.get("seed", 0) if seed is None else seed)
  codes, counts, logits = program(g.params, batch, jax.random.key_data(jax.random.key(seed)))
  codes, counts = np.asarray(codes), np.asarray(counts)
  stopped = np.isin(codes[np.arange(len(counts)), np.maximum(counts - 1, 0)], stop_ids)
  return SpeechOutput(codes, counts - stopped.astype(counts.dtype), np.asarray(logits) if return_logits else None)


# ------------------------------------------------------------------------------------------------ sampling
# One SamplingParams for the whole batch, transformers' processors in their order (RepetitionPenalty, then for
# sampling Temperature -> TopK -> TopP); the engine's per-row rules (omni_jax.generate.sampling) equal them.


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
  """Logits of tokens already in the sequence: divided by `penalty` when positive, multiplied when negative."""
  penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
  return jnp.where(seen, penalised, logits)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Keep the k largest logits of each row (ties with the k-th kept), the rest -inf."""
  k = min(k, logits.shape[-1])
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """Keep the smallest set of most likely tokens whose probability reaches p (at least one), the rest -inf.

  transformers' rule: sorted ascending, drop tokens whose cumulative probability is <= 1 - p.
  """
  order = jnp.argsort(logits, axis=-1)
  ascending = jnp.take_along_axis(logits, order, axis=-1)
  cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
  drop_sorted = (cumulative <= 1 - p).at[..., -1].set(False)
  drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
  return jnp.where(drop, -jnp.inf, logits)


def process(logits: jax.Array, seen: Optional[jax.Array], params: SamplingParams) -> jax.Array:
  """[B, V] float32 logits -> the scores tokens are chosen from."""
  logits = logits.astype(jnp.float32)
  if params.penalises:
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
  if params.do_sample:
    if params.temperature != 1.0:
      logits = logits / params.temperature
    if params.top_k > 0:
      logits = top_k_filter(logits, params.top_k)
    if params.top_p < 1.0:
      logits = top_p_filter(logits, params.top_p)
  return logits


def choose(scores: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
  """Next token [B] int32: argmax (greedy) or a draw from softmax(scores) with `key`."""
  if not params.do_sample:
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)

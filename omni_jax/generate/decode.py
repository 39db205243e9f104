"""Thinker text generation: one prefill with media, then the whole decode loop inside jit.

The prompt is a batch of the pipeline's contract (omni_jax.batch): input_ids with segment_ids 1 on real
tokens and 0 on padding (left padding, or any padding: the cache marks padded slots invalid), plus the
media fields. One compiled program per (prompt shapes, max_new_tokens, sampling rule):

  prefill   TMRoPE positions (omni_jax.positions.rope_index, with media), the encoders, the decoder stack
            writing the KV cache slots [0, L); logits of each row's last real token.
  decode    lax.while_loop: choose a token per row (omni_jax.generate.sampling), stop a row at an eos id
            (later tokens are pad), feed the token at position n_real + k + delta on all three rows (spec
            §3.4), until max_new_tokens or every row stopped. No host round trip per token; a streaming
            caller gets each step's tokens through an io_callback.
Runs on the mesh: parameters in their training layout, the prompt rows over data/fsdp, the cache by the same
rule table (rows over data/fsdp, kv heads over tensor).
"""

import contextlib
import itertools
import queue
import threading
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omni_jax import config as config_lib
from omni_jax import positions as positions_lib
from omni_jax import sharding
from omni_jax.generate import limits
from omni_jax.generate.sampling import SamplingParams, choose, process
from omni_jax.layers import KVCache
from omni_jax.train import step as step_lib

OnToken = Callable[[int, np.ndarray, np.ndarray], None]  # (step, tokens [B], stopped [B] after this token)


class Output(NamedTuple):
  """Generated ids [B, max_new_tokens] (pad after a row's stop token), their count per row (the stop token
  included), and, when asked for, the raw logits each token was chosen from [B, max_new_tokens, V]."""
  tokens: np.ndarray
  lengths: np.ndarray
  logits: Optional[np.ndarray] = None


class _Loop(NamedTuple):
  step: jax.Array
  cache: KVCache
  logits: jax.Array  # [B, V] float32: the next token's logits
  seen: jax.Array  # [B, V] bool (repetition penalty) or [B, 0]
  tokens: jax.Array  # [B, N]
  lengths: jax.Array  # [B]
  done: jax.Array  # [B]
  all_logits: jax.Array  # [B, N, V] or [B, 0, V]


# io_callback targets must be stable (a new closure per call would recompile): one dispatcher, keyed by id.
_LISTENERS: dict[int, OnToken] = {}
_NEXT_ID = itertools.count(1)


def _dispatch(listener, step, tokens, done):
  fn = _LISTENERS.get(int(listener))
  if fn is not None:
    fn(int(step), np.asarray(tokens), np.asarray(done))


@contextlib.contextmanager
def listening(on_token: OnToken) -> Iterator[np.ndarray]:
  """A listener id (int32) for a program built with streaming: its io_callback calls on_token(step, tokens,
  stopped) while the id is live (the Talker's and the serving session's loops stream through it too)."""
  listener = next(_NEXT_ID)
  _LISTENERS[listener] = on_token
  try:
    yield np.int32(listener)
  finally:
    _LISTENERS.pop(listener, None)


def sharded_cache(decoder, batch: int, length: int, dtype=None) -> KVCache:
  """An empty KV cache of a decoder stack, laid out by the rule table (rows over data/fsdp, kv heads over tensor)."""
  cache = decoder.init_cache(batch, length, dtype)
  return cache._replace(k=sharding.constrain(cache.k, KVCache.NAMES), v=sharding.constrain(cache.v, KVCache.NAMES))


def allowed_ids(logits: jax.Array, vocab_limit: Optional[int], keep: Sequence[int] = ()) -> jax.Array:
  """logits [B, V] with every id >= vocab_limit but those in `keep` at -inf (None, or a limit of V or more:
  unchanged). The tables' padded rows (omni_jax.generate.limits) are never chosen, greedy or sampled."""
  vocab = logits.shape[-1]
  if vocab_limit is None or vocab_limit >= vocab:
    return logits
  ids = jnp.arange(vocab)
  allowed = ids < vocab_limit
  if len(keep):
    allowed = allowed | jnp.isin(ids, jnp.asarray(tuple(keep), jnp.int32))
  return jnp.where(allowed[None], logits, -jnp.inf)


def next_token(logits: jax.Array, seen: jax.Array, done: jax.Array, key: jax.Array, step: jax.Array, *,
               sampling: SamplingParams, eos: jax.Array, pad_token_id: int, suppress: Sequence[int] = (),
               vocab_limit: Optional[int] = None, keep: Sequence[int] = ()) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One decoding choice (inside jit): (token [B], done after it [B], seen after it).

  logits [B, V] float32; seen [B, V] bool: ids the repetition penalty sees ([B, 0] without one); done [B]: rows
  that stopped earlier (they get pad_token_id); suppress: ids never chosen (their logits -inf before the
  processors, as transformers' SuppressTokens, whose place after the penalty gives the same scores);
  vocab_limit, keep: ids >= vocab_limit are never chosen either, but those in keep (allowed_ids); the draw
  uses fold_in(key, step). Shared by every decode loop (the Thinker's, the Talker's, the session's duplex)."""
  logits = allowed_ids(logits, vocab_limit, keep)
  if len(suppress):
    logits = logits.at[:, jnp.asarray(tuple(suppress), jnp.int32)].set(-jnp.inf)
  token = choose(process(logits, seen, sampling), jax.random.fold_in(key, step), sampling)
  token = jnp.where(done, pad_token_id, token)
  if sampling.penalises:
    seen = seen.at[jnp.arange(token.shape[0]), token].set(True)
  return token, done | jnp.isin(token, eos), seen


def stream_step(listener: Optional[jax.Array], step: jax.Array, token: jax.Array, done: jax.Array,
                replicated=None) -> None:
  """Hand one step's tokens to the host listener (omni_jax.generate.decode.listening); None: no streaming."""
  if listener is None:
    return
  if replicated is not None:  # the host reads whole arrays: gather a sharded batch first
    token, done = (jax.lax.with_sharding_constraint(x, replicated) for x in (token, done))
  io_callback(_dispatch, None, listener, step, token, done, ordered=False)


def decode_loop(feed: Callable, cache: Any, logits: jax.Array, seen: jax.Array, key: jax.Array, *,
                max_new_tokens: int, sampling: SamplingParams, eos: jax.Array, pad_token_id: int,
                return_logits: bool = False, listener: Optional[jax.Array] = None, replicated=None,
                suppress: Sequence[int] = (), vocab_limit: Optional[int] = None, keep: Sequence[int] = ()) -> _Loop:
  """The jitted decode loop shared by the Thinker's and the Talker's generation (call inside jit).

  feed(cache, token [B], step) -> (cache, next logits [B, V] float32) runs the chosen token through the model;
  logits: the first token's logits; seen, eos, suppress, vocab_limit, keep: as next_token; listener: stream
  each step's tokens through an io_callback (None: no streaming). Returns the final _Loop (tokens, lengths,
  all_logits: the raw logits, before any id is masked).
  """
  b, vocab = logits.shape

  def body(c: _Loop) -> _Loop:
    token, done, seen = next_token(c.logits, c.seen, c.done, key, c.step, sampling=sampling, eos=eos,
                                   pad_token_id=pad_token_id, suppress=suppress, vocab_limit=vocab_limit,
                                   keep=keep)
    lengths = c.lengths + (~c.done).astype(jnp.int32)
    stream_step(listener, c.step, token, done, replicated)
    all_logits = c.all_logits.at[:, c.step].set(c.logits) if return_logits else c.all_logits
    # The last step (or one where every row stopped) needs no forward pass.
    more = (c.step + 1 < max_new_tokens) & ~jnp.all(done)
    cache, next_logits = jax.lax.cond(more, lambda cache: feed(cache, token, c.step), lambda cache: (cache, c.logits),
                                      c.cache)
    return _Loop(c.step + 1, cache, next_logits, seen, c.tokens.at[:, c.step].set(token), lengths, done, all_logits)

  init = _Loop(jnp.zeros((), jnp.int32), cache, logits, seen,
               jnp.full((b, max_new_tokens), pad_token_id, jnp.int32), jnp.zeros((b,), jnp.int32),
               jnp.zeros((b,), bool), jnp.zeros((b, max_new_tokens if return_logits else 0, vocab), jnp.float32))
  return jax.lax.while_loop(lambda c: (c.step < max_new_tokens) & ~jnp.all(c.done), body, init)


def make_generate_fn(graphdef: nnx.GraphDef, ids: config_lib.TokenIds, *, max_new_tokens: int,
                     sampling: SamplingParams, eos_token_ids: Sequence[int], pad_token_id: int,
                     cache_len: int, cache_dtype=None, return_logits: bool = False, stream: bool = False,
                     vocab_limit: Optional[int] = None, mesh: Optional[Mesh] = None, rules=()) -> Callable:
  """The pure function (params, prompt batch, key data, listener id) -> (tokens, lengths, logits).
  vocab_limit: ids at or past it (the embedding table's padding rows) are never chosen, the stop ids aside."""
  eos = jnp.asarray(tuple(eos_token_ids) or (-1,), jnp.int32)
  replicated = None if mesh is None or mesh.size == 1 else NamedSharding(mesh, PartitionSpec())

  def fn(params, batch, key_data, listener):
    model = nnx.merge(graphdef, params)
    thinker = model.thinker
    key = jax.random.wrap_key_data(key_data)
    input_ids, seg = batch["input_ids"], batch["segment_ids"]
    b = input_ids.shape[0]
    rows = jnp.arange(b)
    with sharding.activate(mesh, rules):
      positions, media = step_lib.model_inputs(batch, ids)
      valid = seg > 0
      n_real, deltas = valid.sum(axis=1).astype(jnp.int32), positions_lib.position_deltas(positions, valid)
      cache = sharded_cache(thinker.model, b, cache_len, cache_dtype)
      hidden, cache = thinker.model(thinker.embed_inputs(input_ids, **media), positions, seg, cache)
      last = jnp.max(jnp.where(valid, jnp.arange(input_ids.shape[1]), 0), axis=1)  # each row's last real token
      logits = thinker.logits(hidden[rows, last][:, None])[:, 0].astype(jnp.float32)
      vocab = logits.shape[-1]
      # The prompt's real tokens count for the repetition penalty; padding does not (transformers 5 alike).
      seen = (jnp.zeros((b, vocab), bool).at[rows[:, None], input_ids].max(valid) if sampling.penalises
              else jnp.zeros((b, 0), bool))

      def feed(cache, token, step):  # the chosen token through the stack: the next step's logits
        pos = positions_lib.decode_positions(deltas, n_real + step)
        hidden, cache = thinker.model(thinker.embed(token[:, None]), pos, jnp.ones((b, 1), jnp.int32), cache)
        return cache, thinker.logits(hidden)[:, 0].astype(jnp.float32)

      out = decode_loop(feed, cache, logits, seen, key, max_new_tokens=max_new_tokens, sampling=sampling,
                        eos=eos, pad_token_id=pad_token_id, return_logits=return_logits,
                        listener=listener if stream else None, replicated=replicated, vocab_limit=vocab_limit,
                        keep=tuple(eos_token_ids))
    return out.tokens, out.lengths, out.all_logits

  return fn


class Generator:
  """Compiled generation for one model on one mesh: generate() returns the ids, stream() yields them.

  graphdef/params: the split model (params placed by param_shardings on `mesh`). Programs are compiled per
  prompt shape and decoding settings and kept (pad prompts to a few lengths to bound compilations).
  vocab_limit: ids at or past it are never generated (the tokenizer's size: the LM head's rows past it are
  padding no tokenizer can decode; OmniChat sets it from its tokenizer); None: every row of the head.
  context_limit: the most positions, prompt + reply (omni_jax.generate.limits.context_limit of the config).
  """

  def __init__(self, graphdef: nnx.GraphDef, params: Any, config, mesh: Mesh, param_shardings: Any,
               vocab_limit: Optional[int] = None):
    self.graphdef, self.params, self.config, self.mesh = graphdef, params, config, mesh
    self.param_shardings = param_shardings
    self.rules = tuple(config.sharding_rules)
    self.ids = config_lib.TokenIds.from_config(config.model.thinker)
    self.defaults = dict(config.get("generate", {}))
    self.vocab_limit = None if vocab_limit is None else int(vocab_limit)
    self.context_limit = limits.context_limit(config)
    self._compiled = {}

  def sampling(self, **overrides) -> SamplingParams:
    """config.generate's rule with the given (non-None) overrides."""
    return SamplingParams.from_config(self.defaults, **overrides)

  def new_tokens(self, max_new_tokens: Optional[int] = None) -> int:
    """A reply's token budget: max_new_tokens, else config.generate.max_new_tokens (256); at least 1."""
    n = int(self.defaults.get("max_new_tokens", 256) if max_new_tokens is None else max_new_tokens)
    if n < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {n}")
    return n

  def check_context(self, prompt_tokens: int, max_new_tokens: Optional[int] = None) -> None:
    """ContextLengthError unless a prompt of prompt_tokens and its reply fit the model's positions."""
    limits.check_context(prompt_tokens, self.new_tokens(max_new_tokens), limit=self.context_limit)

  def _program(self, batch, **static):
    key = (tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items())),
           tuple(sorted(static.items())))
    if key not in self._compiled:
      fn = make_generate_fn(self.graphdef, self.ids, mesh=self.mesh, rules=self.rules, **static)
      replicated = NamedSharding(self.mesh, PartitionSpec())
      self._compiled[key] = jax.jit(
          fn, in_shardings=(self.param_shardings, step_lib.batch_shardings(batch, self.mesh, self.rules),
                            replicated, replicated),
          out_shardings=replicated)
    return self._compiled[key]

  def generate(self, batch: Mapping[str, Any], *, max_new_tokens: Optional[int] = None,
               sampling: Optional[SamplingParams] = None, seed: Optional[int] = None,
               eos_token_ids: Optional[Sequence[int]] = None, return_logits: bool = False,
               on_token: Optional[OnToken] = None) -> Output:
    """Generate for a prompt batch (omni_jax.batch fields; segment_ids 0 = padding).

    Defaults come from config.generate (max_new_tokens, the sampling rule, seed, max_cache_len,
    cache_dtype) and config.model.thinker (eos_token_ids, pad_token_id). on_token(step, tokens, stopped) is
    called from the running program after each step (streaming); the loop itself never waits on the host.
    A row whose real tokens and max_new_tokens exceed context_limit raises limits.ContextLengthError first.
    """
    d = self.defaults
    max_new_tokens = self.new_tokens(max_new_tokens)
    sampling = sampling or self.sampling()
    batch = {k: np.asarray(v) for k, v in batch.items()}
    length = batch["input_ids"].shape[1]
    self.check_context(int((batch["segment_ids"] > 0).sum(axis=1).max(initial=0)), max_new_tokens)
    cache_len = length + max_new_tokens
    if d.get("max_cache_len"):
      if int(d["max_cache_len"]) < cache_len:
        raise ValueError(f"config.generate.max_cache_len={d['max_cache_len']} is below prompt length {length} + "
                         f"max_new_tokens {max_new_tokens}")
      cache_len = int(d["max_cache_len"])
    cache_dtype = config_lib.dtype_of(d["cache_dtype"], "generate.cache_dtype") if d.get("cache_dtype") else None
    program = self._program(
        batch, max_new_tokens=max_new_tokens, sampling=sampling, cache_len=cache_len, cache_dtype=cache_dtype,
        eos_token_ids=tuple(int(i) for i in (self.ids.eos_token_ids if eos_token_ids is None else eos_token_ids)),
        pad_token_id=int(self.ids.pad_token_id), return_logits=return_logits, stream=on_token is not None,
        vocab_limit=self.vocab_limit)
    seed = int(d.get("seed", 0) if seed is None else seed)
    key_data = jax.random.key_data(jax.random.key(seed))
    listener = 0
    if on_token is not None:
      listener = next(_NEXT_ID)
      _LISTENERS[listener] = on_token
    try:
      tokens, lengths, logits = program(self.params, batch, key_data, np.int32(listener))
      tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    finally:
      _LISTENERS.pop(listener, None)
    return Output(tokens, lengths, np.asarray(logits) if return_logits else None)

  def stream(self, batch: Mapping[str, Any], **kwargs) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (tokens [B], stopped [B]) per decode step while the program runs (generate() in a thread);
    rows that stopped earlier show pad. Stacked, the yielded tokens are generate()'s tokens."""
    events: queue.Queue = queue.Queue()
    result = {}

    def run():
      try:
        result["output"] = self.generate(batch, on_token=lambda s, t, d: events.put((s, t, d)), **kwargs)
      except BaseException as e:  # re-raised in the consumer's thread
        result["error"] = e
      events.put(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    pending, expected = {}, 0
    while True:
      item = events.get()
      if item is None:
        break
      pending[item[0]] = item[1:]
      while expected in pending:  # steps in order, whatever order the callbacks arrived in
        yield pending.pop(expected)
        expected += 1
    thread.join()
    if "error" in result:
      raise result["error"]

"""The conversation engine: every reply (chat, speak, sessions, the server, evaluation) is "prefill, then reply".

A conversation is a Thinker KV cache (and, for a model that speaks, the Talker's prompt prefix: the rows H + E of
every token the Thinker has seen, in a cache with the same slots), its positions and its history. Input reaches
it through ONE jitted prefill (a chunk of any modality: text, audio, images, video). Replies run in a fixed
batch of slots, MaxText's prefill / insert / generate shape:

  insert    a conversation whose turn is closed takes a free slot: its reply's first token is chosen from the
            prefill's last logits and fed (its hidden state opens the Talker's text track), the Talker's
            speaker and first rows are prefilled, and the row is written into the slot arrays.
  generate  K steps of every slot at once (one jitted loop): per row one Thinker step and, for a spoken reply,
            one Talker step one text token behind (see below). Rows keep their own cache index, positions,
            step counts, limits, sampling settings and keys, so a row decodes exactly as it would alone, and a
            slot whose reply ended idles (masked) until the next insert.
  release   a finished row is copied back into its conversation: the Talker's speech rows are dropped and the
            reply's rows appended as prompt rows (what the next turn's Talker prompt holds).

The host (Engine.step) admits waiting replies into free slots between generate calls, so a request that
arrives while others decode joins the running batch at the next call; a finished row frees its slot at once.

The reply of one row, step by step (the layout of omni_jax.talker.layout, transformers' batched first-eos rule
of omni_jax.talker.inputs.reply_lengths): g_0 is chosen and always fed; the Talker's prefix gets its speaker
row (speaker bos + codec pad) and reply_0 row (H(g_0) + E(g_0) + codec bos). Then step j: Thinker step j + 1
(choose g_{j+1}; feed it unless it is the reply's last: its text row H + E), then Talker step j (choose c_j,
feed c_j with text row j + 1). Text row k is H(g_k) + E(g_k) up to the row before the reply's last, then the
bare tts-eos embedding, then tts-pad; a reply of one token keeps H(g_0) + E(g_0) with tts-eos after it.
"""

import dataclasses
import functools
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni_jax import config as config_lib
from omni_jax import sharding, xla_options
from omni_jax.generate import limits
from omni_jax.generate.sampling import RowSampling, SamplingParams, next_tokens
from omni_jax.layers.attention import KVCache
from omni_jax.models.talker import TalkerConfig, talker_config, zero_media_rows
from omni_jax.thinker.inputs import model_inputs

MAX_STOP_IDS = 4  # Talker stop codes per reply (codec pad and end by default; () for benchmarks)
WINDOW_LEAST = 256  # the fewest cache slots a generate call reads (see Engine.cache_windows)


# ---------------------------------------------------------------------------------------------------- state


class Conversation:
  """One conversation between replies: batch-1 caches on device, positions and history on the host.

  cache / talker_cache: the Thinker's cache and the Talker's prompt prefix ([1, max_len] slots; None: the
  engine does not keep a Talker prefix). logits [1, V]: the next token's logits after the last prefill.
  offset: where the next prefilled chunk's positions start; top: the largest position so far (a reply starts
  at top + 1). slots: cache slots used (chunk padding included). history: every real token in the cache.
  """

  def __init__(self, cache: KVCache, talker_cache: Optional[KVCache]):
    self.cache, self.talker_cache = cache, talker_cache
    self.logits: Optional[jax.Array] = None
    self.offset = jnp.zeros((), jnp.int32)
    self.top = jnp.full((), -1, jnp.int32)
    self.slots = 0
    self.history: list[int] = []
    self.in_reply = False  # its caches are in a slot (or lost, see Engine.close)

  @property
  def num_tokens(self) -> int:
    return len(self.history)


@dataclasses.dataclass(frozen=True)
class ReplySettings:
  """One reply's decoding: its budget, sampling and seed; speak: the Talker speaks it (speaker: its token id;
  codes: the code budget; talker_sampling / talker_seed; stop: codes that end it, () runs to the budget)."""
  max_new_tokens: int
  sampling: SamplingParams = SamplingParams()
  seed: int = 0
  speak: bool = False
  speaker: int = 0
  max_codes: int = 0
  talker_sampling: SamplingParams = SamplingParams()
  talker_seed: int = 0
  stop: tuple = ()


class Slots(NamedTuple):
  """The engine's batch: one row per slot ([B] leading every field, the caches' rows on axis 1 of k / v)."""
  cache: KVCache  # index [B]
  logits: jax.Array  # [B, V] float32: the next token's logits
  seen: jax.Array  # [B, V] bool: ids the repetition penalty sees
  start: jax.Array  # [B] the position of the reply's first token
  first: jax.Array  # [B] the cache slot of the reply's first token
  t: jax.Array  # [B] tokens chosen so far
  limit: jax.Array  # [B] max_new_tokens
  done: jax.Array  # [B] no more text (a free slot is done)
  key: jax.Array  # [B, 2] key data
  sampling: RowSampling
  talker: Optional[dict]  # the Talker's fields (engine with speech), see _talker_row


def _set_row(batch, row, b):
  """Write a batch-1 pytree `row` into row b of `batch` (caches' k / v have their rows on axis 1)."""

  def put(x, r):
    axis = 1 if x.ndim == 5 else 0  # [layers, B, heads, slots, dim] caches; everything else [B, ...]
    return jax.lax.dynamic_update_slice_in_dim(x, r.astype(x.dtype), b, axis)

  return jax.tree_util.tree_map(put, batch, row)


def _window(cache: KVCache, slots: int) -> KVCache:
  """The cache's first `slots` slots: what a generate call reads and writes when no row goes past them."""
  if slots >= cache.max_len:
    return cache
  return cache.map_kv(lambda x: x[:, :, :, :slots])._replace(valid=cache.valid[:, :slots])


def _unwindow(cache: KVCache, window: KVCache) -> KVCache:
  """`cache` with its first slots (and index) from `window` (in place: the call donated the cache)."""
  if window.max_len >= cache.max_len:
    return window
  n = window.max_len
  put = lambda x, w: x.at[:, :, :, :n].set(w)  # noqa: E731
  return KVCache(jax.tree.map(put, cache.k, window.k), jax.tree.map(put, cache.v, window.v),
                 cache.valid.at[:, :n].set(window.valid), window.index)


def _get_row(batch, b):
  def take(x):
    axis = 1 if x.ndim == 5 else 0
    return jax.lax.dynamic_slice_in_dim(x, b, 1, axis)

  return jax.tree_util.tree_map(take, batch)


# ---------------------------------------------------------------------------------------------------- programs


def talker_rows(model, input_ids: jax.Array, embeds: jax.Array, hidden: jax.Array) -> jax.Array:
  """The Talker's prompt rows of tokens the Thinker prefilled: H + E, E zeroed at media placeholders, float32
  [B, L, D]; the same sum omni_jax.talker.objective.talker_inputs builds for training."""
  ids = model.thinker.ids
  media = (ids.audio_token_id, ids.image_token_id, ids.video_token_id)
  return hidden.astype(jnp.float32) + zero_media_rows(embeds.astype(jnp.float32), input_ids, media)


def talker_prefill(model, rows: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: KVCache) -> KVCache:
  """Append prompt rows [B, L, D] (talker_rows) to the Talker's cache; no codec logits are needed for them."""
  talker = model.talker
  x = talker.thinker_to_talker_proj(rows.astype(talker.model.rt.dtype))
  return talker.model(x, positions, segment_ids, cache)[1]


class _Programs:
  """The engine's jitted programs for one model, mesh and slot shape (built once, shared by its callers)."""

  def __init__(self, graphdef: nnx.GraphDef, ids: config_lib.TokenIds, talker_cfg: Optional[TalkerConfig], *,
               queue_len: int, vocab_limit: Optional[int], code_limit: Optional[int], mesh, rules):
    self.graphdef, self.ids, self.cfg = graphdef, ids, talker_cfg
    self.queue_len, self.mesh, self.rules = int(queue_len), mesh, tuple(rules)
    self.eos = tuple(int(i) for i in ids.eos_token_ids)
    self.vocab_limit, self.code_limit = vocab_limit, code_limit
    device = next(iter(mesh.devices.flat)) if mesh is not None else jax.devices()[0]
    jit = functools.partial(jax.jit, compiler_options=xla_options.for_program("decode", device.platform))
    self.prefill = jit(self._prefill, donate_argnums=(1, 2))
    self.insert = jit(self._insert, donate_argnums=(1,))
    self.generate = jit(self._generate, static_argnums=(2, 3, 4), donate_argnums=(1,))
    self.release = jit(self._release)

  # -- helpers inside jit

  @staticmethod
  def _allowed(vocab: int, limit: Optional[int], keep: jax.Array) -> Optional[jax.Array]:
    """[B or 1, V] bool: ids below `limit` (past it: the tables' padding rows) and those in `keep` [B or 1, K];
    None when every id is allowed. Built once per program, outside the decode loop."""
    if limit is None or limit >= vocab:
      return None
    ids = jnp.arange(vocab)
    return (ids < limit)[None] | jnp.any(ids[None, None] == keep[:, :, None], axis=1)

  def _choose(self, logits, seen, sampling, key, step, active, pad, *, allowed=None, suppress=()):
    """One choice per active row, `pad` on the others: (token [B], seen after it). allowed: _allowed's mask."""
    if allowed is not None:
      logits = jnp.where(allowed, logits, -jnp.inf)
    if suppress:
      logits = logits.at[:, jnp.asarray(suppress, jnp.int32)].set(-jnp.inf)
    keys = jax.vmap(lambda k, s: jax.random.fold_in(jax.random.wrap_key_data(k), s))(key, step)
    token = jnp.where(active, next_tokens(logits, seen, keys, sampling), pad)
    return token, seen.at[jnp.arange(token.shape[0]), token].max(active)

  def _thinker_feed(self, thinker, token, pos, fed, cache):
    """Tokens [B] through the Thinker at positions pos [B] (rows not fed write no valid slot): (cache, next
    logits [B, V], their text rows H + E [B, D])."""
    b = token.shape[0]
    e = thinker.embed(token[:, None])
    hidden, cache = thinker.model(e, jnp.broadcast_to(pos[None, :, None], (3, b, 1)), fed[:, None].astype(jnp.int32),
                                  cache)
    logits = thinker.logits(hidden)[:, 0].astype(jnp.float32)
    return cache, logits, hidden[:, 0].astype(jnp.float32) + e[:, 0].astype(jnp.float32)

  def _bare(self, thinker, token_id, b):
    row = thinker.embed(jnp.asarray([token_id], jnp.int32)).astype(jnp.float32)
    return jnp.broadcast_to(row, (b, row.shape[-1]))

  # -- prefill: a chunk of any modality into a conversation's caches

  def _prefill(self, params, cache, talker_cache, batch, offset, last, top):
    """(cache, talker cache, logits [1, V] of token `last`, next offset, top). positions: the chunk's own
    TMRoPE ids + offset (where the previous chunk's last token left off); top: the largest position so far."""
    model = nnx.merge(self.graphdef, params)
    thinker = model.thinker
    with sharding.activate(self.mesh, self.rules):
      positions, media = model_inputs(batch, self.ids)
      positions = positions + offset
      valid = batch["segment_ids"] > 0
      embeds = thinker.embed_inputs(batch["input_ids"], **media)
      hidden, cache = thinker.model(embeds, positions, batch["segment_ids"], cache)
      logits = thinker.logits(hidden[:, last][:, None])[:, 0].astype(jnp.float32)
      top = jnp.maximum(top, jnp.where(valid[None], positions, -1).max())
      if talker_cache is not None:
        rows = talker_rows(model, batch["input_ids"], embeds, hidden)
        talker_cache = talker_prefill(model, rows, positions, batch["segment_ids"], talker_cache)
    return cache, talker_cache, logits, positions[0, 0, last] + 1, top

  # -- insert: the reply's first step for one conversation, written into slot b

  def _insert(self, params, slots: Slots, b, cache, talker_cache, logits, seen, start, limit, key, sampling,
              talker_args):
    model = nnx.merge(self.graphdef, params)
    thinker = model.thinker
    with sharding.activate(self.mesh, self.rules):
      eos = jnp.asarray(self.eos or (-1,), jnp.int32)
      allowed = self._allowed(logits.shape[-1], self.vocab_limit, eos[None])
      token, seen = self._choose(logits, seen, sampling, key, jnp.zeros((1,), jnp.int32), jnp.ones((1,), bool),
                                 self.ids.pad_token_id, allowed=allowed)
      done = jnp.isin(token, eos) | (limit <= 1)
      first = cache.index
      # g_0 is always fed (its hidden state opens the Talker's text track); a reply of one token leaves its slot
      # invalid at release, so the cache holds what the reply owes.
      cache = cache._replace(index=cache.index[None])  # the slot layout: an index per row
      cache, next_logits, row0 = self._thinker_feed(thinker, token, start, jnp.ones((1,), bool), cache)
      row = Slots(cache, next_logits, seen, start, first[None], jnp.ones((1,), jnp.int32), limit, done, key,
                  sampling, None)
      if self.cfg is not None:
        row = row._replace(talker=self._talker_row(model, talker_cache, row0, start, done | (limit <= 1),
                                                   first, **talker_args))
      slots = _set_row(slots, row, b)
    return slots, token

  def _talker_row(self, model, talker_cache, row0, start, final0, first, *, speak, speaker, max_codes, key,
                  sampling, stop):
    """The Talker's fields of one row after its reply's first step (speak [1]: the Talker speaks it)."""
    cfg, thinker, n = self.cfg, model.thinker, self.queue_len
    tts_eos = self._bare(thinker, cfg.tts_text_end_token_id, 1)
    tts_pad = self._bare(thinker, cfg.tts_text_pad_token_id, 1)
    queue = jnp.broadcast_to(tts_pad[:, None], (1, n + 1, tts_pad.shape[-1]))
    queue = queue.at[:, 0].set(row0).at[:, 1].set(jnp.where(final0[:, None], tts_eos, tts_pad))
    tk = model.talker
    codec = lambda i: tk.codec_embed(jnp.full((1,), i, jnp.int32)).astype(jnp.float32)
    speaker_row = thinker.embed(speaker).astype(jnp.float32) + codec(cfg.tts_codec_pad_token_id)
    x = jnp.stack([speaker_row, row0 + codec(cfg.tts_codec_start_token_id)], axis=1)
    pos = jnp.broadcast_to((start[:, None] + jnp.arange(2))[None], (3, 1, 2))
    k_cache = talker_cache._replace(index=talker_cache.index[None])
    # Rows that do not speak write nothing: their prefix takes the reply's rows at release only.
    k_logits, k_cache = tk(x.astype(tk.model.rt.dtype), pos, jnp.broadcast_to(speak[:, None], (1, 2)).astype(jnp.int32),
                           k_cache)
    vocab = k_logits.shape[-1]
    # The ids transformers' repetition penalty sees in the Talker's input: the prompt's mask id, pad, bos.
    k_seen = jnp.zeros((1, vocab), bool).at[:, jnp.asarray([cfg.tts_codec_mask_token_id, cfg.tts_codec_pad_token_id,
                                                             cfg.tts_codec_start_token_id])].set(True)
    return dict(cache=k_cache, logits=k_logits[:, -1].astype(jnp.float32), seen=k_seen, queue=queue,
                s=jnp.zeros((1,), jnp.int32), limit=max_codes, done=~speak, key=key, sampling=sampling, stop=stop,
                first=first[None])

  # -- generate: K steps of every slot

  def _generate(self, params, slots: Slots, steps: int, window: int, talker_window: int):
    """`steps` steps of every slot; the loop reads and writes the caches' first `window` (the Talker's:
    `talker_window`) slots only, which hold every row's slots up to the call's last step (a decode step reads
    all the slots it is given: a short conversation in a long cache would read the whole cache each step)."""
    model = nnx.merge(self.graphdef, params)
    thinker = model.thinker
    b = slots.t.shape[0]
    rows = jnp.arange(b)
    full = slots
    with sharding.activate(self.mesh, self.rules):
      slots = slots._replace(cache=_window(slots.cache, window))
      if slots.talker is not None:
        slots = slots._replace(talker=dict(slots.talker, cache=_window(slots.talker["cache"], talker_window)))
      eos = jnp.asarray(self.eos or (-1,), jnp.int32)
      allowed = self._allowed(slots.logits.shape[-1], self.vocab_limit, eos[None])
      speech = slots.talker is not None
      if speech:
        cfg, tk = self.cfg, model.talker
        tts_eos = self._bare(thinker, cfg.tts_text_end_token_id, b)
        n = self.queue_len

      def think(s: Slots, out, i):
        thinking = ~s.done
        token, seen = self._choose(s.logits, s.seen, s.sampling, s.key, s.t, thinking, self.ids.pad_token_id,
                                   allowed=allowed)
        done = s.done | (thinking & (jnp.isin(token, eos) | (s.t + 1 >= s.limit)))
        fed = thinking & ~done
        cache, logits, row = self._thinker_feed(thinker, token, s.start + s.t, fed, s.cache)
        # Rows not fed stopped: their logits are never read again.
        new = s._replace(cache=cache, logits=logits, seen=seen, t=s.t + thinking.astype(jnp.int32), done=done)
        if speech:
          k = s.talker
          slot = jnp.minimum(s.t, n)
          text_row = jnp.where((done & thinking)[:, None], tts_eos, row)
          old = k["queue"][rows, slot]
          queue = k["queue"].at[rows, slot].set(jnp.where(thinking[:, None], text_row, old))
          new = new._replace(talker=dict(k, queue=queue))
        out = dict(out, tokens=out["tokens"].at[:, i].set(token), token_valid=out["token_valid"].at[:, i].set(thinking))
        return new, out

      def speak(s: Slots, out, i):
        k = s.talker
        speaking = ~k["done"]
        code, k_seen = self._choose(k["logits"], k["seen"], k["sampling"], k["key"], k["s"], speaking,
                                    cfg.tts_codec_pad_token_id,
                                    allowed=self._allowed(k["logits"].shape[-1], self.code_limit, k["stop"]),
                                    suppress=(cfg.tts_codec_start_token_id,))
        stopped = jnp.any(code[:, None] == k["stop"], axis=1)
        done = k["done"] | (speaking & (stopped | (k["s"] + 1 >= k["limit"])))
        fed = speaking & ~done
        # c_s in, with text row s + 1 (the last row repeats past the queue).
        x = k["queue"][rows, jnp.minimum(k["s"] + 1, n)] + tk.codec_embed(code).astype(jnp.float32)
        pos = jnp.broadcast_to((s.start + 2 + k["s"])[None, :, None], (3, b, 1))
        k_logits, k_cache = tk(x[:, None].astype(tk.model.rt.dtype), pos, fed[:, None].astype(jnp.int32), k["cache"])
        k = dict(k, cache=k_cache, logits=jnp.where(fed[:, None], k_logits[:, 0].astype(jnp.float32), k["logits"]),
                 seen=k_seen, s=k["s"] + speaking.astype(jnp.int32), done=done)
        out = dict(out, codes=out["codes"].at[:, i].set(code), code_valid=out["code_valid"].at[:, i].set(speaking))
        return s._replace(talker=k), out

      def active(s: Slots):
        a = ~s.done
        return a | ~s.talker["done"] if speech else a

      def body(carry):
        i, s, out = carry
        if speech:  # the Talker often speaks on after the text ended: skip the idle tower's step
          s, out = jax.lax.cond(jnp.any(~s.done), think, lambda s, out, i: (s, out), s, out, i)
          s, out = jax.lax.cond(jnp.any(~s.talker["done"]), speak, lambda s, out, i: (s, out), s, out, i)
        else:  # the loop runs only while some row thinks
          s, out = think(s, out, i)
        return i + 1, s, out

      out = dict(tokens=jnp.full((b, steps), self.ids.pad_token_id, jnp.int32),
                 token_valid=jnp.zeros((b, steps), bool), codes=jnp.zeros((b, steps), jnp.int32),
                 code_valid=jnp.zeros((b, steps), bool))
      _, slots, out = jax.lax.while_loop(lambda c: (c[0] < steps) & jnp.any(active(c[1])), body,
                                         (jnp.int32(0), slots, out))
      codes_done = slots.talker["done"] if speech else jnp.ones((b,), bool)
      slots = slots._replace(cache=_unwindow(full.cache, slots.cache))
      if speech:
        slots = slots._replace(talker=dict(slots.talker, cache=_unwindow(full.talker["cache"], slots.talker["cache"])))
    return slots, out, slots.done, codes_done

  # -- release: slot b back into its conversation

  def _release(self, params, slots: Slots, b):
    """(cache, talker cache) of the conversation in slot b after its reply: the Thinker's slots of every token
    fed but the last (a reply of one token leaves its one slot invalid); the Talker's speech rows dropped and
    the reply's fed tokens g_0 .. g_{len-2} appended as prompt rows at their positions."""
    model = nnx.merge(self.graphdef, params)
    row = _get_row(slots, b)
    length, first, start = row.t[0], row.first[0], row.start[0]
    cache = row.cache
    # The reply holds slots [first, first + length - 1): a cancelled reply cut back to what was said (t
    # lowered by Engine.cancel) leaves the slots of the tokens after it invalid, to be written again.
    end = first + length - 1
    slot = jnp.arange(cache.max_len)
    valid = cache.valid & ~((slot >= jnp.maximum(end, first))[None] & (slot >= first)[None])
    cache = cache._replace(valid=valid, index=jnp.where(length > 1, jnp.minimum(end, cache.index[0]),
                                                        cache.index[0]))
    if row.talker is None:
      return cache, None
    with sharding.activate(self.mesh, self.rules):
      k_cache = row.talker["cache"]
      positions = jnp.arange(k_cache.max_len)
      n = self.queue_len
      k_cache = k_cache._replace(valid=k_cache.valid & (positions < first)[None], index=first[None])
      reply_rows = jnp.arange(n)
      pos = jnp.broadcast_to((start + reply_rows)[None, None], (3, 1, n))
      seg = (reply_rows < length - 1)[None].astype(jnp.int32)
      k_cache = talker_prefill(model, row.talker["queue"][:, :n], pos, seg, k_cache)
    return cache, k_cache._replace(index=cache.index)


def bucket(n: int, least: int) -> int:
  """n rounded up to a power of two (at least `least`): engine shapes (slots, cache and reply lengths) shared by
  similar requests, so few programs are compiled."""
  n = max(int(n), int(least), 1)
  return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=32)
def _programs(graphdef, ids, talker_cfg, **kw) -> _Programs:
  """One set of compiled programs per model and shapes, shared by every engine of them (jit traces again only
  for a new slot count)."""
  return _Programs(graphdef, ids, talker_cfg, **kw)


# ---------------------------------------------------------------------------------------------------- host side


@dataclasses.dataclass
class Reply:
  """A reply being decoded: its conversation, settings, slot, and what it produced so far."""
  conversation: Conversation
  settings: ReplySettings
  keep: bool = True  # release the caches into the conversation at the end (sessions); False: drop them
  slot: Optional[int] = None
  tokens: list = dataclasses.field(default_factory=list)
  codes: list = dataclasses.field(default_factory=list)
  text_done: bool = False
  codes_done: bool = False
  error: Optional[BaseException] = None
  submitted: bool = False

  @property
  def finished(self) -> bool:
    return self.text_done and self.codes_done


class Engine:
  """Continuous batching of conversations' replies over `num_slots` slots (see the module doc).

  Not thread-safe: one thread drives it (an in-process caller through run(), the server's worker through
  admit() / step()). Conversations come from conversation(); prefill() appends input to them; a reply is
  submitted with submit() and decoded by step() calls, each of `steps_per_call` steps for all slots.
  """

  def __init__(self, graphdef: nnx.GraphDef, params: Any, config, mesh, *, num_slots: int = 1,
               max_len: int = 4096, max_new_tokens: int = 256, speech: bool = False, max_codes: int = 0,
               vocab_limit: Optional[int] = None, steps_per_call: int = 8, cache_dtype=None,
               ids: Optional[config_lib.TokenIds] = None):
    """max_len: cache slots per conversation (prompt and replies); max_new_tokens: the longest reply any
    request may ask for (the Talker's text queue); speech: keep the Talker's prompt prefix (a model with a
    Talker), max_codes: the longest spoken reply in codes (the Talker's cache has max_len + 2 + max_codes).
    ids: the special token ids (default: the config's; the eos ids end a reply)."""
    self.graphdef, self.params, self.config, self.mesh = graphdef, params, config, mesh
    self.rules = tuple(config.sharding_rules)
    self.ids = ids or config_lib.TokenIds.from_config(config.model.thinker)
    self.num_slots, self.max_len, self.max_new_tokens = int(num_slots), int(max_len), int(max_new_tokens)
    self.speech, self.max_codes = bool(speech), int(max_codes) if speech else 0
    self.steps_per_call = int(steps_per_call)
    self.cache_dtype = cache_dtype
    self.talker_cfg = talker_config(config) if self.speech else None
    self.programs = _programs(graphdef, self.ids, self.talker_cfg, queue_len=self.max_new_tokens,
                              vocab_limit=vocab_limit, mesh=mesh, rules=self.rules,
                              code_limit=limits.talker_code_limit(config) if self.speech else None)
    self._empty = jax.jit(self._empty_caches, static_argnums=(0,))
    self._slots: Optional[Slots] = None
    self.replies: list[Optional[Reply]] = [None] * self.num_slots
    self.waiting: list[Reply] = []

  @property
  def talker_len(self) -> int:
    """Slots of the Talker's cache: the conversation's, its reply's speaker and first rows, its codes."""
    return self.max_len + 2 + self.max_codes

  # -- conversations

  def _decoders(self):
    model = nnx.merge(self.graphdef, self.params)  # its sizes only: no parameter enters the programs
    return model.thinker.model, (model.talker.model if self.speech else None)

  def _empty_caches(self, rows: int):
    thinker, talker = self._decoders()
    with sharding.activate(self.mesh, self.rules):
      cache = _sharded_cache(thinker, rows, self.max_len, self.cache_dtype)
      talker_cache = (_sharded_cache(talker, rows, self.talker_len, self.cache_dtype)
                      if talker is not None else None)
    return cache, talker_cache

  def conversation(self) -> Conversation:
    return Conversation(*self._empty(1))

  def prefill(self, conv: Conversation, batch: dict, ids: Sequence[int]) -> None:
    """Append a prompt chunk (omni_jax.generate.prompts.prompt_batch of one row: its real tokens `ids`, media;
    padding slots stay invalid in the cache) to the conversation: one call of the jitted prefill."""
    if conv.in_reply:
      raise RuntimeError("prefill while the conversation's reply is being decoded")
    length = batch["input_ids"].shape[1]
    conv.cache, conv.talker_cache, conv.logits, conv.offset, conv.top = self.programs.prefill(
        self.params, conv.cache, conv.talker_cache, batch, conv.offset, np.int32(length - 1), conv.top)
    conv.slots += length
    conv.history.extend(int(i) for i in ids)

  # -- replies

  def submit(self, reply: Reply) -> Reply:
    """Queue a reply of a conversation whose turn is closed (prefilled up to the assistant header)."""
    conv, s = reply.conversation, reply.settings
    if conv.logits is None:
      raise ValueError("submit: the conversation has nothing prefilled")
    if not 1 <= s.max_new_tokens <= self.max_new_tokens:
      raise ValueError(f"max_new_tokens must be in [1, {self.max_new_tokens}], got {s.max_new_tokens}")
    if conv.slots + s.max_new_tokens > self.max_len:
      raise limits.ContextLengthError(conv.num_tokens, s.max_new_tokens, self.max_len,
                                      hint=f"{conv.slots} cache slots used (chunk padding included) + "
                                           f"max_new_tokens exceed the engine's max_len={self.max_len}")
    if s.speak and not self.speech:
      raise ValueError("a spoken reply on an engine without the Talker (speech=False)")
    if s.speak and not 1 <= s.max_codes <= self.max_codes:
      raise ValueError(f"talker max_new_tokens must be in [1, {self.max_codes}], got {s.max_codes}")
    if reply.submitted:
      raise ValueError("submit: the reply is already submitted")
    reply.codes_done, reply.submitted = not s.speak, True
    self.waiting.append(reply)
    return reply

  def admit(self) -> list[tuple[Reply, int]]:
    """Insert waiting replies into free slots; returns (reply, its first token) for each inserted."""
    started = []
    while self.waiting and None in self.replies:
      reply = self.waiting.pop(0)
      b = self.replies.index(None)
      try:
        token = self._insert(reply, b)
      except BaseException as e:  # noqa: BLE001 - the reply fails, the engine goes on
        reply.error, reply.text_done, reply.codes_done = e, True, True
        started.append((reply, None))
        continue
      self.replies[b] = reply
      reply.slot = b
      started.append((reply, token))
    return started

  def _insert(self, reply: Reply, b: int) -> int:
    conv, s = reply.conversation, reply.settings
    if self._slots is None:
      self._slots = self._fresh_slots(conv)
    vocab = conv.logits.shape[-1]
    seen = np.zeros((1, vocab), bool)
    if s.sampling.penalises:
      seen[0, np.asarray(conv.history, np.int64)] = True
    start = np.asarray([int(conv.top) + 1], np.int32)
    key = np.asarray(jax.random.key_data(jax.random.key(s.seed)))[None]
    sampling = RowSampling(*(np.asarray(v)[None] for v in RowSampling.of(s.sampling)))
    talker_args = {}
    if self.speech:
      stop = np.full((1, MAX_STOP_IDS), -1, np.int32)
      stop[0, :len(s.stop)] = s.stop
      talker_args = dict(speak=np.asarray([s.speak]), speaker=np.asarray([s.speaker], np.int32),
                         max_codes=np.asarray([max(s.max_codes, 1)], np.int32),
                         key=np.asarray(jax.random.key_data(jax.random.key(s.talker_seed)))[None],
                         sampling=RowSampling(*(np.asarray(v)[None] for v in RowSampling.of(s.talker_sampling))),
                         stop=stop)
    conv.in_reply = True
    self._slots, token = _canonical(self.programs.insert(
        self.params, self._slots, np.int32(b), conv.cache, conv.talker_cache, conv.logits, seen, start,
        np.asarray([s.max_new_tokens], np.int32), key, sampling, talker_args))
    conv.cache = conv.talker_cache = None  # in the slot now
    token = int(np.asarray(token)[0])
    reply.tokens.append(token)
    reply.text_done = token in self.programs.eos or s.max_new_tokens == 1
    return token

  def _fresh_slots(self, conv: Conversation) -> Slots:
    """Empty slots shaped like the conversation's arrays (every row done: idle), placed on the mesh as the
    programs' outputs are (so the first insert compiles the program every later one uses)."""
    return _canonical(jax.jit(self._idle_slots, static_argnums=(0, 1))(self.num_slots, conv.logits.shape[-1]),
                      self.mesh)

  def _idle_slots(self, b: int, vocab: int) -> Slots:
    cache, talker_cache = self._empty_caches(b)
    cache = cache._replace(index=jnp.zeros((b,), jnp.int32))
    zeros = lambda dtype: jnp.zeros((b,), dtype)  # noqa: E731
    key = jnp.zeros((b, 2), jnp.uint32)
    slots = Slots(cache, jnp.zeros((b, vocab), jnp.float32), jnp.zeros((b, vocab), bool), zeros(jnp.int32),
                  zeros(jnp.int32), zeros(jnp.int32), zeros(jnp.int32), jnp.ones((b,), bool), key,
                  RowSampling(*(jnp.asarray(x) for x in RowSampling.empty(b))), None)
    if self.speech:
      slots = slots._replace(talker=self._idle_talker(b, talker_cache))
    return slots

  def _idle_talker(self, b: int, talker_cache: KVCache) -> dict:
    """The Talker's fields of `b` idle rows (_Programs._talker_row's shapes)."""
    talker_cache = talker_cache._replace(index=jnp.zeros((b,), jnp.int32))
    width = self.config.model.thinker.text.hidden_size  # the text rows H + E live in the Thinker's width
    vocab = self.talker_cfg.text.vocab_size
    return dict(cache=talker_cache, logits=jnp.zeros((b, vocab), jnp.float32), seen=jnp.zeros((b, vocab), bool),
                queue=jnp.zeros((b, self.max_new_tokens + 1, width), jnp.float32), s=jnp.zeros((b,), jnp.int32),
                limit=jnp.ones((b,), jnp.int32), done=jnp.ones((b,), bool), key=jnp.zeros((b, 2), jnp.uint32),
                sampling=RowSampling(*(jnp.asarray(x) for x in RowSampling.empty(b))),
                stop=jnp.full((b, MAX_STOP_IDS), -1, jnp.int32), first=jnp.zeros((b,), jnp.int32))

  def step(self) -> list[tuple[Reply, str, int]]:
    """One generate call (steps_per_call steps of every slot); returns (reply, "token" | "code", id) in step
    order, and releases the rows that finished (their slots are free at once)."""
    if not any(r is not None for r in self.replies):
      return []
    try:
      self._slots, out, done, codes_done = _canonical(self.programs.generate(self.params, self._slots,
                                                                             self.steps_per_call,
                                                                             *self.cache_windows()))
      out = jax.device_get(out)
    except BaseException as e:
      self._fail_all(e)
      raise
    done, codes_done = np.asarray(done), np.asarray(codes_done)
    events = []
    for i in range(self.steps_per_call):
      for b, reply in enumerate(self.replies):
        if reply is None:
          continue
        if out["token_valid"][b, i]:
          reply.tokens.append(int(out["tokens"][b, i]))
          events.append((reply, "token", int(out["tokens"][b, i])))
        if out["code_valid"][b, i]:
          reply.codes.append(int(out["codes"][b, i]))
          events.append((reply, "code", int(out["codes"][b, i])))
    for b, reply in enumerate(self.replies):
      if reply is None:
        continue
      reply.text_done = bool(done[b])
      reply.codes_done = bool(codes_done[b]) or not reply.settings.speak
      if reply.finished:
        self._finish(reply, b)
    return events

  def cache_windows(self) -> tuple[int, int]:
    """The cache slots the next generate call reads, of the Thinker and of the Talker: the most any reply in a
    slot may hold by the call's end (its conversation's slots, one per text token or code so far and per
    step; the Talker's prefix also has its speaker and first rows), a power of two (at least WINDOW_LEAST, at
    most the cache's slots), so that a few programs serve every length."""
    used = [(r.conversation.slots + len(r.tokens), r.conversation.slots + 2 + len(r.codes))
            for r in self.replies if r is not None]
    thinker, talker = (max(u) + self.steps_per_call for u in zip(*used)) if used else (0, 0)
    return (min(bucket(thinker, WINDOW_LEAST), self.max_len),
            min(bucket(talker, WINDOW_LEAST), self.talker_len))

  def _finish(self, reply: Reply, b: int) -> None:
    conv = reply.conversation
    if reply.keep:
      cache, talker_cache = self.programs.release(self.params, self._slots, np.int32(b))
      n = len(reply.tokens)
      conv.cache, conv.talker_cache = cache, talker_cache
      conv.history.extend(reply.tokens[:n - 1])
      conv.top = conv.top + (n - 1)
      conv.offset = conv.top + 1
      conv.slots = int(cache.index)
    conv.in_reply = False
    self.replies[b] = None

  def _fail_all(self, error: BaseException) -> None:
    """A failed call took the slots (donated) with it: every reply in them fails, their conversations lose
    their caches, and the next insert starts from fresh slots."""
    for b, reply in enumerate(self.replies):
      if reply is not None:
        reply.error, reply.text_done, reply.codes_done = error, True, True
        reply.conversation.in_reply = False
        self.replies[b] = None
    self._slots = None

  def cancel(self, reply: Reply, keep_tokens: Optional[int] = None) -> None:
    """Stop a reply now: its slot is freed (its row idles) and, with keep, the conversation keeps what was
    decoded so far, or its first keep_tokens tokens (at least one: the reply's first token is in the cache),
    the part a listener heard before interrupting it."""
    if reply in self.waiting:
      self.waiting.remove(reply)
      reply.text_done = reply.codes_done = True
      return
    if reply.slot is not None and self.replies[reply.slot] is reply:
      b = reply.slot
      if keep_tokens is not None and max(1, int(keep_tokens)) < len(reply.tokens):
        n = max(1, int(keep_tokens))
        del reply.tokens[n:]
        self._slots = self._slots._replace(t=self._slots.t.at[b].set(n))
      self._slots = self._slots._replace(done=self._slots.done.at[b].set(True))
      if self._slots.talker is not None:
        self._slots = self._slots._replace(talker=dict(self._slots.talker,
                                                       done=self._slots.talker["done"].at[b].set(True)))
      reply.text_done = reply.codes_done = True
      self._finish(reply, b)

  def run(self, replies: Sequence[Reply]) -> Iterator[tuple[Reply, str, int]]:
    """Submit `replies` (those not submitted yet) and drive the engine until they finish: (reply, "token" |
    "code", id) as decoded, also of other replies in the slots (a caller that did not submit them ignores
    those)."""
    for r in replies:
      if not r.submitted:
        self.submit(r)
    pending = set(map(id, replies))
    while pending:
      for reply, token in self.admit():
        if reply.error is not None:
          raise reply.error
        yield reply, "token", token
      for event in self.step():
        yield event
      pending = {id(r) for r in replies if not r.finished}


def _canonical(outputs, mesh=None):
  """Outputs with replicated shardings written one way: a replicated output comes as P() from one program,
  P(None, None) from another, and (from a program with no sharded output, on a one-device mesh) as a single
  device's; the next call's cache of compiled programs takes them for different inputs (an engine's second
  reply compiled its insert again). All become NamedSharding(mesh, P())."""
  replicated = jax.sharding.PartitionSpec()

  def one(x):
    sharding = getattr(x, "sharding", None)
    if (isinstance(sharding, jax.sharding.NamedSharding) and sharding.spec != replicated
        and all(p is None for p in sharding.spec)):
      return jax.device_put(x, jax.sharding.NamedSharding(sharding.mesh, replicated))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding) and mesh is not None and mesh.size == 1:
      return jax.device_put(x, jax.sharding.NamedSharding(mesh, replicated))
    return x

  return jax.tree_util.tree_map(one, outputs)


def _sharded_cache(decoder, batch: int, length: int, dtype=None) -> KVCache:
  """An empty KV cache of a decoder stack, laid out by the rule table (rows over data/fsdp, kv heads over tensor)."""
  return decoder.init_cache(batch, length, dtype).map_kv()

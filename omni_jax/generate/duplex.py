"""The Thinker and the Talker decoding in one jitted loop: speech codes start while the reply is being written.

A conversation's state is two KV caches with the same slots: the Thinker's, and the Talker's prompt prefix (the
Talker rows H + E of every token the Thinker has seen, prefilled as the input arrived; spec §7.2). One reply:

  step 0     choose g_0 from the first logits; feed it (always: its hidden state is the Talker's first text row)
  prefill    the Talker's speaker row (speaker bos + codec pad) and reply_0 row (H(g_0) + E(g_0) + codec bos)
  loop j     Thinker step j + 1 (choose g_{j+1}, feed it: its text row H + E), then Talker step j (choose c_j,
             feed c_j with text row j + 1), each while it has work; the Talker runs one text token behind
  end        the Talker's speech rows are dropped and the reply's own rows are appended to its prefix as
             prompt rows (what the next turn's Talker prompt holds), aligned with the Thinker's slots

Text row k of the reply (the Talker's input at decode step k, without the codec half) follows the training
layout (omni_jax.talker.layout) and transformers' batched first-eos rule (omni_jax.talker.inputs.reply_lengths):
H(g_k) + E(g_k) up to the row before the reply's last (its stop id, or the max_new_tokens-th token), then the
bare tts-eos embedding, then tts-pad for ever; a reply of one token keeps H(g_0) + E(g_0) and tts-eos after it.
The hidden states are the decode loop's own (the non-streamed SpeechGenerator recomputes them with one
teacher-forced pass: equal within float rounding). Rows are independent conversations: any batch size, each
row with its own positions; rows that stopped write no valid slot.
"""

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from omni_jax import sharding
from omni_jax.generate.decode import next_token, stream_step
from omni_jax.generate.sampling import SamplingParams
from omni_jax.layers import KVCache
from omni_jax.models.talker import TalkerConfig, zero_media_rows


class TalkerSettings(NamedTuple):
  """The static half of the Talker's decoding (hashable)."""
  sampling: SamplingParams
  max_codes: int  # most codes per reply
  stop_ids: tuple  # codes that end a row (codec pad and end by default)
  speak: bool = True  # False: keep the prefix only (a text reply on a conversation that may speak later)
  code_limit: Optional[int] = None  # codes at or past it, the stop ids aside, are never chosen (limits.py)


class Reply(NamedTuple):
  """cache / talker_cache: the conversation's caches after the reply (the reply's tokens but the last are in
  both); tokens [B, N] (pad after a row's stop), lengths [B] (the stop id included); codes [B, M] and
  code_lengths [B] (the stop code included; zeros without speech)."""
  cache: KVCache
  tokens: jax.Array
  lengths: jax.Array
  talker_cache: Optional[KVCache]
  codes: jax.Array
  code_lengths: jax.Array


def talker_rows(model, input_ids: jax.Array, embeds: jax.Array, hidden: jax.Array) -> jax.Array:
  """The Talker's prompt rows of tokens the Thinker prefilled: H + E, E zeroed at media placeholders (spec
  §7.2), float32 [B, L, D]; the same sum omni_jax.talker.objective.talker_inputs builds for training."""
  ids = model.thinker.ids
  media = (ids.audio_token_id, ids.image_token_id, ids.video_token_id)
  return hidden.astype(jnp.float32) + zero_media_rows(embeds.astype(jnp.float32), input_ids, media)


def talker_prefill(model, rows: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: KVCache) -> KVCache:
  """Append prompt rows [B, L, D] (talker_rows) to the Talker's cache; no codec logits are needed for them."""
  talker = model.talker
  x = talker.thinker_to_talker_proj(rows.astype(talker.model.rt.dtype))
  return talker.model(x, positions, segment_ids, cache)[1]


def make_reply_fn(graphdef: nnx.GraphDef, talker_cfg: Optional[TalkerConfig], *, max_new_tokens: int,
                  sampling: SamplingParams, eos: Sequence[int], pad_token_id: int,
                  talker: Optional[TalkerSettings] = None, stream: bool = True, vocab_limit: Optional[int] = None,
                  mesh=None, rules=(), replicated=None):
  """The pure function
      (params, cache, logits [B, V], seen, start [B], talker_cache, speaker [B], key data, talker key data,
       text listener, codes listener) -> Reply
  start: the position of each row's first reply token (its largest position so far + 1, spec §3.4); seen: the
  Thinker's repetition-penalty ids ([B, 0] without one). talker=None: the Thinker alone (talker_cache,
  speaker and the talker key are ignored). Listeners: ids of omni_jax.generate.decode.listening (stream=False:
  none are called, no host callback in the loop). vocab_limit: Thinker ids at or past it (the LM head's
  padding rows) are never chosen, the stop ids aside; the Talker's codes are bounded by talker.code_limit."""
  n = int(max_new_tokens)
  allowed = dict(vocab_limit=vocab_limit, keep=tuple(int(i) for i in eos))
  eos = jnp.asarray(tuple(eos) or (-1,), jnp.int32)
  with_talker = talker is not None
  speak = with_talker and talker.speak

  def fn(params, cache, logits, seen, start, talker_cache, speaker, key_data, talker_key_data, listener,
         code_listener):
    model = nnx.merge(graphdef, params)
    thinker = model.thinker
    key = jax.random.wrap_key_data(key_data)
    if not stream:
      listener = code_listener = None
    b = logits.shape[0]
    rows = jnp.arange(b)
    first_slot = cache.index

    def feed(cache, token, t, active):
      """g_t through the Thinker: (cache, next logits, its Talker text row H + E)."""
      pos = jnp.broadcast_to((start + t)[None, :, None], (3, b, 1))
      e = thinker.embed(token[:, None])
      hidden, cache = thinker.model(e, pos, active[:, None].astype(jnp.int32), cache)
      out = thinker.logits(hidden)[:, 0].astype(jnp.float32)
      return cache, out, hidden[:, 0].astype(jnp.float32) + e[:, 0].astype(jnp.float32)

    with sharding.activate(mesh, rules):

      def bare(i):  # [B, D]: the bare embedding of one Thinker id
        row = thinker.embed(jnp.asarray([i], jnp.int32)).astype(jnp.float32)
        return jnp.broadcast_to(row, (b, row.shape[-1]))

      # Step 0: g_0 is always fed (its hidden state opens the Talker's text track); a reply of one token (a
      # stop id, or max_new_tokens=1) leaves its slot invalid below, so the cache holds what the reply owes.
      done = jnp.zeros((b,), bool)
      token, done, seen = next_token(logits, seen, done, key, jnp.int32(0), sampling=sampling, eos=eos,
                                     pad_token_id=pad_token_id, **allowed)
      stream_step(listener, jnp.int32(0), token, done, replicated)
      tokens = jnp.full((b, n), pad_token_id, jnp.int32).at[:, 0].set(token)
      lengths = jnp.ones((b,), jnp.int32)
      cache, logits, row0 = feed(cache, token, jnp.int32(0), jnp.ones((b,), bool))
      carry = dict(t=jnp.int32(1), cache=cache, logits=logits, seen=seen, tokens=tokens, lengths=lengths, done=done)

      if with_talker:
        cfg = talker_cfg
        tts_eos, tts_pad = bare(cfg.tts_text_end_token_id), bare(cfg.tts_text_pad_token_id)
        final0 = (done | (n == 1))[:, None]
        queue = jnp.broadcast_to(tts_pad[:, None], (b, n + 1, tts_pad.shape[-1]))
        queue = queue.at[:, 0].set(row0).at[:, 1].set(jnp.where(final0, tts_eos, tts_pad))
        carry["queue"] = queue
      if speak:
        tk = model.talker
        codec = lambda i: tk.codec_embed(jnp.full((b,), i, jnp.int32)).astype(jnp.float32)
        speaker_row = thinker.embed(speaker).astype(jnp.float32) + codec(cfg.tts_codec_pad_token_id)
        x = jnp.stack([speaker_row, row0 + codec(cfg.tts_codec_start_token_id)], axis=1)
        pos = jnp.broadcast_to((start[:, None] + jnp.arange(2))[None], (3, b, 2))
        k_logits, talker_cache = tk(x.astype(tk.model.rt.dtype), pos, jnp.ones((b, 2), jnp.int32), talker_cache)
        # The ids transformers' repetition penalty sees in the Talker's input: the prompt's mask id, pad, bos.
        vocab = k_logits.shape[-1]
        k_seen = jnp.zeros((b, vocab), bool).at[:, jnp.asarray([cfg.tts_codec_mask_token_id,
                                                                 cfg.tts_codec_pad_token_id,
                                                                 cfg.tts_codec_start_token_id])].set(True)
        m = talker.max_codes
        carry.update(s=jnp.int32(0), k_cache=talker_cache, k_logits=k_logits[:, -1],
                     k_seen=k_seen if talker.sampling.penalises else jnp.zeros((b, 0), bool),
                     codes=jnp.full((b, m), cfg.tts_codec_pad_token_id, jnp.int32),
                     k_lengths=jnp.zeros((b,), jnp.int32), k_done=jnp.zeros((b,), bool))
        talker_key = jax.random.wrap_key_data(talker_key_data)
        stop = jnp.asarray(tuple(talker.stop_ids) or (-1,), jnp.int32)

      def thinking(c):
        return (c["t"] < n) & ~jnp.all(c["done"])

      def speaking(c):
        return (c["s"] < talker.max_codes) & ~jnp.all(c["k_done"]) if speak else jnp.bool_(False)

      def think(c):
        t, before = c["t"], c["done"]
        token, done, seen = next_token(c["logits"], c["seen"], before, key, t, sampling=sampling, eos=eos,
                                       pad_token_id=pad_token_id, **allowed)
        stream_step(listener, t, token, done, replicated)
        more = (t + 1 < n) & ~jnp.all(done)
        fed = lambda cache: feed(cache, token, t, ~done)
        skip = lambda cache: (cache, c["logits"], jnp.zeros_like(row0))
        cache, logits, row = jax.lax.cond(more, fed, skip, c["cache"])
        out = dict(c, t=t + 1, cache=cache, logits=logits, seen=seen, tokens=c["tokens"].at[:, t].set(token),
                   lengths=c["lengths"] + (~before).astype(jnp.int32), done=done)
        if with_talker:
          final = (done | (t == n - 1))[:, None]
          queue = c["queue"]
          out["queue"] = queue.at[:, t].set(jnp.where(before[:, None], queue[:, t], jnp.where(final, tts_eos, row)))
        return out

      def speak_step(c):
        s, before = c["s"], c["k_done"]
        code, done, k_seen = next_token(c["k_logits"], c["k_seen"], before, talker_key, s,
                                        sampling=talker.sampling, eos=stop, pad_token_id=cfg.tts_codec_pad_token_id,
                                        suppress=(cfg.tts_codec_start_token_id,), vocab_limit=talker.code_limit,
                                        keep=tuple(talker.stop_ids))
        stream_step(code_listener, s, code, done, replicated)
        more = (s + 1 < talker.max_codes) & ~jnp.all(done)

        def fed(k_cache):  # c_s in, with text row s + 1 (the last row repeats past the queue)
          x = c["queue"][:, jnp.minimum(s + 1, n)] + tk.codec_embed(code).astype(jnp.float32)
          pos = jnp.broadcast_to((start + 2 + s)[None, :, None], (3, b, 1))
          out, k_cache = tk(x[:, None].astype(tk.model.rt.dtype), pos, (~done)[:, None].astype(jnp.int32), k_cache)
          return k_cache, out[:, 0]

        k_cache, k_logits = jax.lax.cond(more, fed, lambda k: (k, c["k_logits"]), c["k_cache"])
        return dict(c, s=s + 1, k_cache=k_cache, k_logits=k_logits, k_seen=k_seen,
                    codes=c["codes"].at[:, s].set(code), k_lengths=c["k_lengths"] + (~before).astype(jnp.int32),
                    k_done=done)

      def body(c):
        c = jax.lax.cond(thinking(c), think, lambda c: c, c)
        return jax.lax.cond(speaking(c), speak_step, lambda c: c, c) if speak else c

      c = jax.lax.while_loop(lambda c: thinking(c) | speaking(c), body, carry)
      lengths = c["lengths"]
      cache = c["cache"]
      cache = cache._replace(valid=cache.valid.at[rows, first_slot].set(cache.valid[rows, first_slot] & (lengths > 1)))
      if with_talker:
        # Drop the speech rows, append the reply's fed tokens g_0 .. g_{len-2} as prompt rows at their positions.
        k_cache = c["k_cache"] if speak else talker_cache
        slots = jnp.arange(k_cache.max_len)
        k_cache = k_cache._replace(valid=k_cache.valid & (slots < first_slot)[None], index=first_slot)
        reply_rows = jnp.arange(n)
        pos = jnp.broadcast_to((start[:, None] + reply_rows)[None], (3, b, n))
        seg = (reply_rows[None] < (lengths - 1)[:, None]).astype(jnp.int32)
        talker_cache = talker_prefill(model, c["queue"][:, :n], pos, seg, k_cache)._replace(index=cache.index)
      else:
        talker_cache = None
      if speak:
        codes, code_lengths = c["codes"], c["k_lengths"]
      else:
        codes, code_lengths = jnp.zeros((b, 0), jnp.int32), jnp.zeros((b,), jnp.int32)
    return Reply(cache, c["tokens"], lengths, talker_cache, codes, code_lengths)

  return fn


def stack_caches(caches: Sequence[KVCache]) -> KVCache:
  """Rows of several conversations' caches (same shapes, [.., 1, max_len, ..]) as one batch: the write index is
  the largest (a row's slots between its own index and it are invalid, so it attends to nothing there)."""
  if len(caches) == 1:
    return caches[0]
  return KVCache(jnp.concatenate([c.k for c in caches], axis=1), jnp.concatenate([c.v for c in caches], axis=1),
                 jnp.concatenate([c.valid for c in caches], axis=0), jnp.max(jnp.stack([c.index for c in caches])))


def split_cache(cache: KVCache, batch: int) -> list[KVCache]:
  """stack_caches undone: one [.., 1, max_len, ..] cache per row (all at the batch's write index)."""
  if batch == 1:
    return [cache]
  # Each its own index buffer: a later call donates a session's cache, which must not take another's with it.
  return [KVCache(cache.k[:, r:r + 1], cache.v[:, r:r + 1], cache.valid[r:r + 1], jnp.array(cache.index, copy=True))
          for r in range(batch)]

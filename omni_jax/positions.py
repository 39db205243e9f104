"""TMRoPE position ids: a jittable equivalent of transformers' `get_rope_index`.

transformers walks each row in Python, appending position blocks; that cannot run under jit and does not
know packed rows. Here the same numbers come from a vectorised formulation:

* Every real token belongs to a *group* that occupies a contiguous range of positions. Text tokens and
  single markers are groups of span 1. An IMAGE run, a VIDEO run and an AUDIO run are one group each. In a
  row that uses audio-in-video, `<|vision_bos|><|audio_bos|>` is one group (both tokens share a position),
  the interleaved VIDEO/AUDIO region is one group and `<|audio_eos|><|vision_eos|>` is one group.
* A group starts where the previous group's span ends (exclusive cumulative sum of spans; it restarts at
  every packed segment), and a token's position is group start + its offset inside the group:
  (t_index, row, col) for vision tokens, (j, j, j) for the j-th audio token.
* A vision group's span is max over the three rows + 1, not its token count. For audio-in-video the span
  follows transformers' "max of the last appended block" rule: if the video yields more chunks than
  the audio, the last block is the video's last chunk (whose max is the video's max on all rows), otherwise
  it is the audio's last chunk (span = number of audio tokens).

Inside an audio-in-video region tokens are positioned by identity (the k-th VIDEO token of the video, the
j-th AUDIO token of the audio). transformers instead assigns positions by slot order, walking video chunk 0,
audio chunk 0, video chunk 1, ...; the two agree when the tokens are laid out in that order, which is what
`audio_in_video_layout` (and transformers' processor) produce.

Media arrays follow transformers: items flattened over the batch in order of appearance (row-major). They
may carry extra all-zero rows (static shapes under jit); rows no placeholder refers to are ignored.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from omni_jax import sizes
from omni_jax.config import TokenIds


# ----------------------------------------------------------------------------------------------------------
# Host-side helpers (numpy / Python): token counts and the audio-in-video layout.


audio_token_count = sizes.audio_token_count  # AUDIO placeholders for an audio of `mel_len` mel frames


def video_time_index(grid_t: int, second_per_grid: float, ids: TokenIds) -> np.ndarray:
  """Temporal position offset of each temporal grid step: trunc(t * second_per_grid * pps) in float32.

  float32 and truncation mirror transformers (`(arange(t) * spg.float() * pps).long()`), so e.g. 0.5 s per
  grid gives 0, 12, 25 (12.5 truncated).
  """
  t = np.arange(int(grid_t), dtype=np.float32)
  return (t * np.float32(second_per_grid) * np.float32(ids.position_id_per_seconds)).astype(np.int64)


def chunk_bounds(values: Sequence[int], tokens_per_chunk: int) -> list[tuple[int, int]]:
  """(start, end) index pairs of transformers' chunk walker over non-decreasing relative time values.

  The walker is token level: each token can open at most one new chunk (when its value reaches the next
  multiple of tokens_per_chunk), so a time jump over several chunk ranges yields several one-token chunks
  rather than empty ones. An empty input gives one empty chunk.
  """
  out, start, chunk = [], 0, 1
  for i, v in enumerate(values):
    if v >= chunk * tokens_per_chunk:
      out.append((start, i))
      start, chunk = i, chunk + 1
  out.append((start, len(values)))
  return out


def tokens_per_chunk(ids: TokenIds) -> int:
  return int(ids.position_id_per_seconds * ids.seconds_per_chunk)


def audio_in_video_layout(grid_thw: Sequence[int], second_per_grid: float, num_audio_tokens: int,
                          ids: TokenIds, *, with_markers: bool = False) -> list[int]:
  """Token ids of an audio-in-video region in the order transformers' get_rope_index walks it.

  Video chunk 0, audio chunk 0, video chunk 1, audio chunk 1, ... (a side that runs out of chunks is
  skipped). grid_thw is the video's patch grid (t, h, w); num_audio_tokens = audio_token_count(mel_len).
  with_markers adds `<|vision_bos|><|audio_bos|>` before and `<|audio_eos|><|vision_eos|>` after.

  Chunks use the model's truncated float32 times; transformers' processor uses untruncated float64 times,
  which gives the same chunks unless float32 rounding crosses a multiple of tokens_per_chunk.
  """
  t, h, w = (int(v) for v in grid_thw)
  m = ids.spatial_merge_size
  video_vals = np.repeat(video_time_index(t, second_per_grid, ids), (h // m) * (w // m))
  k = tokens_per_chunk(ids)
  vc = chunk_bounds(video_vals.tolist(), k)
  ac = chunk_bounds(range(int(num_audio_tokens)), k)
  out = []
  for j in range(max(len(vc), len(ac))):
    if j < len(vc):
      out += [ids.video_token_id] * (vc[j][1] - vc[j][0])
    if j < len(ac):
      out += [ids.audio_token_id] * (ac[j][1] - ac[j][0])
  if with_markers:
    out = [ids.vision_start_token_id, ids.audio_start_token_id] + out + [ids.audio_end_token_id,
                                                                          ids.vision_end_token_id]
  return out


# ----------------------------------------------------------------------------------------------------------
# Jittable position ids.


def _take(a, i):
  return jnp.take_along_axis(a, i, axis=1)


def _grid(grid, m: int):
  """(t, merged h, merged w) int32 columns of an [N, 3] grid; None or empty -> None."""
  if grid is None:
    return None
  g = jnp.asarray(grid, jnp.int32).reshape(-1, 3)
  if g.shape[0] == 0:
    return None
  return g[:, 0], g[:, 1] // m, g[:, 2] // m


def _compact(grid, aligned=None):
  """Move padding rows (t = 0) of an [N, 3] grid behind the real ones, keeping their order.

  Batches pad media per row ([B, N, 3] flattened to [B*N, 3]), so padding rows can sit between real items;
  the k-th item placeholder must still find the k-th real grid. `aligned` ([N]) is permuted alike.
  """
  if grid is None:
    return None, aligned
  g = jnp.asarray(grid, jnp.int32).reshape(-1, 3)
  order = jnp.argsort(g[:, 0] == 0, stable=True)
  if aligned is not None:
    aligned = jnp.asarray(aligned).reshape(-1)[:g.shape[0]][order]
  return g[order], aligned


def _video_times(t, spg, pps: float):
  """Truncated float32 t * second_per_grid * pps, in the operation order transformers uses."""
  return ((t.astype(jnp.float32) * spg) * jnp.float32(pps)).astype(jnp.int32)


def _video_chunk_counts(gt, gh, gw, spg, ids: TokenIds):
  """Number of chunks transformers' token-level walker makes of each video's time values.

  All hw tokens of temporal step t share the value v; each can open one chunk while v reaches the next
  chunk boundary, so the counter goes c -> max(c, min(v // K + 1, c + hw)).
  """
  k = tokens_per_chunk(ids)
  hw = gh * gw

  def step(t, c):
    v = _video_times(jnp.full_like(gt, t), spg, ids.position_id_per_seconds)
    return jnp.where(t < gt, jnp.maximum(c, jnp.minimum(v // k + 1, c + hw)), c)

  return lax.fori_loop(0, jnp.max(gt), step, jnp.ones_like(gt))


def _item_of(starts):
  """Index, in batch-flattened order of appearance, of the most recent item start at or before each token."""
  b, l = starts.shape
  return jnp.cumsum(starts.reshape(-1).astype(jnp.int32)).reshape(b, l) - 1


def rope_index(input_ids, attention_mask=None, *, ids: TokenIds, image_grid_thw=None, video_grid_thw=None,
               second_per_grids=None, use_audio_in_video=False, segment_ids=None):
  """TMRoPE position ids [3, B, L] int32 and deltas [B, 1] int32, equal to transformers' get_rope_index.

  input_ids, attention_mask: [B, L] (mask 1 = real token; None = all real). Masked slots get position 1 as
  in transformers; real tokens are positioned as if the masked ones were removed.
  image_grid_thw / video_grid_thw: [N, 3] patch grids; second_per_grids: [N_video] (None: 1.0 s). Rows with
    t = 0 are padding wherever they are (a batch's per-row media slots flattened [B, N, 3] -> [B*N, 3]).
  Audio spans are read from the AUDIO placeholder runs (transformers also takes audio_seqlens; the embedding
    merge requires the runs to equal audio_token_count(mel length) anyway).
  use_audio_in_video: bool or bool [B]; in such rows `<|vision_bos|><|audio_bos|>` and
    `<|audio_eos|><|vision_eos|>` are position pairs around an interleaved region. A plain video in such a
    row is still positioned as a plain video (transformers would mis-handle it).
  segment_ids: [B, L] packed-sample ids (0 = padding): positions restart at every segment, so each sample
    gets the positions it would get alone; the mask defaults to segment_ids > 0.
  Placeholders of a modality whose grid array is None are treated as text (transformers' text-only branch).
  deltas: max(real positions) + 1 - number of real tokens (the decode offset; see decode_positions). For a
  packed row it spans all segments and is not meaningful.
  Jittable with ids static (jax.jit(functools.partial(rope_index, ids=ids)) or static_argnames=("ids",)).
  """
  x = jnp.asarray(input_ids).astype(jnp.int32)
  b, l = x.shape
  if segment_ids is not None:
    seg = jnp.asarray(segment_ids).astype(jnp.int32)
    valid = seg > 0
    if attention_mask is not None:
      valid &= jnp.asarray(attention_mask) == 1
  else:
    valid = jnp.ones((b, l), bool) if attention_mask is None else jnp.asarray(attention_mask) == 1
    seg = valid.astype(jnp.int32)
  seg = jnp.where(valid, seg, 0)
  idx = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  aiv = jnp.broadcast_to(jnp.asarray(use_audio_in_video, bool).reshape(-1), (b,))[:, None]

  # Previous real token of the same segment (-1 at a segment start): masked slots are skipped, as if removed.
  last_real = lax.cummax(jnp.where(valid, idx, -1), axis=1)
  prev_i = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), last_real[:, :-1]], axis=1)
  prev_c = jnp.maximum(prev_i, 0)
  seg_start = valid & ((prev_i < 0) | (_take(seg, prev_c) != seg))
  xp = jnp.where(seg_start, -1, _take(x, prev_c))

  image_grid_thw, _ = _compact(image_grid_thw)
  video_grid_thw, second_per_grids = _compact(video_grid_thw, second_per_grids)
  m = ids.spatial_merge_size
  img = _grid(image_grid_thw, m)
  vid = _grid(video_grid_thw, m)
  media_ids = [ids.audio_token_id] + ([ids.image_token_id] if img else []) + ([ids.video_token_id] if vid else [])

  def is_media(t):
    return jnp.isin(t, jnp.asarray(media_ids, jnp.int32))

  is_img = valid & (x == ids.image_token_id) if img else jnp.zeros_like(valid)
  is_vid = valid & (x == ids.video_token_id) if vid else jnp.zeros_like(valid)
  is_aud = valid & (x == ids.audio_token_id)

  # Group structure: a token continues the previous token's group inside a media run (audio-in-video
  # regions mix VIDEO and AUDIO runs) and for the second token of a bos / eos pair.
  cont = ~seg_start & ((is_media(x) & is_media(xp))
                       | (aiv & (x == ids.audio_start_token_id) & (xp == ids.vision_start_token_id))
                       | (aiv & (x == ids.vision_end_token_id) & (xp == ids.audio_end_token_id)))
  gstart = valid & ~cont
  gfirst = lax.cummax(jnp.where(gstart, idx, 0), axis=1)  # first token of each token's group
  first_img, first_vid, first_aud = _take(is_img, gfirst), _take(is_vid, gfirst), _take(is_aud, gfirst)

  def index_in_group(mask):
    c = jnp.cumsum(mask.astype(jnp.int32), axis=1) - mask
    return c - _take(c, gfirst)

  k_vis = index_in_group(is_img | is_vid)  # the k-th IMAGE / VIDEO token of its item
  j_aud = index_in_group(is_aud)  # the j-th AUDIO token of its audio
  gid = jnp.cumsum(gstart.astype(jnp.int32), axis=1) - 1
  flat_gid = (jnp.maximum(gid, 0) + jnp.arange(b, dtype=jnp.int32)[:, None] * l).reshape(-1)
  n_aud = jax.ops.segment_sum(is_aud.reshape(-1).astype(jnp.int32), flat_gid, num_segments=b * l)
  n_aud = n_aud[flat_gid].reshape(b, l)  # AUDIO tokens in the token's group

  zeros = jnp.zeros((b, l), jnp.int32)
  t_rel, h_rel, w_rel, span = zeros, zeros, zeros, jnp.ones((b, l), jnp.int32)

  def vision_offsets(grid, item, times):
    gt, gh, gw = grid
    item = jnp.clip(item, 0, gt.shape[0] - 1)
    t, h, w = gt[item], jnp.maximum(gh[item], 1), jnp.maximum(gw[item], 1)
    step = k_vis // (h * w)
    last = jnp.maximum(times(t - 1, item), jnp.maximum(h - 1, w - 1)) + 1  # max over the 3 rows + 1
    return times(step, item), (k_vis // w) % h, k_vis % w, last

  if img:
    it, ih, iw, ispan = vision_offsets(img, _item_of(gstart & is_img),
                                       lambda s, _: s * ids.position_id_per_seconds)
    t_rel, h_rel, w_rel = jnp.where(is_img, it, t_rel), jnp.where(is_img, ih, h_rel), jnp.where(is_img, iw, w_rel)
    span = jnp.where(first_img, ispan, span)
  if vid:
    nv = vid[0].shape[0]
    spg = (jnp.ones((nv,), jnp.float32) if second_per_grids is None
           else jnp.asarray(second_per_grids).astype(jnp.float32).reshape(-1)[:nv])
    v_item = jnp.clip(_item_of(gstart & is_vid), 0, nv - 1)
    vt, vh, vw, vspan = vision_offsets(
        vid, v_item, lambda s, i: _video_times(s, spg[i], ids.position_id_per_seconds))
    t_rel, h_rel, w_rel = jnp.where(is_vid, vt, t_rel), jnp.where(is_vid, vh, h_rel), jnp.where(is_vid, vw, w_rel)
    # Audio-in-video: the last appended block is the video's last chunk only if the video has more chunks.
    k = tokens_per_chunk(ids)
    v_chunks = _video_chunk_counts(*vid, spg, ids)[v_item]
    video_last = (n_aud == 0) | (v_chunks > (n_aud + k - 1) // k)
    span = jnp.where(first_vid, jnp.where(video_last, vspan, n_aud), span)
  t_rel, h_rel, w_rel = (jnp.where(is_aud, j_aud, r) for r in (t_rel, h_rel, w_rel))
  span = jnp.where(first_aud, n_aud, span)
  span = jnp.where(valid, span, 0)

  # Group start = exclusive cumulative span, restarted at each segment.
  contrib = jnp.where(gstart, span, 0)
  before = jnp.cumsum(contrib, axis=1) - contrib  # exclusive cumsum at group starts
  seg_first = lax.cummax(jnp.where(seg_start, idx, 0), axis=1)
  start = _take(before, gfirst) - _take(before, seg_first)
  pos = jnp.stack([start + t_rel, start + h_rel, start + w_rel])
  pos = jnp.where(valid[None], pos, 1)

  return pos.astype(jnp.int32), position_deltas(pos, valid)


def position_deltas(positions, valid):
  """[B, 1] int32 decode offsets: max real position (any row) + 1 - number of real tokens (0 for empty rows).

  positions [3, B, L]; valid [B, L] bool (real tokens). The k-th generated token then sits at
  n_real + k + delta (decode_positions).
  """
  n_real = valid.sum(axis=1).astype(jnp.int32)
  top = jnp.where(valid[None], positions, -1).max(axis=(0, 2))
  return jnp.where(n_real > 0, top + 1 - n_real, 0)[:, None].astype(jnp.int32)


def text_positions(mask_or_segments):
  """[3, B, L] 1-D positions for text(/audio)-only rows: real-token count - 1, restarted per segment.

  Takes an attention mask (0/1) or segment ids (0 = padding); padded slots get 1 like rope_index.
  """
  seg = jnp.asarray(mask_or_segments).astype(jnp.int32)
  b, l = seg.shape
  valid = seg > 0
  idx = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  count = jnp.cumsum(valid.astype(jnp.int32), axis=1)
  last_real = lax.cummax(jnp.where(valid, idx, -1), axis=1)
  prev_i = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), last_real[:, :-1]], axis=1)
  seg_start = valid & ((prev_i < 0) | (_take(seg, jnp.maximum(prev_i, 0)) != seg))
  seg_first = lax.cummax(jnp.where(seg_start, idx, 0), axis=1)
  pos = count - _take(count, seg_first)
  pos = jnp.where(valid, pos, 1)
  return jnp.broadcast_to(pos[None], (3, b, l))


def decode_positions(deltas, start, length: int = 1):
  """[3, B, length] positions of generated tokens: real index + delta, identical on all 3 rows.

  deltas: [B, 1] (or [B]) from rope_index; start: [B] or scalar real-token index of the first new token
  (the number of real tokens already in the cache for that row).
  """
  deltas = jnp.asarray(deltas, jnp.int32).reshape(-1, 1)
  start = jnp.broadcast_to(jnp.asarray(start, jnp.int32).reshape(-1, 1), deltas.shape)
  pos = start + deltas + jnp.arange(length, dtype=jnp.int32)[None]
  return jnp.broadcast_to(pos[None], (3,) + pos.shape)

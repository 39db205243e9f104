"""Host batches -> global device arrays, and the choice of data source (config.data.source).

Every process builds only the rows of the global batch that its devices hold (process_rows), and
to_global stitches the processes' rows into one jax.Array laid out as the step expects.
"""

from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from omni_jax import config as config_lib
from omni_jax import sizes, towers
from omni_jax.train import step as step_lib


def process_rows(mesh: Mesh, rules, batch_size: int, seq_len: int) -> tuple[int, int]:
  """[start, stop) of the global batch rows that this process's devices hold."""
  shape = (batch_size, seq_len)
  sharding = step_lib.batch_shardings({"input_ids": jax.ShapeDtypeStruct(shape, np.int32)}, mesh, rules)["input_ids"]
  rows = [idx[0] for idx in sharding.addressable_devices_indices_map(shape).values()]
  start = min(r.start or 0 for r in rows)
  stop = max(batch_size if r.stop is None else r.stop for r in rows)
  return start, stop


def make_source(config: ml_collections.ConfigDict, split: str, batch_size: int, rows: tuple[int, int]):
  """An iterator of host batches (the rows [start, stop) of each global batch) with get_state/set_state."""
  if config.data.source == "synthetic":
    d = config.data.synthetic
    from omni_jax.input import synthetic  # local: sources are optional dependencies

    ids = config_lib.TokenIds.from_config(config.model.thinker)
    special = [getattr(ids, f) for f in ("audio_token_id", "image_token_id", "video_token_id",
                                         "audio_start_token_id", "audio_end_token_id", "vision_start_token_id",
                                         "vision_end_token_id")]
    kinds = tuple(d.kinds)
    media = None
    if set(kinds) - {"text"}:
      thinker = config.model.thinker
      vision, audio = thinker.get("vision"), thinker.get("audio")
      media = synthetic.MediaSpec(
          **{f: getattr(ids, f) for f in ("image_token_id", "vision_start_token_id", "vision_end_token_id",
                                          "audio_token_id", "audio_start_token_id", "audio_end_token_id")},
          image_grid=tuple(d.image_grid), merge_size=ids.spatial_merge_size,
          patch_dim=sizes.patch_dim(vision.in_channels, vision.temporal_patch_size, vision.patch_size) if vision else 1,
          mel_bins=audio.num_mel_bins if audio else 1, audio_frames=d.audio_frames)
    vocab = min(d.vocab_size, config.model.thinker.text.vocab_size)
    return synthetic.SyntheticSource(batch_size=batch_size, seq_len=config.train.seq_len, vocab_size=vocab,
                                     seed=config.data.seed, split=split, min_segment_len=d.min_segment_len,
                                     rows=rows, kinds=kinds, exclude_ids=special, media=media)
  from omni_jax.input import pipeline  # local: the grain pipeline's dependencies load only when used

  return pipeline.make_source(config, split=split, batch_size=batch_size, rows=rows)


def to_global(host: Mapping[str, Any], mesh: Mesh, rules, batch_size: int) -> dict:
  """This process's rows -> global jax.Arrays of batch_size rows, sharded like the step's inputs."""
  towers.check_batch(host)
  shapes = {k: jax.ShapeDtypeStruct((batch_size,) + np.shape(v)[1:], np.asarray(v).dtype) for k, v in host.items()}
  shardings = step_lib.batch_shardings(shapes, mesh, rules)
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v), shapes[k].shape)
          for k, v in host.items()}


def counters(source) -> dict:
  """The source's cumulative counters (samples, skipped, ...) as data/<name> scalars, if it keeps any."""
  metrics = getattr(source, "metrics", None)
  return {f"data/{k}": float(v) for k, v in metrics().items()} if callable(metrics) else {}


def close(source) -> None:
  """Stop a source's worker processes / threads, if it has any."""
  if callable(getattr(source, "close", None)):
    source.close()

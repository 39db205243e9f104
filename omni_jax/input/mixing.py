"""Per-dataset record streams and their weighted interleave (grain), before any decoding.

Each dataset is one grain source: this host's slice (records process_index::process_count, so hosts never
share a record), a global shuffle seeded by (seed, dataset name), endless epochs each shuffled anew, and every
record tagged with its dataset name. Training streams are interleaved by grain's deterministic weighted mix
(exact proportions at every prefix, state kept per dataset name, so a restored run may change the weights);
evaluation streams are concatenated, one pass, unshuffled.
"""

import zlib
from typing import Any, Mapping, Optional

import grain

_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # records are tiny; decoding happens later


class Tag:
  """Picklable map: example -> (dataset name, example)."""

  def __init__(self, name: str):
    self.name = name

  def __call__(self, example: Any) -> tuple[str, Any]:
    return self.name, example


def dataset_seed(seed: int, name: str) -> int:
  """A per-dataset shuffle seed that does not depend on the other datasets of the mixture."""
  return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 32)


def host_slice(source, name: str, process_index: int, process_count: int) -> grain.MapDataset:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1}")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(f"dataset {name!r} has {len(source)} records: none left for process {process_index} of "
                     f"{process_count}")
  return ds


def train_stream(source, name: str, *, seed: int, shuffle: bool = True, process_index: int = 0,
                 process_count: int = 1, num_epochs: Optional[int] = None) -> grain.IterDataset:
  """Endless (or num_epochs) shuffled, tagged records of one dataset for this host."""
  ds = host_slice(source, name, process_index, process_count)
  if shuffle:
    ds = ds.shuffle(seed=dataset_seed(seed, name))
  return ds.repeat(num_epochs).map(Tag(name)).to_iter_dataset(_READ)


def mix(streams: Mapping[str, grain.IterDataset], weights: Mapping[str, float]) -> grain.IterDataset:
  """Weighted interleave of named streams; weights must name exactly the streams, all positive."""
  missing, extra = set(streams) - set(weights), set(weights) - set(streams)
  if missing or extra:
    raise ValueError(f"config.data.mixture must give a weight to each dataset: missing {sorted(missing)}, "
                     f"unknown {sorted(extra)}")
  bad = {k: w for k, w in weights.items() if not float(w) > 0}
  if bad:
    raise ValueError(f"config.data.mixture: weights must be positive, got {bad}")
  if len(streams) == 1:
    return next(iter(streams.values()))
  names = sorted(streams)
  return grain.IterDataset.mix({n: streams[n] for n in names}, {n: float(weights[n]) for n in names})


def eval_stream(sources: Mapping[str, Any], *, process_index: int = 0, process_count: int = 1,
                num_epochs: Optional[int] = 1, per_dataset: Optional[int] = None) -> grain.IterDataset:
  """Unshuffled passes (num_epochs; None = endless) over every dataset in name order, tagged, for this host.
  per_dataset: only the first that many records of each dataset (all hosts together)."""
  first = lambda src: src if not per_dataset else grain.MapDataset.source(src)[:int(per_dataset)]  # noqa: E731
  parts = [host_slice(first(sources[n]), n, process_index, process_count).map(Tag(n)) for n in sorted(sources)]
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
  return ds.repeat(num_epochs).to_iter_dataset(_READ)

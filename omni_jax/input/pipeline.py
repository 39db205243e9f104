"""The input pipeline: config.data -> an iterator of packed batches (omni_jax.batch) with a checkpointable state.

    datasets (TFDS ArrayRecord) -> mixing (host slice, shuffle, weighted interleave of raw records)
      -> packing.PackedDataset (in each worker: preprocess = decode media + render ChatML, then pack)
      -> grain mp_prefetch (worker processes; 0 workers = in process, with a prefetch thread)
      -> DataIterator (main process: batches out, counters and warnings, get_state / set_state)

Nothing here imports jax: the trainer passes jax.process_index() / process_count() in as ints. Datasets are
resolved and opened at startup, so a missing path fails before any worker starts, with a message naming it.
"""

import collections
import dataclasses
import gc
import logging
import os
from typing import Mapping, Optional, Sequence

import grain

from omni_jax import towers
from omni_jax.errors import ConfigError
from omni_jax.input import chat
from omni_jax.input import mixing
from omni_jax.input import packing
from omni_jax.input import preprocess
from omni_jax.input import sources
from omni_jax.input.tokenizer import Tokenizer

log = logging.getLogger(__name__)

def _plain(value):
  """ConfigDict / FrozenConfigDict / tuples of them -> plain Python containers."""
  if hasattr(value, "to_dict"):
    return {k: _plain(v) for k, v in value.to_dict().items()}
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(_plain(v) for v in value)
  return value


def resolve_datasets(data: Mapping) -> dict[str, str]:
  """{dataset name: TFDS name under data.tfds_data_dir}, building ArrayRecord stores from JSONL as needed.

  data.source = a registered recipe (sources.register_source; "demo": the demo corpus): its own datasets.
  data.source = "jsonl": data.datasets = {name: path | glob | [paths] | {split: paths}} (a plain path is the
  train split). data.source = "tfds": data.datasets = {name: "omni_conversations/<config>"} already built.
  """
  source = data.get("source", "demo")
  if source not in sources.READERS:
    return sources.find_recipe(source).datasets(data)
  specs = data.get("datasets") or {}
  if not specs:
    raise sources.DataError(f"config.data.datasets is empty (config.data.source = {source!r})")
  out = {}
  for name, spec in specs.items():
    if source == "tfds":
      out[name] = spec
    elif source == "jsonl":
      splits = spec if isinstance(spec, Mapping) else {"train": spec}
      out[name] = sources.build(name, splits, _data_dir(data))
    else:
      raise sources.DataError(f"config.data.source: the pipeline reads 'jsonl', 'tfds' or a registered recipe, "
                              f"not {source!r}")
  return out


def _data_dir(data: Mapping) -> str:
  source = data.get("source", "demo")
  if source not in sources.READERS:
    return sources.find_recipe(source).data_dir(data)
  return os.path.expanduser(data.get("tfds_data_dir", "~/.cache/omni_jax/tfds"))


def buckets_from_config(data: Mapping, *, seq_len: int, batch_size: int, process_count: int = 1,
                        targets: Optional[Mapping[str, towers.Targets]] = None, max_pairs: int = 0,
                        hooks: Optional[Sequence[towers.TowerData]] = None) -> list[packing.Bucket]:
  """Length buckets with this host's rows: config batch sizes (default `batch_size`) are global rows.

  Media limits a bucket leaves out scale with its length: seq_len // 256 images (at least one) of up to
  seq_len patches in all, one video of seq_len patches, seq_len // 128 audios of up to 30 s; max_pairs (a DPO
  run: config.dpo.max_pairs_per_row) preference pairs per row. A tower's room (its keys of TowerData.sizes,
  which config.data.buckets may set) is what the run's targets of it ask for a bucket of that length
  (Targets.bucket_sizes; targets: {tower name: the run's Targets}), else none.
  """
  hooks = towers.data_hooks() if hooks is None else hooks
  targets = targets or {}
  mels = int(data.get("media", {}).get("num_mel_bins", 128))
  given = list(data.get("buckets") or ()) or [{"seq_len": seq_len}]
  tower_sizes = {k: v for h in hooks for k, v in h.sizes.items()}
  fields = {f.name for f in dataclasses.fields(packing.Bucket)} - {"sizes"} | set(tower_sizes)
  out = []
  for i, b in enumerate(given):
    b = dict(b)
    unknown = set(b) - fields
    if unknown:
      raise ValueError(f"config.data.buckets[{i}]: unknown keys {sorted(unknown)}")
    n = int(b.get("seq_len", seq_len))
    rows = int(b.get("batch_size", batch_size))
    if rows % process_count:
      raise ValueError(f"config.data.buckets[{i}]: batch_size {rows} is not divisible by {process_count} processes")
    defaults = dict(max_images=max(1, n // 256), max_image_patches=n, max_videos=1, max_video_patches=n,
                    max_audios=max(1, n // 128), max_audio_frames=3000, num_mel_bins=mels, max_pairs=max_pairs)
    sizes = dict(tower_sizes)
    for t in targets.values():
      sizes.update(t.bucket_sizes(n))
    sizes.update({k: int(v) for k, v in b.items() if k in tower_sizes})
    b = {k: v for k, v in b.items() if k not in tower_sizes}
    bucket = packing.Bucket(**{**defaults, **b, "seq_len": n, "batch_size": rows // process_count, "sizes": sizes})
    packing.check_bucket(bucket, hooks)
    out.append(bucket)
  return sorted(out, key=lambda b: b.seq_len)


def chat_format(tokenizer: Tokenizer, thinker: Optional[Mapping] = None,
                data: Optional[Mapping] = None) -> chat.ChatFormat:
  """The rendering format; fails fast when the model config's special ids disagree with the tokenizer's."""
  thinker = thinker or {}
  data = data or {}
  names = {"audio_token_id": "<|AUDIO|>", "image_token_id": "<|IMAGE|>", "video_token_id": "<|VIDEO|>",
           "audio_start_token_id": "<|audio_bos|>", "audio_end_token_id": "<|audio_eos|>",
           "vision_start_token_id": "<|vision_bos|>", "vision_end_token_id": "<|vision_eos|>"}
  wrong = {k: (thinker[k], tokenizer.special[t]) for k, t in names.items()
           if k in thinker and int(thinker[k]) != tokenizer.special[t]}
  if wrong:
    raise ValueError(f"config.model.thinker token ids disagree with the tokenizer ((config, tokenizer): {wrong})")
  return chat.ChatFormat(special=dict(tokenizer.special), spatial_merge_size=int(thinker.get("spatial_merge_size", 2)),
                         position_id_per_seconds=int(thinker.get("position_id_per_seconds", 25)),
                         seconds_per_chunk=int(thinker.get("seconds_per_chunk", 2)),
                         add_vision_id=bool(data.get("add_vision_id", False)),
                         add_audio_id=bool(data.get("add_audio_id", False)))


def _ensure_flags_parsed():
  """grain's worker start reads absl flags; a program that never parsed them (a script, a test) gets defaults."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _split_name(data: Mapping, split: str) -> str:
  """The trainer's "eval" / "test" name the datasets' held-out split (data.eval_split, default "validation")."""
  return data.get("eval_split", "validation") if split in ("eval", "test") else split


def preference_datasets(config, names, mixture) -> tuple[frozenset, int]:
  """(names of the mixture's preference datasets, pairs per row) of a run: config.data.preference names the
  datasets whose records are preference pairs; they need config.dpo, whose max_pairs_per_row bounds the pairs
  of a row (0 without config.dpo: no pair fields in the batches). Raises ConfigError when the two disagree."""
  data = config.get("data") or {}
  named = data.get("preference", None) or ()
  named = (named,) if isinstance(named, str) else tuple(named)
  dpo = config.get("dpo", None)
  if not named and dpo is None:
    return frozenset(), 0
  unknown = sorted(set(named) - set(names))
  if unknown:
    raise ConfigError(f"config.data.preference: {unknown} are not datasets of config.data.datasets "
                      f"{sorted(names)}")
  used = frozenset(n for n in named if n in mixture)
  if dpo is None:
    raise ConfigError(f"config.data.preference: the datasets {sorted(named)} hold preference pairs, which train "
                      "only the DPO objectives: set config.dpo (configs/recipes/dpo.py), or drop them from "
                      "config.data.preference and config.data.mixture")
  if not used:
    raise ConfigError(f"config.dpo: set, but no dataset of config.data.mixture {sorted(mixture)} is a preference "
                      "dataset: name the pair datasets in config.data.preference (docs/data.md, \"Preference "
                      "pairs\")")
  pairs = dpo.get("max_pairs_per_row", 8)
  if not isinstance(pairs, int) or isinstance(pairs, bool) or pairs <= 0:
    raise ConfigError(f"config.dpo.max_pairs_per_row: must be a positive integer, got {pairs!r}")
  return used, pairs


def build_dataset(config, *, split: str = "train", batch_size: Optional[int] = None, process_index: int = 0,
                  process_count: int = 1, worker_count: Optional[int] = None) -> grain.IterDataset:
  """The grain dataset of (batch, info) pairs of one split for this host.

  train: the endless weighted mixture, shuffled. Other splits: every dataset in turn, unshuffled, repeated
  (each fresh dataset starts over, so evaluations see the same batches). batch_size: global rows per batch
  (default config.train.batch_size); this host gets batch_size / process_count of them.
  """
  data = _plain(config["data"])
  model = _plain(config.get("model", {}))
  train = _plain(config.get("train", {}))
  thinker = {k: v for k, v in model.get("thinker", {}).items() if not isinstance(v, Mapping)}
  names = resolve_datasets(data)
  mixture = data.get("mixture") or {n: 1.0 for n in names}
  unknown = set(mixture) - set(names)
  if unknown:
    raise ValueError(f"config.data.mixture names unknown datasets {sorted(unknown)}; known: {sorted(names)}")
  data_dir = _data_dir(data)
  split = _split_name(data, split)
  # The mixture names the datasets to read (train and eval alike); leave a dataset out to skip it.
  opened = {n: sources.open_split(names[n], split, data_dir) for n in sorted(mixture)}
  preference, max_pairs = preference_datasets(config, names, mixture)
  tokenizer = Tokenizer(data.get("tokenizer"))
  fmt = chat_format(tokenizer, thinker, data)
  # The towers that train on more than the text (e.g. on spoken replies) make their targets for this run; a
  # tower whose objectives do not train here makes none, and its objectives see no rows.
  hooks = towers.data_hooks()
  train_split = lambda: {n: sources.open_split(names[n], _split_name(data, "train"), data_dir)  # noqa: E731
                         for n in sorted(mixture)}
  targets = {}
  for hook in hooks:
    made = hook.targets(config, bool(preference), train_split)
    if made is not None:
      targets[hook.name] = made
  prep = preprocess.Preprocessor(tokenizer, fmt, preprocess.MediaOptions.from_config(data.get("media")),
                                 data.get("system_prompt"), targets, preference)
  seed = int(data.get("seed", config.get("seed", 0)))
  if split == "train":
    streams = {n: mixing.train_stream(src, n, seed=seed, shuffle=bool(data.get("shuffle", True)),
                                      process_index=process_index, process_count=process_count)
               for n, src in opened.items()}
    records = mixing.mix(streams, mixture)
  else:
    # config.eval.samples_per_dataset: the same first records of every dataset, one pass (omni_jax/evaluate).
    per_dataset = (_plain(config.get("eval", {})) or {}).get("samples_per_dataset")
    records = mixing.eval_stream(opened, process_index=process_index, process_count=process_count,
                                 num_epochs=1 if per_dataset or not data.get("eval_repeat", True) else None,
                                 per_dataset=per_dataset)
  buckets = buckets_from_config(data, seq_len=int(train.get("seq_len", 512)),
                                batch_size=int(batch_size or train.get("batch_size", 8)), process_count=process_count,
                                targets=targets, max_pairs=max_pairs, hooks=hooks)
  ds = packing.PackedDataset(records, prep, buckets, max_lag=int(data.get("max_lag", 512)),
                             pad_id=tokenizer.special["<|endoftext|>"], limits=packing.SkipLimits.from_config(data),
                             hooks=hooks)
  workers = int(data.get("worker_count", 0) if worker_count is None else worker_count)
  if workers > 0:
    _ensure_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=int(data.get("worker_buffer", 2))))
  elif int(data.get("prefetch", 0)) > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=int(data["prefetch"]))
  return ds


class DataIterator:
  """Batches for the train/eval step, plus counters; get_state()/set_state() for the training checkpoint.

  metrics(): cumulative counters: batches, samples, tokens (real), loss_tokens, slots (B x L), samples/<kind>,
  pairs (preference pairs; each also counts as two samples), skipped, skipped/<reason>. A skipped sample is
  logged as a warning naming it once per (sample, reason): the next epoch's skips of the same bad line are
  counted but not logged again.
  """

  MAX_LOGGED = 100_000  # (sample, reason) pairs remembered; past that, skips are counted and not logged

  def __init__(self, dataset: grain.IterDataset):
    self._dataset = dataset
    self._it = iter(dataset)
    self._counters = collections.Counter()
    self._logged: set[tuple[str, str]] = set()
    self.last_info: dict = {}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    while True:
      batch, info = next(self._it)
      self._account(info)
      if batch is not None:
        return {k: _release_shared_memory(v) for k, v in batch.items()}

  def _account(self, info: dict):
    c = self._counters
    if info["samples"]:
      c["batches"] += 1
      c["samples"] += len(info["samples"])
      c["tokens"] += info["tokens"]
      c["loss_tokens"] += info["loss_tokens"]
      c["slots"] += info["seq_len"] * info["rows"]
      if info.get("pairs"):
        c["pairs"] += info["pairs"]
      self.last_info = info
    for kind, n in info["kinds"].items():
      c[f"samples/{kind}"] += n
    for name, reason, message in info["skipped"]:
      c["skipped"] += 1
      c[f"skipped/{reason}"] += 1
      if (name, reason) not in self._logged and len(self._logged) < self.MAX_LOGGED:
        self._logged.add((name, reason))
        log.warning("skipped sample %s (%s): %s", name, reason, message)
        if len(self._logged) == self.MAX_LOGGED:
          log.warning("%d different samples were skipped; further skips are counted, not logged", self.MAX_LOGGED)

  def metrics(self) -> dict[str, int]:
    return dict(self._counters)

  def get_state(self) -> dict:
    """JSON-serialisable: the grain iterator state and the counters."""
    return {"grain": self._it.get_state(), "counters": dict(self._counters)}

  def set_state(self, state: dict):
    self._it.set_state(state["grain"])
    self._counters = collections.Counter(state.get("counters", {}))

  def close(self):
    """Stop worker processes / threads now. The grain iterator is dropped here, not at interpreter exit,
    where grain's finalizers would run against half torn-down modules."""
    if self._it is not None:
      self._it.close()
      self._it = None
      gc.collect()


def _release_shared_memory(array):
  """Unlink the shared-memory block behind an array a grain worker sent, now; the mapping stays valid.

  grain unlinks such blocks when the array is garbage collected, on a background thread: arrays still alive at
  exit (the last batches) were never unlinked, and Python's resource tracker reported them as leaked
  shared_memory objects. Unlinking at arrival (POSIX keeps the memory until the last mapping closes) leaves
  nothing to leak, whenever the array dies.
  """
  shm = getattr(array, "shm", None)
  if shm is not None and getattr(array, "_unlink_on_del", False):
    array._unlink_on_del = False  # pylint: disable=protected-access - its __del__ must only close the mapping
    shm.unlink()
  return array


def make_iterator(config, *, split: str = "train", batch_size: Optional[int] = None, process_index: int = 0,
                  process_count: int = 1, worker_count: Optional[int] = None) -> DataIterator:
  """The pipeline of config.data for this host (process_index / process_count from jax, as ints)."""
  return DataIterator(build_dataset(config, split=split, batch_size=batch_size, process_index=process_index,
                                    process_count=process_count, worker_count=worker_count))


def make_source(config, split: str, batch_size: int, rows: tuple[int, int]) -> DataIterator:
  """The trainer's entry point (omni_jax.train.data): this process builds global rows [start, stop).

  Rows split evenly over processes, so the host's share of the records follows from its row range.
  """
  start, stop = (int(r) for r in rows)
  n = stop - start
  if n <= 0 or batch_size % n or start % n:
    raise ValueError(f"rows {rows} are not an even share of a global batch of {batch_size}")
  return make_iterator(config, split=split, batch_size=batch_size, process_index=start // n,
                       process_count=batch_size // n)

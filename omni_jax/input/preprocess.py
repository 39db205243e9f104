"""One stored record -> one model-ready sample: normalise, decode and preprocess media, render ChatML, and ask
each tower that trains on more than the text for its targets (omni_jax.towers.Targets, e.g. a spoken reply's).

Runs in the data workers (numpy, PIL, PyAV; no jax). Every way a record can be bad raises SampleError with
a reason (REASONS, or a tower's) and a message naming the sample;
the packer turns it into a skip that is counted and reported, never a stopped run.

A record of a preference dataset (Preprocessor.preference) becomes a Pair instead: two samples, prompt + chosen
reply and prompt + rejected reply, whose labels cover the reply only; the packer puts both in one row.
"""

import dataclasses
import os
from typing import Collection, Mapping, NamedTuple, Optional, Union

import numpy as np

from omni_jax import batch as batch_lib
from omni_jax import towers
from omni_jax.errors import UserError
from omni_jax.input import chat
from omni_jax.input import pairs as pairs_lib
from omni_jax.input import sources
from omni_jax.input.media import MediaBudget
from omni_jax.input.media import MediaError
from omni_jax.input.media import audio as audio_media
from omni_jax.input.media import image as image_media
from omni_jax.input.media import patches
from omni_jax.input.media import video as video_media

REASONS = ("malformed", "unknown_tag", "missing_media", "bad_media", "too_long", "error",
           sources.PairError.reason) + sources.LINE_REASONS
# error: unforeseen; not_utf8, blank_line: JSONL lines that are no record; bad_pair: a preference record that
# is no usable pair, or a pair in a dataset of conversations (omni_jax.input.pairs). A tower's targets add
# their own reasons (omni_jax.towers.TargetError, e.g. a spoken reply without speech codes).


class SampleError(UserError, ValueError):
  """A sample that cannot be used; `reason` is one of REASONS or a tower's (omni_jax.towers.TargetError)."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class MediaOptions:
  """How media are sampled and sized (the released processor's values unless a config lowers them), and the
  budget every decode is held to (omni_jax.input.media.MediaBudget)."""
  image_min_pixels: int = patches.IMAGE_MIN_PIXELS
  image_max_pixels: int = patches.IMAGE_MAX_PIXELS
  video_fps: float = video_media.DEFAULT_FPS
  video_min_frames: int = video_media.MIN_FRAMES
  video_max_frames: int = video_media.MAX_FRAMES
  video_min_pixels: int = patches.VIDEO_MIN_PIXELS
  video_max_pixels: int = patches.VIDEO_MAX_PIXELS
  video_max_total_pixels: Optional[int] = None
  num_mel_bins: int = audio_media.NUM_MEL_BINS
  budget: MediaBudget = MediaBudget()

  @classmethod
  def from_config(cls, cfg: Optional[Mapping]) -> "MediaOptions":
    """config.data.media: the fields above; `budget`, if given, is a mapping of MediaBudget fields (those it
    leaves out keep their defaults), e.g. media.budget = dict(max_audio_seconds=120.0)."""
    cfg = dict(cfg or {})
    unknown = set(cfg) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"config.data.media: unknown keys {sorted(unknown)}")
    budget = cfg.pop("budget", None)
    if isinstance(budget, MediaBudget):
      cfg["budget"] = budget
    elif budget is not None:
      budget = dict(budget)
      unknown = set(budget) - {f.name for f in dataclasses.fields(MediaBudget)}
      if unknown:
        raise ValueError(f"config.data.media.budget: unknown keys {sorted(unknown)}")
      cfg["budget"] = MediaBudget(**budget)
    return cls(**cfg)


class DecodedPart(NamedTuple):
  """One media part decoded and preprocessed (Preprocessor.decode_part), ready for load_part as {"decoded": ...}."""
  item: chat.MediaItem
  media: dict  # {"images": [...], "videos": [...], "audios": [...]}: what load_part appends to a sample's lists


@dataclasses.dataclass(frozen=True)
class PairRole:
  """A sample's place in a preference pair; the packer numbers the pairs of a row (omni_jax.batch)."""
  chosen: bool  # the chosen reply (else the rejected one)
  text: bool  # the replies' texts differ: the pair is marked in dpo_pair (a preference between texts)
  towers: frozenset = frozenset()  # the towers that learn the preference from their targets (Targets.prefers)


@dataclasses.dataclass
class Sample:
  """A rendered conversation and its media, ready to pack."""
  name: str  # "<dataset>/<record id>", for warnings and accounting
  kind: int  # batch.KIND_*
  input_ids: np.ndarray  # [n] int32
  labels: np.ndarray  # [n] int32
  images: list  # [(pixel rows [p, 1176] f32, grid (3,))]
  videos: list  # [(pixel rows, grid (3,), second_per_grid)]
  audios: list  # [log-mel [mels, frames] f32], in order of appearance (audio-in-video tracks included)
  use_audio_in_video: bool = False
  # {tower name: its target of this sample} (omni_jax.towers.Targets), e.g. a spoken reply's codes
  targets: dict = dataclasses.field(default_factory=dict)
  pair: Optional[PairRole] = None  # set on the two samples of a preference pair

  @property
  def num_tokens(self) -> int:
    return int(self.input_ids.shape[0])


@dataclasses.dataclass
class Pair:
  """A preference pair: its chosen and rejected samples, packed side by side in one row (chosen first)."""
  name: str  # "<dataset>/<record id>"
  chosen: Sample
  rejected: Sample

  @property
  def samples(self) -> tuple[Sample, Sample]:
    return self.chosen, self.rejected


def _media(images=(), videos=(), audios=()) -> dict:
  return {"images": list(images), "videos": list(videos), "audios": list(audios)}


def sample_kind(messages) -> int:
  """Modality of a sample for metrics: video > image > audio > text, over the parts of all messages."""
  kinds = {p["type"] for m in messages for p in m["content"]}
  for name in ("video", "image", "audio"):
    if name in kinds:
      return batch_lib.KINDS[name]
  return batch_lib.KIND_TEXT


class Preprocessor:
  """Picklable callable: (dataset name, stored example) -> Sample. Raises SampleError."""

  def __init__(self, tokenizer, fmt: chat.ChatFormat, media: MediaOptions = MediaOptions(),
               system_prompt: Optional[str] = None, targets: Optional[Mapping[str, towers.Targets]] = None,
               preference: Collection[str] = ()):
    self.tokenizer = tokenizer
    self.fmt = fmt
    self.options = media
    self.system_prompt = system_prompt
    self.targets = dict(targets or {})  # {tower name: the run's maker of its targets}; none: text only
    self.preference = frozenset(preference)  # names of the datasets whose records are preference pairs

  def load_part(self, part: Mapping, aiv: bool, name: str, media: dict) -> chat.MediaItem:
    """Decode and preprocess one media part (see decode_part) into the `media` lists; returns its chat item."""
    decoded = self.decode_part(part, aiv, name)
    for key, values in decoded.media.items():
      media[key].extend(values)
    return decoded.item

  def decode_part(self, part: Mapping, aiv: bool, name: str) -> DecodedPart:
    """One media part -> DecodedPart, every decode held to options.budget. Raises SampleError.

    A part is {"type", "path"[, "use_audio_in_video"]}, {"type": "audio", "array": float samples [n] or
    [n, channels], "sample_rate": int}, {"type": "image", "array": uint8 [H, W(, 1|3|4)]}, or any part
    carrying "decoded": a DecodedPart made earlier (e.g. on another thread), returned as it is (aiv was applied
    when it was made).
    """
    kind, m = part["type"], self.options
    if "decoded" in part:
      if not isinstance(part["decoded"], DecodedPart):
        raise SampleError("malformed", f"{name}: {kind} part's 'decoded' is a {type(part['decoded']).__name__}, "
                          "not a DecodedPart")
      return part["decoded"]
    if "array" in part:
      source, label = part["array"], f"<{kind} array>"
      if kind not in ("image", "audio"):
        raise SampleError("malformed", f"{name}: a {kind} part cannot carry an array; give its path")
    elif "path" in part:
      source = label = part["path"]
      if not os.path.exists(source):
        raise SampleError("missing_media", f"{name}: {kind} file {source} does not exist")
    else:
      raise SampleError("malformed", f"{name}: {kind} part has no path, array or decoded data")
    try:
      if kind == "image":
        rows, grid = image_media.preprocess_image(source, min_pixels=m.image_min_pixels,
                                                  max_pixels=m.image_max_pixels,
                                                  merge_size=self.fmt.spatial_merge_size, budget=m.budget)
        return DecodedPart(chat.ImageItem(tuple(int(g) for g in grid)), _media(images=[(rows, grid)]))
      if kind == "audio":
        if "array" in part:
          wave = audio_media.waveform_from_array(source, part.get("sample_rate", audio_media.SAMPLE_RATE),
                                                 budget=m.budget, name=label)
          feats = audio_media.log_mel(wave, m.num_mel_bins)
        else:
          feats = audio_media.features_from_file(source, m.num_mel_bins, budget=m.budget)
        if feats.shape[1] == 0:
          raise MediaError(f"{label}: audio is empty")
        return DecodedPart(chat.AudioItem(int(feats.shape[1])), _media(audios=[feats]))
      video = video_media.preprocess_video(source, fps=m.video_fps, min_frames=m.video_min_frames,
                                           max_frames=m.video_max_frames, min_pixels=m.video_min_pixels,
                                           max_pixels=m.video_max_pixels, max_total_pixels=m.video_max_total_pixels,
                                           merge_size=self.fmt.spatial_merge_size, budget=m.budget)
      media = _media(videos=[(video.pixel_values, video.grid_thw, float(video.second_per_grid))])
      frames = None
      if part.get("use_audio_in_video", aiv):
        track = audio_media.video_audio_features(source, m.num_mel_bins, budget=m.budget)
        if track.shape[1] == 0:
          raise MediaError(f"{source}: the video's audio track is empty")
        media["audios"].append(track)  # the track's audio slot sits at its video's place in the order
        frames = int(track.shape[1])
      return DecodedPart(chat.VideoItem(tuple(int(g) for g in video.grid_thw), float(video.second_per_grid), frames),
                         media)
    except MediaError as e:
      raise SampleError("bad_media", f"{name}: {e}") from None

  def __call__(self, dataset: str, example: Mapping) -> Union[Sample, Pair]:
    rid, record, root = sources.decode_example(example)
    name = f"{dataset}/{rid}"
    if dataset in self.preference:
      return self.pair(name, record, root)
    try:
      conv = sources.normalize(record, root, name)
    except sources.RecordError as e:
      raise SampleError(e.reason, str(e)) from None
    media = _media()
    items = [self.load_part(part, conv["use_audio_in_video"], name, media)
             for m in conv["messages"] for part in m["content"] if part["type"] != "text"]
    return self._sample(name, conv["messages"], items, media, conv["speech_output"])

  def _sample(self, name: str, conversation, items, media: dict, speech_output: bool, pair: bool = False) -> Sample:
    """A conversation (media decoded into items / media) -> Sample. pair: the last message is a preference
    pair's reply: only it carries labels (the towers' targets are told, Targets.sample)."""
    messages = chat.with_system(conversation, speech_output, self.system_prompt)
    try:
      rendered = chat.render(messages, items, self.tokenizer, self.fmt)
    except chat.ChatError as e:
      raise SampleError("malformed", f"{name}: {e}") from None
    labels = rendered.labels
    if pair:  # the prompt's earlier assistant turns are the same in both: no loss there
      start, end = rendered.assistant_spans[-1]
      labels = np.full_like(labels, batch_lib.IGNORE)
      labels[start:end] = rendered.labels[start:end]
    aiv = any(isinstance(i, chat.VideoItem) and i.audio_frames is not None for i in items)
    found = {}
    for tower, maker in self.targets.items():
      try:
        target = maker.sample(name, messages, rendered.assistant_spans, pair)
      except towers.TargetError as e:
        raise SampleError(e.reason, str(e)) from None
      if target is not None:
        found[tower] = target
    return Sample(name, sample_kind(conversation), rendered.input_ids, labels, media["images"], media["videos"],
                  media["audios"], aiv, found)

  def pair(self, name: str, record: str, root: str) -> Pair:
    """A preference record -> Pair (omni_jax.input.pairs). The prompt's media are decoded once and shared."""
    try:
      p = pairs_lib.normalize_pair(record, root, name)
    except sources.RecordError as e:
      raise SampleError(e.reason, str(e)) from None
    prompt = [pairs_lib.unspoken(m) for m in p["prompt"]]
    aiv = p["use_audio_in_video"]
    media = _media()
    items = [self.load_part(part, aiv, name, media) for m in prompt for part in m["content"] if part["type"] != "text"]
    sides = []
    for side in ("chosen", "rejected"):
      reply = p[side]
      own = {k: list(v) for k, v in media.items()}  # each segment of the row carries its own media slots
      own_items = items + [self.load_part(part, aiv, name, own) for part in reply["content"] if part["type"] != "text"]
      sides.append(self._sample(f"{name}#{side}", prompt + [reply], own_items, own, p["speech_output"], pair=True))
    chosen, rejected = sides
    text = not np.array_equal(chosen.input_ids, rejected.input_ids)
    prefers = set()
    for tower, maker in self.targets.items():
      try:
        if maker.prefers(name, chosen.targets.get(tower), rejected.targets.get(tower), text):
          prefers.add(tower)
      except towers.TargetError as e:
        raise SampleError(e.reason, str(e)) from None
    if not text and not prefers:  # normalize_pair refused equal replies: they differ in their speech only
      raise SampleError("bad_pair", f"{name}: the chosen and rejected replies have the same text and they differ "
                                    "only in their speech, which no objective of this run learns from (docs/data.md, "
                                    "\"Preference pairs\"): nothing to prefer")
    chosen.pair = PairRole(True, text, frozenset(prefers))
    rejected.pair = PairRole(False, text, frozenset(prefers))
    return Pair(name, chosen, rejected)

"""Talker targets for the data pipeline: a sample's spoken reply -> a layout.SpokenReply (pure numpy; it runs in
the data workers), and the startup rule that keeps one speech-unit set per run.

A sample trains the Talker when an assistant message carries `speech` (its audio) and config.data.speech_codes
names a codes index (`python -m omni_jax.units encode`) holding that audio's ids, or carries `codes` (the ids
themselves, made with the run's unit set). The LAST such message is the Talker's reply; everything before it
(earlier turns, spoken or not) is its prompt. A spoken reply whose audio is not in the index is skipped and
counted (reason no_speech_codes), so a forgotten encode step shows up at once.

One unit set per run (settle_units): config.model.talker.units_version is the hash of the unit set the Talker is
trained on; it is taken from the codes index when unset, checked against the checkpoint the run resumes or
starts from, and stored with every checkpoint's config, so codes of another unit set are refused.
"""

import dataclasses
import os
from typing import Mapping, Optional, Sequence

import numpy as np

from omni_jax import towers
from omni_jax.talker.layout import CodecIds, SpokenReply

NO_CODES = "no_speech_codes"  # skip reason: a spoken reply whose audio the codes index does not hold
REASONS = (NO_CODES, "bad_speaker")  # the skips of towers.TargetError raised here (and "bad_pair")


@dataclasses.dataclass(frozen=True)
class SpeechTargets(towers.Targets):
  """Picklable: what the preprocessor needs to turn spoken replies into Talker targets."""
  codes_path: str
  units_version: str
  num_codes: int
  speakers: tuple[tuple[str, int], ...]
  default_speaker: str
  ids: CodecIds

  def _index(self):
    from omni_jax.units import codes  # pylint: disable=import-outside-toplevel

    index = _INDEX_CACHE.get(self.codes_path)
    if index is None:
      index = codes.CodeIndex.load(self.codes_path)
      codes.check_same_units(self.units_version, index.version, self.codes_path)
      _INDEX_CACHE[self.codes_path] = index
    return index

  def reply(self, name: str, messages: Sequence[Mapping], spans: Sequence[tuple[int, int]]) -> Optional[SpokenReply]:
    """The sample's Talker reply (None when no assistant message is spoken). spans: the rendered assistant
    messages' [start, end) token spans, in order (omni_jax.input.chat.Rendered.assistant_spans). Without a
    codes index (codes_path ""), only replies given as `codes` are spoken: a `speech` path trains the Thinker
    only, as in a run without config.data.speech_codes."""
    replies = [m for m in messages if m["role"] == "assistant"]
    spoken = [i for i, m in enumerate(replies) if m.get("codes") or (m.get("speech") and self.codes_path)]
    if not spoken:
      return None
    j = spoken[-1]
    message = replies[j]
    if message.get("codes"):
      ids, what = np.asarray(message["codes"], np.int64), "the reply's `codes`"
    else:
      ids, what = self._index().lookup(message["speech"]), f"the codes of {message['speech']}"
    if ids is None:
      raise towers.TargetError(NO_CODES, f"{name}: the speech {message['speech']} is not in the codes index "
                                         f"{self.codes_path} (run `python -m omni_jax.units encode` over this data)")
    if ids.size == 0 or (ids.max() >= self.num_codes):
      raise towers.TargetError(NO_CODES, f"{name}: {what} are empty or exceed "
                                         f"config.model.talker.num_codes={self.num_codes}")
    speaker = message.get("speaker", self.default_speaker)
    table = dict(self.speakers)
    if speaker not in table:
      raise towers.TargetError("bad_speaker", f"{name}: speaker {speaker!r} is not in config.model.talker.speakers "
                                              f"{sorted(table)}")
    start, end = spans[j]
    if end - start < 2:  # no content before <|im_end|>: nothing to say
      return None
    return SpokenReply(reply_start=start, reply_len=end - start, codes=ids.astype(np.int32),
                       speaker_token=table[speaker], ids=self.ids)

  def sample(self, name: str, messages: Sequence[Mapping], spans: Sequence[tuple[int, int]],
             pair: bool) -> Optional[SpokenReply]:
    """reply(); a preference pair's reply given as `speech` needs the codes index (its codes differ from the
    other reply's, or not, only in the index)."""
    if pair and not self.codes_path and messages[-1].get("speech"):
      raise towers.TargetError(NO_CODES, f"{name}: the speech {messages[-1]['speech']} needs a codes index "
                                         "(config.data.speech_codes: `python -m omni_jax.units encode`), or give "
                                         "the reply's `codes`")
    return self.reply(name, messages, spans)

  def prefers(self, name: str, chosen: Optional[SpokenReply], rejected: Optional[SpokenReply], text: bool) -> bool:
    """A pair trains the Talker when both replies are spoken (two code sequences, for a voice or a pace); then
    its codes must differ unless its texts do."""
    if (chosen is None) != (rejected is None):
      one = "chosen" if chosen is not None else "rejected"
      raise towers.TargetError("bad_pair", f"{name}: only the {one} reply is spoken; a pair that trains the Talker "
                                           "needs both replies spoken (`speech` or `codes`), or neither")
    if chosen is None:
      return False
    if not text and np.array_equal(chosen.codes, rejected.codes):
      raise towers.TargetError("bad_pair", f"{name}: the chosen and rejected replies have the same text and their "
                                           "speeches have the same codes: nothing to prefer")
    return True

  def bucket_sizes(self, seq_len: int) -> dict[str, int]:
    # A Talker row holds each spoken sample's prompt, two more rows and its codes, which outnumber the reply's
    # tokens: twice the Thinker row leaves room for them.
    return {"talker_seq_len": 2 * seq_len}


_INDEX_CACHE: dict = {}  # per process: one load of each codes index


def codec_ids(talker) -> CodecIds:
  """layout.CodecIds of a config.model.talker section (ConfigDict or TalkerConfig)."""
  get = talker.get if hasattr(talker, "get") else lambda k: getattr(talker, k)
  return CodecIds(bos=int(get("tts_codec_start_token_id")), eos=int(get("tts_codec_end_token_id")),
                  pad=int(get("tts_codec_pad_token_id")), text_eos=int(get("tts_text_end_token_id")),
                  text_pad=int(get("tts_text_pad_token_id")))


def from_config(config, without_index: bool = False) -> Optional[SpeechTargets]:
  """The run's SpeechTargets (None without a Talker or without config.data.speech_codes, unless without_index:
  then replies given as `codes` need no index). settle_units must have run (train.py / eval.py at startup), so
  units_version is set. Plain Python: the data path imports no jax."""
  talker = (config.get("model") or {}).get("talker", None)
  path = (config.get("data") or {}).get("speech_codes", None)
  if talker is None or not (path or without_index):
    return None
  speakers = tuple(sorted((str(k), int(v)) for k, v in dict(talker.get("speakers") or {}).items()))
  return SpeechTargets(os.path.abspath(os.path.expanduser(path)) if path else "", talker.get("units_version"),
                       int(talker.get("num_codes", 8192)), speakers, str(talker.get("default_speaker", "Chelsie")),
                       codec_ids(talker))


def _stored_units(path: Optional[str]) -> Optional[str]:
  """units_version of the config stored with a checkpoint (a workdir, step or params dir), if any."""
  if not path or not os.path.exists(path):
    return None
  from omni_jax import checkpoint  # pylint: disable=import-outside-toplevel

  try:
    stored = checkpoint.find_config(checkpoint.params_dir(path))
  except Exception:  # noqa: BLE001 - no checkpoint yet: nothing to check against
    return None
  if not stored:
    return None
  talker = checkpoint.load_config(stored).model.get("talker", None)
  return None if talker is None else talker.get("units_version", None)


def settle_units(config, workdir: Optional[str] = None) -> Optional[str]:
  """Fix config.model.talker.units_version for this run (see the module doc); returns it.

  Raises UnitsMismatch when the codes index, the config and the checkpoint the run resumes (workdir) or starts
  from (config.init_from) do not agree on one unit set.
  """
  from omni_jax.units import codes  # pylint: disable=import-outside-toplevel

  talker = config.model.get("talker", None)
  if talker is None:
    return None
  versions = []  # (what, version) that must agree
  if talker.get("units_version", None):
    versions.append(("config.model.talker.units_version", talker.units_version))
  for what, path in (("the checkpoint in " + str(workdir), workdir), ("config.init_from", config.get("init_from"))):
    stored = _stored_units(path)
    if stored:
      versions.append((what, stored))
  path = config.data.get("speech_codes", None) if "data" in config else None
  if path:
    index = codes.CodeIndex.load(os.path.expanduser(path))
    versions.append((path, index.version))
  if not versions:
    return None
  expected = versions[0][1]
  for what, version in versions[1:]:
    if version != expected:
      raise codes.UnitsMismatch(f"{what}: speech units {version}, but {versions[0][0]} has units {expected}; one "
                                "run trains on one unit set (re-encode the data with the checkpoint's units, or "
                                "start a new Talker)")
  config.model.talker.units_version = expected
  return expected

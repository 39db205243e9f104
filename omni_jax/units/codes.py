"""Encoded datasets: a content-addressed index of speech-unit ids, and the rule that refuses mixing unit sets.

codes.json = {"units_version": str, "vocab_size": int, "frame_rate": 50, "codes": {sha1 of the audio file's
bytes: [ids]}}. Keys are file contents, not paths, so a corpus can move or be copied and its codes still
apply; two paths holding the same bytes share one entry.

Consumers (Talker training) call check_same_units(units.version, index.version, "PATH") before reading
codes, so ids made by one unit set are never trained against another.
"""

import hashlib
import json
import os
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from omni_jax.units.base import FRAME_RATE, UnitsError

PathLike = Union[str, os.PathLike]


class UnitsMismatch(ValueError):
  """Codes made with one speech-unit set offered where another set's codes are expected."""


def check_same_units(expected_version: str, got_version: str, what: str) -> None:
  """Raise UnitsMismatch unless `what` (a file, a dataset name) was made with the expected unit set."""
  if expected_version != got_version:
    raise UnitsMismatch(f"{what}: its codes were made with speech units {got_version}, but this run uses units "
                        f"{expected_version}; re-encode it with `python -m omni_jax.units encode --units DIR` "
                        f"(codes of different unit sets cannot be mixed)")


def file_sha1(path: PathLike, block: int = 1 << 20) -> str:
  """sha1 hex digest of a file's bytes (streamed)."""
  h = hashlib.sha1()
  with open(path, "rb") as f:
    for piece in iter(lambda: f.read(block), b""):
      h.update(piece)
  return h.hexdigest()


class CodeIndex:
  """{sha1 of an audio file: int32 ids} made by one unit set (`version`)."""

  def __init__(self, units_version: str, vocab_size: int, frame_rate: int = FRAME_RATE,
               codes: Optional[Mapping[str, Sequence[int]]] = None):
    self.units_version, self.vocab_size, self.frame_rate = str(units_version), int(vocab_size), int(frame_rate)
    self._codes: dict[str, np.ndarray] = {}
    for key, ids in (codes or {}).items():
      self.add_hash(key, ids)

  @classmethod
  def for_units(cls, units) -> "CodeIndex":
    """An empty index for a SpeechUnits."""
    return cls(units.version, units.vocab_size, units.frame_rate)

  @property
  def version(self) -> str:
    return self.units_version

  def __len__(self) -> int:
    return len(self._codes)

  def __contains__(self, sha1: str) -> bool:
    return sha1 in self._codes

  def hashes(self) -> list[str]:
    return sorted(self._codes)

  def add_hash(self, sha1: str, ids) -> None:
    if not (isinstance(sha1, str) and len(sha1) == 40 and all(c in "0123456789abcdef" for c in sha1)):
      raise ValueError(f"codes key {sha1!r} is not a sha1 hex digest")
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
      raise ValueError(f"codes of {sha1}: must be a list of integer ids")
    ids = ids.astype(np.int32)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"codes of {sha1}: ids must lie in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
    self._codes[sha1] = ids

  def add(self, path: PathLike, ids) -> str:
    """Store the ids of an audio file under the sha1 of its bytes; returns the sha1."""
    sha1 = file_sha1(path)
    self.add_hash(sha1, ids)
    return sha1

  def lookup_hash(self, sha1: str) -> Optional[np.ndarray]:
    return self._codes.get(sha1)

  def lookup(self, path: PathLike) -> Optional[np.ndarray]:
    """The ids of an audio file (hashing its bytes), or None when the index has no entry for them."""
    return self.lookup_hash(file_sha1(path))

  def save(self, path: PathLike) -> None:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    body = {"units_version": self.units_version, "vocab_size": self.vocab_size, "frame_rate": self.frame_rate,
            "codes": {k: self._codes[k].tolist() for k in sorted(self._codes)}}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(body, f, separators=(",", ":"))
      f.write("\n")
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: PathLike) -> "CodeIndex":
    """Read a codes.json; a missing, unreadable or malformed file raises UnitsError naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise UnitsError(f"{path}: no such codes index")
    try:
      with open(path, encoding="utf-8") as f:
        body = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise UnitsError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(body, dict):
      raise UnitsError(f"{path}: must hold a JSON object")
    for key, kind in (("units_version", str), ("vocab_size", int), ("frame_rate", int), ("codes", dict)):
      if not isinstance(body.get(key), kind) or isinstance(body.get(key), bool):
        raise UnitsError(f"{path}: key {key!r} is missing or not a {kind.__name__}")
    try:
      return cls(body["units_version"], body["vocab_size"], body["frame_rate"], body["codes"])
    except ValueError as e:
      raise UnitsError(f"{path}: {e}") from None

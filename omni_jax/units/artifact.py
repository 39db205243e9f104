"""The speech-units artifact directory: units.json (+ the files it names), the content hash, the kind registry.

units.json holds `kind` (which SpeechUnits subclass reads the directory), `version`, `vocab_size`,
`frame_rate` and whatever the kind adds. `version` is 16 hex characters of a sha256 over the identity
metadata (what decides the ids, not the fit's provenance) and every array, by name, dtype and shape; load()
recomputes it, so a changed or damaged file is caught before it can produce ids.
"""

import hashlib
import json
import os
from typing import Any, Mapping, Type, Union

import numpy as np

from omni_jax.units.base import SpeechUnits, UnitsError

MANIFEST = "units.json"
_KINDS: dict[str, Type[SpeechUnits]] = {}

PathLike = Union[str, os.PathLike]


def register(cls: Type[SpeechUnits]) -> Type[SpeechUnits]:
  """Class decorator: units.json files with kind == cls.kind load through cls.load."""
  _KINDS[cls.kind] = cls
  return cls


def content_hash(identity: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str:
  h = hashlib.sha256()
  h.update(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode())
  for name in sorted(arrays):
    a = np.ascontiguousarray(arrays[name])
    h.update(f"\n{name}|{a.dtype.str}|{a.shape}\n".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def write_manifest(directory: PathLike, manifest: Mapping[str, Any]) -> None:
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, MANIFEST)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def read_manifest(directory: PathLike) -> dict:
  """units.json of an artifact directory; a missing directory/file or bad JSON raises UnitsError naming it."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise UnitsError(f"{directory}: no such speech-units directory")
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise UnitsError(f"{path}: missing (not a speech-units directory; `python -m omni_jax.units fit` writes one)")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UnitsError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
  if not isinstance(manifest, dict):
    raise UnitsError(f"{path}: must hold a JSON object")
  for key in ("kind", "version", "vocab_size", "frame_rate"):
    if key not in manifest:
      raise UnitsError(f"{path}: missing key {key!r}")
  return manifest


def require(manifest: Mapping, key: str, directory: PathLike, kind: type = object):
  if key not in manifest or not isinstance(manifest[key], kind):
    raise UnitsError(f"{os.path.join(os.fspath(directory), MANIFEST)}: key {key!r} is missing or not a "
                     f"{kind.__name__}")
  return manifest[key]


def load(directory: PathLike) -> SpeechUnits:
  """The SpeechUnits subclass that units.json's `kind` names, loaded from `directory`."""
  manifest = read_manifest(directory)
  kind = manifest["kind"]
  if kind not in _KINDS:
    raise UnitsError(f"{os.path.join(os.fspath(directory), MANIFEST)}: unknown kind {kind!r}; known: "
                     f"{sorted(_KINDS)}")
  return _KINDS[kind].load(directory)

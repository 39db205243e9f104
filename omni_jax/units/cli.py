"""`python -m omni_jax.units fit|encode`: fit speech units on a corpus, encode a corpus into a codes index.

  # k-means units over layer 1 of the tiny Thinker's audio tower (random init; --checkpoint for trained weights)
  python -m omni_jax.units fit --config configs/tiny.py --data 'corpus/jsonl/speech.*.jsonl' \\
      --layer 1 --vocab_size 64 --out units/tiny
  # every speech file of the records -> codes.json (content-addressed: sha1 of the file -> ids)
  python -m omni_jax.units encode --units units/tiny --data 'corpus/jsonl/*.jsonl' --out corpus/codes.json

Both print one summary line. A bad path, config or artifact is one `error: ...` line and exit code 2; an
audio file that cannot be decoded is skipped with a warning and counted.
"""

import os
import sys
from typing import Optional, Sequence

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "fit: Python config file (get_config()).",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "fit: workdir, step directory, converter output or "
                                  "transformers directory whose audio tower to copy (default: the config's "
                                  "seeded random init).")
_DATA = flags.DEFINE_multi_string("data", None, "JSONL record files or globs (repeat the flag for more).")
_USER_AUDIO = flags.DEFINE_bool("include_user_audio", False, "Also use the audio parts of user messages.")
_LAYER = flags.DEFINE_integer("layer", None, "fit: read the activations after this many audio-tower layers "
                              "(default: half of them).")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "fit: number of units (the released codec has 8192).")
_MAX_FRAMES = flags.DEFINE_integer("max_frames", 100_000, "fit: cluster a seeded uniform subset of at most this "
                                   "many 50 Hz frames.")
_ITERATIONS = flags.DEFINE_integer("iterations", 20, "fit: Lloyd iterations after k-means++ seeding.")
_SEED = flags.DEFINE_integer("seed", 0, "fit: seed of the frame subset and of k-means++.")
_UNITS = flags.DEFINE_string("units", None, "encode: a speech-units directory written by fit.")
_OUT = flags.DEFINE_string("out", None, "fit: the artifact directory to write; encode: the codes.json to write "
                           "(an existing one made with the same units is extended).")

COMMANDS = ("fit", "encode")


class UsageError(ValueError):
  """A missing or contradictory flag."""


def _warn(msg: str) -> None:
  print("warning: " + " ".join(msg.split()), file=sys.stderr)


def _speech(include_user_audio: bool):
  from omni_jax.units import corpus  # pylint: disable=import-outside-toplevel

  if not _DATA.value:
    raise UsageError("--data: give at least one JSONL file or glob")
  found = corpus.speech_files(_DATA.value, include_user_audio)
  if found.bad_records:
    _warn(f"skipped {found.bad_records} of {found.records} records that do not parse")
  if not found.paths:
    raise UsageError(f"--data: the {found.records} records hold no speech audio"
                     + ("" if include_user_audio else " (assistant `speech`; --include_user_audio adds user audio)"))
  return found.paths


def _features(paths: Sequence[str], num_mel_bins: int, skipped: list):
  """(path, log-mel features) of each readable file; unreadable ones go to `skipped` with a warning."""
  from omni_jax.input.media import MediaError  # pylint: disable=import-outside-toplevel
  from omni_jax.input.media import audio as audio_lib  # pylint: disable=import-outside-toplevel

  for path in paths:
    try:
      yield path, audio_lib.features_from_file(path, num_mel_bins)
    except MediaError as e:
      _warn(f"skipping {e}")
      skipped.append(path)


def _audio_tower(config, checkpoint: Optional[str]):
  """(the Thinker's AudioConfig, its audio-tower parameters) from a checkpoint or the config's init."""
  from omni_jax import sharding, towers  # pylint: disable=import-outside-toplevel
  from omni_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from omni_jax.models import audio, omni  # pylint: disable=import-outside-toplevel

  if checkpoint is not None:
    from omni_jax import loader  # pylint: disable=import-outside-toplevel

    config, _, params, _, _, _ = loader.restore(checkpoint, config)
    source = f"checkpoint {os.path.abspath(checkpoint)}"
  else:
    towers.validate(config)
    _, params, _ = omni.create_sharded(config, sharding.make_mesh(config.mesh))
    source = f"random init (config seed {config.get('seed', 0)})"
  audio_cfg = audio.thinker_audio(config)
  if audio_cfg is None:
    raise ConfigError("config.model.thinker.audio: the model has no audio tower to build speech units on")
  return audio_cfg, params["thinker"]["audio_tower"], source


def fit() -> str:
  from omni_jax.units.encoder import FrozenEncoder  # pylint: disable=import-outside-toplevel
  from omni_jax.units.kmeans import KMeansUnits  # pylint: disable=import-outside-toplevel

  if _CONFIG.value is None:
    raise UsageError("--config: fit needs a config file (e.g. configs/tiny.py)")
  if not _OUT.value:
    raise UsageError("--out: give the directory to write the units to")
  paths = _speech(_USER_AUDIO.value)
  audio_cfg, tower, source = _audio_tower(_CONFIG.value, _CHECKPOINT.value)
  layer = _LAYER.value if _LAYER.value is not None else max(1, audio_cfg.encoder_layers // 2)
  try:
    encoder = FrozenEncoder.from_tower(audio_cfg, tower, layer)
  except ValueError as e:
    raise UsageError(f"--layer: {e}") from None
  skipped: list = []
  units = KMeansUnits.fit(encoder, (f for _, f in _features(paths, audio_cfg.num_mel_bins, skipped)),
                          _VOCAB.value, seed=_SEED.value, max_frames=_MAX_FRAMES.value, iterations=_ITERATIONS.value,
                          fit_info={"data": list(_DATA.value), "include_user_audio": _USER_AUDIO.value,
                                    "source": source})
  units.save(_OUT.value)
  info = units.fit_info
  return (f"fit {units.kind} units on {info['files']} files ({len(skipped)} skipped), {info['frames_seen']} frames "
          f"({info['frames_used']} used), {info['seconds']:.1f} s; layer {units.layer}, vocab {units.vocab_size}, "
          f"version {units.version} -> {_OUT.value}")


def encode() -> str:
  from omni_jax import units as units_lib  # pylint: disable=import-outside-toplevel
  from omni_jax.units import codes  # pylint: disable=import-outside-toplevel

  if not _UNITS.value:
    raise UsageError("--units: give a speech-units directory (written by `fit`)")
  if not _OUT.value:
    raise UsageError("--out: give the codes.json path to write")
  units = units_lib.load(_UNITS.value)
  paths = _speech(_USER_AUDIO.value)
  index = codes.CodeIndex.for_units(units)
  if os.path.exists(_OUT.value):
    index = codes.CodeIndex.load(_OUT.value)
    codes.check_same_units(units.version, index.version, _OUT.value)
  skipped: list = []
  frames = files = reused = 0
  todo = []
  for path in paths:
    try:
      sha1 = codes.file_sha1(path)
    except OSError as e:
      _warn(f"skipping {path}: {e.strerror or e}")
      skipped.append(path)
      continue
    if sha1 in index:
      reused += 1
      frames += index.lookup_hash(sha1).size
      files += 1
    else:
      todo.append((path, sha1))
  by_path = dict(todo)
  for path, feats in _features([p for p, _ in todo], units.num_mel_bins, skipped):
    ids = units.encode_features(feats)
    index.add_hash(by_path[path], ids)
    frames += ids.size
    files += 1
  index.save(_OUT.value)
  return (f"encoded {files} files ({reused} already in the index, {len(skipped)} skipped), {frames} frames, "
          f"{frames / units.frame_rate:.1f} s with units {units.version} -> {_OUT.value}")


def main(argv: Sequence[str]) -> None:
  from omni_jax.units import codes  # pylint: disable=import-outside-toplevel

  command = argv[1:]
  if len(command) != 1 or command[0] not in COMMANDS:
    sys.stderr.write(f"error: give one command, {' or '.join(COMMANDS)} (got {' '.join(command) or 'none'})\n")
    sys.exit(2)
  try:
    print(fit() if command[0] == "fit" else encode())
  except (ValueError, FileNotFoundError, codes.UnitsMismatch) as e:  # user errors: ConfigError, UnitsError, ...
    sys.stderr.write("error: " + " ".join(str(e).split()) + "\n")
    sys.exit(2)


def _config_path(argv: Sequence[str]) -> Optional[str]:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def run(argv: Optional[Sequence[str]] = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  config = _config_path(argv)
  if config is not None and not os.path.isfile(config.split(":", 1)[0]):  # absl would print a multi-line trace
    sys.stderr.write(f"error: --config: {config} does not exist\n")
    sys.exit(2)
  app.run(main, argv=argv)

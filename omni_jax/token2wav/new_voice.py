"""The new-voice recipe's data step (docs/new_voice.md): one speaker's recordings with transcripts -> spoken-reply
conversations, the speaker's reference clip and the recipe's record (new_voice.json).

  # a folder of recordings: NAME.wav (or .flac / .mp3 / .ogg) + NAME.txt pairs, or a manifest.jsonl of
  # {"audio": path, "text": transcript} lines (paths relative to the manifest)
  python -m omni_jax.token2wav.new_voice prepare --recordings DIR --speaker Ada --out voices/ada
  # demo recordings in one eSpeak NG voice of the demo corpus (the recipe's test and docs use them)
  python -m data.new_voice_example --voice en-GB-scotland --count 12 --out voices/scotland_recordings

prepare writes into --out:
  voice.train.jsonl, voice.validation.jsonl   one record per recording: the user asks for the transcript to be
      said aloud, the assistant answers it with `speech` = the recording and `speaker` = the new name, so the
      Talker learns the voice's codes for the Thinker's text and the DiT learns the voice's mels
      (omni_jax/talker/targets.py, omni_jax/token2wav/targets.py read exactly these fields);
  reference.wav   the speaker's reference clip for the DiT's ECAPA encoder (--reference, else the longest
      recording of at most 10 s): what synthesis conditions on;
  new_voice.json  {speaker, bos_token, reference, train, validation, clips}: configs/recipes/new_voice.py reads it.
No jax: this runs anywhere; audio is decoded only to check it and to measure durations.

A checkpoint's voices, for a DiT trained here on clips whose run config names no references (the main job's,
configs/demo_token2wav.py: its spoken replies have one voice, the default speaker):
  python -m omni_jax.token2wav.new_voice voices --checkpoint WORKDIR/token2wav --clip [NAME=]CLIP ...
writes CHECKPOINT/speakers.safetensors (merged into one already there), where generate.py, chat.py and the
server look for voices (omni_jax/token2wav/voice.py): each NAME (default: the Talker's default_speaker) voiced
as training conditioned on its clip (zero cond, the clip's mel tiled to config.train.token2wav.ref_frames).
This step imports jax (the Token2Wav voice module).
"""

import argparse
import glob
import json
import os
import shutil
import sys
import zlib
from typing import Optional

RECORD = "new_voice.json"
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".m4a")
# A Thinker row no released token uses (the released voices sit at 151870 / 151872, the TTS specials at
# 151859-151861, the vocabulary has 151936 rows): the Talker's text track opens with it for the new voice.
DEFAULT_BOS = 151873
MAX_REFERENCE_S = 10.0
PROMPTS = ("Say this aloud: {}", "Read this out loud: {}", "Please say: {}", "Speak this sentence: {}")


class RecipeError(ValueError):
  """Bad recordings or arguments; the message names the file or flag."""


def _pairs_from_folder(folder: str) -> list[tuple[str, str]]:
  pairs, missing = [], []
  for path in sorted(glob.glob(os.path.join(folder, "*"))):
    stem, ext = os.path.splitext(path)
    if ext.lower() not in AUDIO_EXTENSIONS:
      continue
    if not os.path.isfile(stem + ".txt"):
      missing.append(os.path.basename(path))
      continue
    with open(stem + ".txt", encoding="utf-8") as f:
      pairs.append((os.path.abspath(path), " ".join(f.read().split())))
  if missing:
    print(f"warning: {len(missing)} recordings have no transcript (.txt) and are left out: {missing[:3]}",
          file=sys.stderr)
  return pairs


def _pairs_from_manifest(manifest: str) -> list[tuple[str, str]]:
  root, pairs = os.path.dirname(os.path.abspath(manifest)), []
  with open(manifest, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        audio, text = row["audio"], row["text"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise RecipeError(f"{manifest}:{n}: expected {{\"audio\": path, \"text\": transcript}} ({e})") from None
      pairs.append((os.path.abspath(os.path.join(root, os.path.expanduser(audio))), " ".join(str(text).split())))
  return pairs


def read_recordings(recordings: str) -> list[tuple[str, str]]:
  """[(absolute audio path, transcript)] of a folder (wav + txt pairs, or its manifest.jsonl) or a manifest."""
  if os.path.isdir(recordings):
    manifest = os.path.join(recordings, "manifest.jsonl")
    pairs = _pairs_from_manifest(manifest) if os.path.isfile(manifest) else _pairs_from_folder(recordings)
  elif os.path.isfile(recordings) and recordings.endswith(".jsonl"):
    pairs = _pairs_from_manifest(recordings)
  else:
    raise RecipeError(f"--recordings {recordings}: not a folder of audio + .txt pairs or a manifest .jsonl")
  pairs = [(a, t) for a, t in pairs if t]
  for audio, _ in pairs:
    if not os.path.isfile(audio):
      raise RecipeError(f"--recordings: {audio} does not exist")
  if not pairs:
    raise RecipeError(f"--recordings {recordings}: no recordings with a non-empty transcript")
  return pairs


def _duration(path: str) -> float:
  from omni_jax.input.media import audio as audio_media  # pylint: disable=import-outside-toplevel

  try:
    return len(audio_media.load_audio(path, 16000)) / 16000.0
  except Exception as e:  # noqa: BLE001 - one line naming the file
    raise RecipeError(f"{path}: cannot be decoded ({type(e).__name__}: {e})") from None


def prepare(recordings: str, speaker: str, out: str, *, reference: Optional[str] = None, validation: int = 1,
            bos_token: int = DEFAULT_BOS) -> dict:
  """The data step; returns the record written to out/new_voice.json."""
  if not speaker or not speaker.replace("_", "").replace("-", "").isalnum():
    raise RecipeError(f"--speaker {speaker!r}: use letters, digits, '-' and '_' (it becomes a config key)")
  pairs = read_recordings(recordings)
  if len(pairs) <= validation:
    raise RecipeError(f"--recordings: {len(pairs)} recordings, need more than --validation {validation}")
  durations = {a: _duration(a) for a, _ in pairs}
  # Held out by a hash of the file name: stable when recordings are added.
  order = sorted(pairs, key=lambda p: zlib.crc32(os.path.basename(p[0]).encode()))
  held = {a for a, _ in order[:validation]}
  os.makedirs(out, exist_ok=True)
  counts = {"train": 0, "validation": 0}
  files = {s: open(os.path.join(out, f"voice.{s}.jsonl"), "w", encoding="utf-8") for s in counts}
  try:
    for i, (audio, text) in enumerate(pairs):
      split = "validation" if audio in held else "train"
      record = {"id": f"{speaker}_{i:04d}", "messages": [
          {"role": "user", "content": PROMPTS[i % len(PROMPTS)].format(text)},
          {"role": "assistant", "content": text, "speech": audio, "speaker": speaker}]}
      files[split].write(json.dumps(record, ensure_ascii=False) + "\n")
      counts[split] += 1
  finally:
    for f in files.values():
      f.close()
  if reference is None:
    train = [a for a, _ in pairs if a not in held]
    short = [a for a in train if durations[a] <= MAX_REFERENCE_S]
    reference = max(short, key=durations.get) if short else min(train, key=durations.get)
  elif not os.path.isfile(reference):
    raise RecipeError(f"--reference {reference}: no such file")
  ref_out = os.path.join(out, "reference" + os.path.splitext(reference)[1].lower())
  shutil.copyfile(reference, ref_out)
  record = {"speaker": speaker, "bos_token": int(bos_token), "reference": os.path.abspath(ref_out),
            "reference_seconds": round(_duration(ref_out), 2), **counts,
            "clips": [a for a, _ in pairs if a not in held], "seconds": round(sum(durations.values()), 1)}
  with open(os.path.join(out, RECORD), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
  return record


def voices(checkpoint_path: str, clips: list[str]) -> dict:
  """The voices step (see the module doc): {name: clip} written to CHECKPOINT/speakers.safetensors."""
  from omni_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from omni_jax.token2wav import voice  # pylint: disable=import-outside-toplevel

  path = os.path.abspath(os.path.expanduser(checkpoint_path))
  where = checkpoint.find_config(checkpoint.params_dir(path))
  if where is None:
    raise RecipeError(f"--checkpoint {checkpoint_path}: no config.json stored with it")
  config = checkpoint.load_config(where)
  t2w = config.model.get("token2wav", None)
  if t2w is None:
    raise RecipeError(f"--checkpoint {checkpoint_path}: the model has no Token2Wav (config.model.token2wav)")
  talker = config.model.get("talker", None)
  known = dict(talker.get("speakers", None) or {}) if talker is not None else {}
  default = talker.get("default_speaker", None) if talker is not None else None
  ref_frames = ((config.get("train", None) or {}).get("token2wav", None) or {}).get("ref_frames", None)
  table, named = {}, {}
  for spec in clips:
    name, sep, clip = spec.partition("=")
    if not sep or os.sep in name or not name.replace("_", "").replace("-", "").isalnum():
      name, clip = default, spec  # a path (that may hold "=" itself)
    if not name:
      raise RecipeError(f"--clip {spec}: name the voice (NAME=CLIP): the model has no default speaker")
    if not os.path.isfile(clip):
      raise RecipeError(f"--clip {spec}: {clip} does not exist")
    if known and name not in known:
      print(f"warning: {name!r} is not one of the Talker's speakers {sorted(known)}: only Token2Wav can voice it",
            file=sys.stderr)
    try:
      table[name] = voice.voice_from_clip(clip, enc_emb_dim=int(t2w.dit.enc_emb_dim), ref_frames=ref_frames,
                                          name=name)
    except voice.VoiceError as e:
      raise RecipeError(str(e)) from None
    named[name] = os.path.abspath(clip)
  if not table:
    raise RecipeError("--clip: give at least one clip of a voice")
  voice.write_voices(os.path.join(path, voice.SPEAKERS_FILE), table)
  return named


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  a = sub.add_parser("prepare", help="recordings + transcripts -> conversations, reference clip, new_voice.json")
  a.add_argument("--recordings", required=True, help="folder of audio + .txt pairs (or manifest.jsonl), or a manifest")
  a.add_argument("--speaker", required=True, help="the new voice's name (config.model.talker.speakers key)")
  a.add_argument("--out", required=True)
  a.add_argument("--reference", default=None, help="the reference clip (default: longest recording <= 10 s)")
  a.add_argument("--validation", type=int, default=1, help="recordings held out for the eval loss")
  a.add_argument("--bos_token", type=int, default=DEFAULT_BOS, help="an unused Thinker row for the voice")
  v = sub.add_parser("voices", help="a checkpoint's voices from clips: CHECKPOINT/speakers.safetensors")
  v.add_argument("--checkpoint", required=True, help="training workdir, step directory or parameters checkpoint")
  v.add_argument("--clip", action="append", required=True,
                 help="[NAME=]CLIP: a recording of the voice NAME (default: the Talker's default_speaker); repeatable")
  args = p.parse_args(argv)
  try:
    if args.command == "prepare":
      r = prepare(args.recordings, args.speaker, args.out, reference=args.reference, validation=args.validation,
                  bos_token=args.bos_token)
      print(f"voice {r['speaker']}: {r['train']} train + {r['validation']} validation recordings ({r['seconds']} s), "
            f"reference {r['reference']} ({r['reference_seconds']} s) -> {args.out}")
    else:
      named = voices(args.checkpoint, args.clip)
      print(f"voices {', '.join(f'{n} ({c})' for n, c in sorted(named.items()))} -> "
            f"{os.path.join(args.checkpoint, 'speakers.safetensors')}")
  except (RecipeError, FileNotFoundError) as err:  # FileNotFoundError: no checkpoint (CheckpointError is one)
    print(f"error: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())

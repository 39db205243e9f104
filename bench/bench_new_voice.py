"""Speaker similarity of the new-voice recipe (docs/new_voice.md): resemblyzer cosine similarity of the voice the
recipe synthesises against that voice's reference and against another voice, beside the same measure on real
recordings (the ceiling and the floor of this embedding on these voices), all in one process.

  .venv/bin/pip install -e ".[eval]"   # optional (or --no-deps resemblyzer webrtcvad-wheels); weights in the wheel
  .venv/bin/python bench/bench_new_voice.py --steps 300 [--voice en-GB-scotland --other en-US --count 16]

Runs the recipe's own commands on eSpeak NG recordings of the demo sentences: data.new_voice_example, new_voice
prepare, units fit + encode, train.py (configs/recipes/new_voice.py, the tiny model from scratch, Talker + DiT), then voices
(a) each held-out recording's own units with the trained DiT ("resynthesis": the DiT's voice alone) and (b) a
full spoken reply (Thinker text -> Talker codes -> DiT), through the Griffin-Lim fallback.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402


def _run(*args):
  t = time.perf_counter()
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
  if proc.returncode:
    sys.exit(f"{' '.join(args[:3])} failed:\n{proc.stderr[-3000:]}")
  return time.perf_counter() - t


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--voice", default="en-GB-scotland", help="the new voice (an eSpeak NG voice of the demo corpus)")
  # The floor: another voice. eSpeak NG's male English voices are near each other for resemblyzer (0.86-0.88
  # against a Scottish reference, where the same voice's other sentences score 0.89); its female variant is not.
  p.add_argument("--other", default="en-US+f3", help="another voice, for the floor")
  p.add_argument("--count", type=int, default=16, help="recordings of the new voice")
  p.add_argument("--validation", type=int, default=3, help="of which held out (resynthesised)")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--workdir", default=None)
  args = p.parse_args()
  try:
    from resemblyzer import VoiceEncoder, preprocess_wav  # noqa: PLC0415
  except ImportError:
    sys.exit("resemblyzer is not installed: .venv/bin/pip install -e '.[eval]'")
  from omni_jax.units import codes as codes_lib  # noqa: PLC0415
  from data import new_voice_example  # noqa: PLC0415
  from omni_jax.token2wav import new_voice  # noqa: PLC0415

  work = args.workdir or tempfile.mkdtemp(prefix="bench_new_voice_")
  rec, other, out, run = (os.path.join(work, d) for d in ("recordings", "other", "voice", "run"))
  new_voice_example.example(args.voice, rec, args.count)
  shutil.rmtree(other, ignore_errors=True)
  new_voice_example.example(args.other, other, 4)
  record = new_voice.prepare(rec, "NewVoice", out, validation=args.validation)
  cfg = f"configs/recipes/new_voice.py:dir={out}"
  times = {}
  if not os.path.isfile(f"{out}/codes.json"):  # a rerun on the same --workdir measures again, trains nothing
    times["units"] = _run("-m", "omni_jax.units", "fit", "--config", cfg, "--data", f"{out}/voice.train.jsonl",
                          "--vocab_size", "64", "--out", f"{out}/units")
    times["units"] += _run("-m", "omni_jax.units", "encode", "--units", f"{out}/units", "--data",
                           f"{out}/voice.*.jsonl", "--out", f"{out}/codes.json")
  if not os.path.isdir(os.path.join(run, "checkpoints", str(args.steps))):
    times["train"] = _run("train.py", "--config", cfg, "--workdir", run, f"--config.train.steps={args.steps}",
                          "--config.train.eval_every=0", f"--config.train.checkpoint_every={args.steps}")
  with open(os.path.join(run, "metrics.jsonl")) as f:
    metrics = [json.loads(line) for line in f if "train/token2wav_flow/loss" in line]

  from omni_jax.generate import api  # noqa: PLC0415
  from omni_jax.token2wav import voice as voice_lib  # noqa: PLC0415

  model = api.load(run)
  index = codes_lib.CodeIndex.load(f"{out}/codes.json")
  with open(f"{out}/voice.validation.jsonl") as f:
    held = [json.loads(line)["messages"][-1]["speech"] for line in f]
  synth = []
  t = time.perf_counter()
  for i, path in enumerate(held):
    v = model.voice(index.lookup(path), "NewVoice", seed=i)
    synth.append(voice_lib.write_wav(os.path.join(work, f"resynth_{i}.wav"), v.audio))
  reply = api.speak_to_file(model, "Say this aloud: the bus stops by the old bridge.", os.path.join(work, "reply.json"),
                            wav_out=os.path.join(work, "reply.wav"), require_wav=True, max_new_tokens=16,
                            talker_max_new_tokens=200)
  times["synthesis"] = time.perf_counter() - t
  # The same voicing with an untrained Token2Wav (random init of the same config): what training added.
  from flax import nnx  # noqa: PLC0415
  from omni_jax.token2wav import tower as token2wav_tower  # noqa: PLC0415

  fresh = token2wav_tower.Token2Wav(token2wav_tower.view(model.config), rngs=nnx.Rngs(0))
  untrained = voice_lib.Voicer(fresh, model.voicer.voices, vocoder="griffin_lim", sampler=model.voicer.sampler)
  baseline = [voice_lib.write_wav(os.path.join(work, f"untrained_{i}.wav"),
                                  untrained(index.lookup(path), "NewVoice", seed=i).audio)
              for i, path in enumerate(held)]

  enc = VoiceEncoder("cpu", verbose=False)
  embed = lambda path: enc.embed_utterance(preprocess_wav(path))  # noqa: E731 - unit-norm d-vectors
  ref = embed(record["reference"])
  other_ref = np.mean([embed(os.path.join(other, f)) for f in sorted(os.listdir(other)) if f.endswith(".wav")], 0)
  other_ref /= np.linalg.norm(other_ref)
  rows = {"real held-out recordings": held, "DiT resynthesis of their units": synth,
          "full spoken reply (Thinker -> Talker -> DiT)": [os.path.join(work, "reply.wav")],
          "untrained DiT, same units and voice": baseline}
  print(f"new voice {args.voice} ({record['train']} train recordings, {record['seconds']} s), other voice "
        f"{args.other}; {args.steps} steps, flow loss {metrics[0]['train/token2wav_flow/loss']:.2f} -> "
        f"{metrics[-1]['train/token2wav_flow/loss']:.2f}, talker loss {metrics[0]['train/talker_codes/loss']:.2f} "
        f"-> {metrics[-1]['train/talker_codes/loss']:.2f}; reply {len(reply.codes)} codes")
  print(f"{'resemblyzer cosine similarity':48s} {'vs own reference':>17s} {'vs other voice':>15s} {'margin':>7s}")
  table = {}
  for name, paths in rows.items():
    e = [embed(x) for x in paths]
    own, oth = float(np.mean([x @ ref for x in e])), float(np.mean([x @ other_ref for x in e]))
    table[name] = (own, oth)
    print(f"{name:48s} {own:17.3f} {oth:15.3f} {own - oth:7.3f}")
  real, res = table["real held-out recordings"], table["DiT resynthesis of their units"]
  print(f"ratio resynthesis / real: own {res[0] / real[0]:.2f}, margin {(res[0] - res[1]) / (real[0] - real[1]):.2f}")
  print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + f"; files in {work}")


if __name__ == "__main__":
  main()

"""Demo recordings for the new-voice recipe (docs/new_voice.md): demo sentences spoken by one eSpeak NG voice.

    python -m data.new_voice_example --voice en-GB-scotland --count 12 --out voices/scotland_recordings

Writes NAME.wav + NAME.txt pairs into --out, the folder layout that
`python -m omni_jax.token2wav.new_voice prepare --recordings` reads.
"""

import argparse
import os
import sys

import numpy as np
import soundfile

from data import demo_texts, espeak


def example(voice: str, out: str, count: int = 12) -> list[str]:
  """`count` demo-corpus sentences spoken by eSpeak NG voice `voice`, as NAME.wav + NAME.txt pairs in `out`."""
  sentences = [s for v, s in demo_texts.SENTENCES if v == "en"] + [a for _, a in demo_texts.SPOKEN_QA]
  if count > len(sentences):
    raise ValueError(f"--count {count}: the demo texts hold {len(sentences)} English sentences")
  os.makedirs(out, exist_ok=True)
  names = []
  for i, text in enumerate(sentences[:count]):
    wave, rate = espeak.synthesize(text, voice)
    name = os.path.join(out, f"{voice}_{i:03d}")
    soundfile.write(name + ".wav", np.asarray(wave), rate)
    with open(name + ".txt", "w", encoding="utf-8") as f:
      f.write(text + "\n")
    names.append(name + ".wav")
  return names


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--voice", default="en-GB-scotland", help="an eSpeak NG voice (default: %(default)s)")
  parser.add_argument("--count", type=int, default=12, help="how many sentences (default: %(default)s)")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  try:
    names = example(args.voice, args.out, args.count)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{len(names)} recordings in eSpeak NG voice {args.voice} -> {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""A terminal conversation with a checkpoint (omni_jax/serve/terminal.py): replies stream as they are generated.

  python chat.py --checkpoint workdirs/tiny_demo
  > /image photo.jpg            attach files to the next message (/audio F, /video F too)
  > What is in the picture?
  > /speak on                   spoken replies, each written as reply_<n>.wav (24 kHz) under --out_dir
  > And what colour is it?      the conversation goes on in the same session (its cache is reused)
  > /quit

Lines may also come from a pipe: `printf '/image a.png\\nDescribe it.\\n' | python chat.py --checkpoint ...`.

Ctrl-C while a reply streams stops that reply and brings the prompt back (the conversation goes on); Ctrl-C at
the prompt leaves (exit status 0); Ctrl-C while the model loads leaves once it has loaded (status 130; twice:
at once). A message whose attachment cannot be decoded is not sent (omni_jax/serve/terminal.py).
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from omni_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Optional Python config file (get_config()).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, step directory, converter output or HF directory.")
_SPEAKER = flags.DEFINE_string("speaker", None, "Voice of spoken replies (default: the model's default_speaker).")
_SPEAK = flags.DEFINE_bool("speak", False, "Start with spoken replies on (/speak on|off).")
_OUT_DIR = flags.DEFINE_string("out_dir", ".", "Where spoken replies are written (reply_<n>.wav).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Default: config.generate.max_new_tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature.")
_TOP_P = flags.DEFINE_float("top_p", None, "Top-p (nucleus) filter (1: off).")
_GREEDY = flags.DEFINE_bool("greedy", False, "Greedy decoding instead of sampling.")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed (default: config.generate.seed).")
flags.mark_flags_as_required(["checkpoint"])


def main(argv):
  del argv
  from omni_jax.generate import api  # noqa: PLC0415
  from omni_jax.serve import terminal  # noqa: PLC0415

  os.makedirs(_OUT_DIR.value, exist_ok=True)
  generation = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                    seed=_SEED.value, do_sample=False if _GREEDY.value else None)
  # Ctrl-C only sets a flag from here on (terminal.Interrupts): while the model loads and compiles, a
  # KeyboardInterrupt inside jax could crash the process. A press while loading leaves once it is done.
  with terminal.Interrupts() as interrupts:
    interrupts.second_leaves = True
    model = api.load(_CHECKPOINT.value, _CONFIG.value)
    chat = terminal.Terminal(model, speaker=_SPEAKER.value, out_dir=_OUT_DIR.value, speak=_SPEAK.value,
                             generation=generation, interrupts=interrupts)
    interrupts.second_leaves = False
    if interrupts.pressed:
      print("[interrupted while loading]", file=sys.stderr, flush=True)
      raise SystemExit(130)
    chat.run(sys.stdin)


if __name__ == "__main__":
  cli.run(main, also=(ValueError,))

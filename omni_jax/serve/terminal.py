"""A terminal conversation with a model (chat.py): one OmniSession, so every turn reuses the cache.

  /image F, /audio F, /video F   attach a file to the next message (several may be attached)
  /speak on|off                  spoken replies: each is written as reply_<n>.wav (24 kHz) in the output folder
  /reset                         forget the conversation
  /quit                          leave (as does the end of input)
Any other line is the user's message; the reply's text is printed as it streams.
"""

import os
import sys
from typing import Optional, TextIO

_ATTACH = {"/image": "image", "/audio": "audio", "/video": "video"}


class Terminal:
  """Reads lines, keeps the conversation (OmniSession), prints replies to `out` and problems to `err`."""

  def __init__(self, model, *, speaker: Optional[str] = None, out_dir: str = ".", speak: bool = False,
               generation: Optional[dict] = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr):
    from omni_jax.serve.session import OmniSession  # noqa: PLC0415

    self.model, self.speaker, self.out_dir, self.speak = model, speaker, out_dir, speak
    self.generation = {k: v for k, v in (generation or {}).items() if v is not None}
    self.out, self.err = out, err
    self.session = OmniSession(model, speaker=speaker)
    if speak and model.config.model.get("talker", None) is None:
      self.warn("this model has no Talker: replies are text only")
      self.speak = False
    self.attached: list[dict] = []
    self.replies = 0  # spoken or not: reply_<n>.wav is numbered by the reply

  def say(self, text: str) -> None:
    print(text, file=self.out, flush=True)

  def warn(self, text: str) -> None:
    print("error: " + text, file=self.err, flush=True)

  def command(self, line: str) -> bool:
    """Handle one /command; False when the user leaves."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit"):
      return False
    if name in _ATTACH:
      if not arg:
        self.warn(f"{name} needs a file: {name} PATH")
      elif not os.path.isfile(os.path.expanduser(arg)):
        self.warn(f"{name}: {arg}: no such file")
      else:
        self.attached.append({"type": _ATTACH[name], "path": os.path.expanduser(arg)})
        self.say(f"[{_ATTACH[name]} {arg} attached to the next message]")
    elif name == "/speak":
      if arg not in ("on", "off"):
        self.warn("/speak on|off")
      elif arg == "on" and self.model.config.model.get("talker", None) is None:
        self.warn("this model has no Talker: it cannot speak")
      else:
        self.speak = arg == "on"
        self.say(f"[speech {arg}]")
    elif name == "/reset":
      self.session.reset()
      self.attached = []
      self.say("[conversation cleared]")
    else:
      self.warn(f"unknown command {name}; commands: /image F, /audio F, /video F, /speak on|off, /reset, /quit")
    return True

  def message(self, text: str) -> None:
    """One user turn: push the attachments and the text, stream the reply (and write its speech)."""
    parts, self.attached = self.attached + [{"type": "text", "text": text}], []
    try:
      self.session.push_message({"role": "user", "content": parts})
      audio = []
      for event in self.session.respond(speak=self.speak, **self.generation):
        if event.kind == "text":
          print(event.payload, end="", file=self.out, flush=True)
        elif event.kind == "audio":
          audio.append(event.payload)
    except ValueError as e:  # SessionError (a bad file, a full cache) or a bad setting: the turn is dropped
      print(file=self.out, flush=True)
      self.warn(" ".join(str(e).split()))
      if self.session.closed:  # a failed decode gave its cache away: start over
        from omni_jax.serve.session import OmniSession  # noqa: PLC0415

        self.session = OmniSession(self.model, speaker=self.speaker)
        self.warn("the conversation was reset")
      return
    print(file=self.out, flush=True)
    self.replies += 1
    if self.speak:
      if not audio:
        self.say("[no audio: this model makes speech codes only (no Token2Wav or no voice for the speaker)]")
        return
      import numpy as np  # noqa: PLC0415

      from omni_jax.token2wav import voice  # noqa: PLC0415

      wave = np.concatenate(audio)
      path = voice.write_wav(os.path.join(self.out_dir, f"reply_{self.replies}.wav"), wave)
      self.say(f"[spoken reply: {path}, {len(wave) / voice.SAMPLE_RATE:.2f} s]")

  def run(self, lines) -> None:
    interactive = hasattr(lines, "isatty") and lines.isatty()
    while True:
      if interactive:
        print("> ", end="", file=self.out, flush=True)
      line = lines.readline()
      if not line:
        break
      line = line.strip()
      if not line:
        continue
      if line.startswith("/"):
        if not self.command(line):
          break
        continue
      self.message(line)
    self.session.close()

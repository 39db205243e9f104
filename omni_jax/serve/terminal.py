"""A terminal conversation with a model (chat.py): one OmniSession, so every turn reuses the cache.

  /image F, /audio F, /video F   attach a file to the next message (several may be attached)
  /speak on|off                  spoken replies: each is written as reply_<n>.wav (24 kHz) in the output folder
  /reset                         forget the conversation
  /quit                          leave (as does the end of input)
Any other line is the user's message; the reply's text is printed as it streams.

Ctrl-C while a reply streams stops it: the prompt comes back at once and the conversation goes on. The decode
loop runs inside one compiled program that the host cannot cut short, so it finishes in the background and
the whole reply (past what was printed) stays in the conversation; the next turn waits for it. Ctrl-C at the
prompt leaves (exit status 0). SIGINT only sets a flag (Interrupts) except while the prompt waits for a line:
a KeyboardInterrupt raised in the middle of jax tracing or an XLA compile, or an exit while the decode thread
still runs, can crash the process.

A message that fails (a file that does not decode, a full cache) leaves nothing behind: its attachments are
decoded before anything is prefilled, so a bad one drops the message whole; a failure after part of the
message reached the cache (the session cannot take a prefill back) starts a new conversation and says so.
"""

import os
import signal
import sys
import threading
from typing import Optional, TextIO

_ATTACH = {"/image": "image", "/audio": "audio", "/video": "video"}


class Interrupts:
  """SIGINT for the terminal, as a context manager (a no-op off the main thread, where signals cannot be set).

  While `at_prompt` is set (the terminal waits for a line) Ctrl-C raises KeyboardInterrupt; at any other time
  it sets `pressed`, which the reply loop reads between events, so it never lands inside jax or XLA. With
  `second_leaves` (chat.py while the model loads) a second press ends the process at once (os._exit: no
  interpreter teardown under running XLA threads)."""

  def __init__(self):
    self.pressed = False
    self.at_prompt = False
    self.second_leaves = False
    self._previous = None

  def __enter__(self) -> "Interrupts":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None

  def _handle(self, signum, frame) -> None:
    del signum, frame
    if self.at_prompt:
      raise KeyboardInterrupt
    if self.pressed and self.second_leaves:
      os._exit(130)
    self.pressed = True


class Terminal:
  """Reads lines, keeps the conversation (OmniSession), prints replies to `out` and problems to `err`."""

  def __init__(self, model, *, speaker: Optional[str] = None, out_dir: str = ".", speak: bool = False,
               generation: Optional[dict] = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
               interrupts: Optional[Interrupts] = None):
    from omni_jax.serve.session import OmniSession  # noqa: PLC0415

    self.model, self.speaker, self.out_dir, self.speak = model, speaker, out_dir, speak
    self.generation = {k: v for k, v in (generation or {}).items() if v is not None}
    self.out, self.err = out, err
    self.interrupts = interrupts
    self.session = OmniSession(model, speaker=speaker)
    if speak and model.config.model.get("talker", None) is None:
      self.warn("this model has no Talker: replies are text only")
      self.speak = False
    self.attached: list[dict] = []
    self.replies = 0  # spoken or not: reply_<n>.wav is numbered by the reply
    self._finishing: Optional[threading.Thread] = None  # a stopped reply's decode, finishing in the background
    self._finish_error: Optional[BaseException] = None

  def say(self, text: str) -> None:
    print(text, file=self.out, flush=True)

  def warn(self, text: str) -> None:
    print("error: " + text, file=self.err, flush=True)

  @property
  def _pressed(self) -> bool:
    return self.interrupts is not None and self.interrupts.pressed

  def _new_session(self, why: str) -> None:
    from omni_jax.serve.session import OmniSession  # noqa: PLC0415

    if not self.session.closed:
      self.session.close()
    self.session = OmniSession(self.model, speaker=self.speaker)
    self.warn(f"the conversation was reset ({why})")

  def settle(self) -> None:
    """Wait for a stopped reply's decode to finish (the session is busy until then)."""
    if self._finishing is None:
      return
    self._finishing.join()
    self._finishing, error = None, self._finish_error
    self._finish_error = None
    if error is not None:
      self.warn("the stopped reply failed: " + " ".join(str(error).split()))
    if self.session.closed:  # a failed decode gave its cache away
      self._new_session("the stopped reply failed")

  def _stop(self, events) -> None:
    """Stop streaming a reply: closing its event iterator lets the session adopt the reply once the decode
    ends, on a thread, so the prompt comes back now."""

    def close():
      try:
        events.close()
      except BaseException as e:  # noqa: BLE001 - reported by settle(), on the main thread
        self._finish_error = e

    self._finishing = threading.Thread(target=close, name="stopped-reply")
    self._finishing.start()

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
      self.settle()
      self.session.reset()
      self.attached = []
      self.say("[conversation cleared]")
    else:
      self.warn(f"unknown command {name}; commands: /image F, /audio F, /video F, /speak on|off, /reset, /quit")
    return True

  def _decoded(self, part: dict) -> dict:
    """An attachment decoded before anything is prefilled (once: the session takes the result), so a bad file
    fails here: audio as 16 kHz samples, images and videos preprocessed. Raises ValueError."""
    from omni_jax.input.media import audio as audio_media  # noqa: PLC0415

    pre = self.model.preprocessor
    if part["type"] == "audio":
      wave = audio_media.load_audio(part["path"], budget=pre.options.budget)
      if wave.size == 0:
        raise ValueError(f"{part['path']}: audio is empty")
      return {"type": "audio", "array": wave, "sample_rate": audio_media.SAMPLE_RATE}
    return dict(part, decoded=pre.decode_part(part, False, "chat"))

  def message(self, text: str) -> None:
    """One user turn: push the attachments and the text, stream the reply (and write its speech)."""
    attached, self.attached = self.attached, []
    try:
      parts = [self._decoded(p) for p in attached] + [{"type": "text", "text": text}]
    except (ValueError, OSError) as e:  # MediaError / SampleError: the message is dropped, nothing was sent
      self.warn(" ".join(str(e).split()))
      self.warn("the message was not sent (its attachments are dropped)")
      return
    self.settle()
    before, stopped, audio = self.session.num_tokens, False, []
    try:
      self.session.push_message({"role": "user", "content": parts})
      # A press during the prefill stops the reply at its first event: the turn is in the cache and is only
      # closed by the reply.
      events = self.session.respond(speak=self.speak, **self.generation)
      for event in events:
        if self._pressed:
          stopped = True
          self._stop(events)
          break
        if event.kind == "text":
          print(event.payload, end="", file=self.out, flush=True)
        elif event.kind == "audio":
          audio.append(event.payload)
    except ValueError as e:  # SessionError (a bad file, a full cache) or a bad setting: the turn is dropped
      print(file=self.out, flush=True)
      self.warn(" ".join(str(e).split()))
      if self.session.closed:
        self._new_session("a failed decode gave its cache away")
      elif self.session.num_tokens != before:  # part of the message is in the cache, with no way back
        self._new_session("it held part of the failed message")
      return
    print(file=self.out, flush=True)
    self.replies += 1
    if stopped:
      self.say("[reply stopped]")
      return
    if self.speak:
      if not audio:
        self.say("[no audio: this model makes speech codes only (no Token2Wav or no voice for the speaker)]")
        return
      import numpy as np  # noqa: PLC0415

      from omni_jax.token2wav import voice  # noqa: PLC0415

      wave = np.concatenate(audio)
      path = voice.write_wav(os.path.join(self.out_dir, f"reply_{self.replies}.wav"), wave)
      self.say(f"[spoken reply: {path}, {len(wave) / voice.SAMPLE_RATE:.2f} s]")

  def _read(self, lines, interactive: bool) -> str:
    """The next line; KeyboardInterrupt for Ctrl-C at the prompt."""
    if self.interrupts is not None:
      self.interrupts.pressed = False  # a press after a reply ended or while a command ran is spent
      self.interrupts.at_prompt = True
    try:
      if self.interrupts is not None and self.interrupts.pressed:  # pressed since the line above
        raise KeyboardInterrupt
      if interactive:
        print("> ", end="", file=self.out, flush=True)
      return lines.readline()
    finally:
      if self.interrupts is not None:
        self.interrupts.at_prompt = False

  def run(self, lines) -> None:
    """The conversation until /quit, the end of input or Ctrl-C at the prompt. SIGINT is handled here (see
    the module doc) unless the caller passed its own Interrupts."""
    own = self.interrupts is None and threading.current_thread() is threading.main_thread()
    if own:
      self.interrupts = Interrupts().__enter__()
    try:
      self._loop(lines)
    finally:
      self.settle()
      self.session.close()
      if own:
        self.interrupts.__exit__(None, None, None)
        self.interrupts = None

  def _loop(self, lines) -> None:
    interactive = hasattr(lines, "isatty") and lines.isatty()
    while True:
      try:
        line = self._read(lines, interactive)
      except KeyboardInterrupt:
        print(file=self.out, flush=True)
        return
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

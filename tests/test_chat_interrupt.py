"""chat.py in a pseudo-terminal: Ctrl-C stops a streaming reply and the conversation goes on; Ctrl-C at the
prompt leaves with status 0; a message whose attachment does not decode leaves nothing in the conversation.

The terminal's line discipline turns \\x03 into SIGINT for chat.py, as a user's keyboard does.
"""

import os
import pty
import re
import select
import subprocess
import sys
import termios
import time

import pytest

import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The child side: a new session whose controlling terminal is the pty (so \x03 becomes SIGINT), then chat.py.
_CHILD = ("import os, sys; os.setsid(); fd = os.open(sys.argv[1], os.O_RDWR); [os.dup2(fd, i) for i in (0, 1, 2)]; "
          "os.close(fd); os.execv(sys.executable, [sys.executable, 'chat.py', *sys.argv[2:]])")


class Pty:
  """chat.py on the child side of a pty (echo off, so the output holds only what chat.py writes)."""

  def __init__(self, args):
    self.fd, child = pty.openpty()
    attrs = termios.tcgetattr(self.fd)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
    # One CPU device: the conftest's eight make each decode step a collective over eight devices.
    env = xla_env.env(1)
    self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, os.ttyname(child), *args], cwd=ROOT, env=env,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(child)
    self.text = ""

  def _read(self, timeout: float) -> bool:
    """Reads what is there within timeout; False once the child has closed the terminal."""
    ready, _, _ = select.select([self.fd], [], [], timeout)
    if not ready:
      return True
    try:
      data = os.read(self.fd, 65536)
    except OSError:  # EIO: no process holds the terminal any more
      return False
    self.text += data.decode("utf-8", "replace").replace("\r\n", "\n")
    return bool(data)

  def expect(self, pattern: str, start: int, timeout: float = 300) -> re.Match:
    """The first match of pattern in the output from `start` on, waiting up to timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
      m = re.compile(pattern).search(self.text, start)
      if m:
        return m
      left = deadline - time.monotonic()
      if left <= 0 or (not self._read(min(left, 1.0)) and self.proc.poll() is not None):
        raise AssertionError(f"no {pattern!r} in chat.py's output:\n{self.text[-4000:]}")

  def send(self, text: str) -> int:
    """Type text; returns where the output after it starts."""
    while select.select([self.fd], [], [], 0)[0] and self._read(0):
      pass
    start = len(self.text)
    os.write(self.fd, text.encode())
    return start

  def wait(self, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while self.proc.poll() is None:
      if time.monotonic() > deadline:
        raise AssertionError(f"chat.py did not exit:\n{self.text[-4000:]}")
      self._read(0.2)
    return self.proc.returncode

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
    os.close(self.fd)


@pytest.fixture
def chat(tiny_speech_checkpoint):
  try:
    for fd in os.openpty():
      os.close(fd)
  except OSError as e:  # a sandbox without /dev/ptmx
    pytest.skip(f"no pseudo-terminal: {e}")
  sessions = []

  def start(*args):
    sessions.append(Pty(["--checkpoint", tiny_speech_checkpoint, "--greedy", *args]))
    return sessions[-1]

  yield start
  for s in sessions:
    s.close()


PROMPT = r"(?:^|\n)> $"


@pytest.mark.slow
def test_ctrl_c_stops_the_reply_and_the_conversation_goes_on(chat, tmp_path):
  # A long greedy reply (the random model never stops by itself): Ctrl-C as soon as its text streams.
  term = chat("--max_new_tokens", "600", "--out_dir", str(tmp_path))
  term.expect(PROMPT, 0)
  # The first reply compiles its programs: Ctrl-C lands while XLA compiles (once chat.py has read the line:
  # the terminal drops unread input on Ctrl-C), and the reply stops at its first token.
  term.send("Tell me a story.\n")
  time.sleep(0.5)
  stop = term.send("\x03")
  term.expect(r"\[reply stopped\]\n> $", stop, timeout=300)
  # Ctrl-C while the text streams.
  start = term.send("Tell me a long story.\n")
  term.expect(r"\S", start)
  stop = term.send("\x03")
  term.expect(r"\[reply stopped\]\n> $", stop, timeout=60)
  assert term.proc.poll() is None, term.text[-3000:]
  # The next turn works on the same conversation (it first waits for the stopped decode to end).
  start = term.send("And then?\n")
  reply = term.expect(r"(?s)(.+?)\n> $", start, timeout=300).group(1)
  assert reply.strip() and "error" not in reply and "Traceback" not in reply, term.text[-3000:]
  assert "reply stopped" not in reply and "conversation was reset" not in term.text
  term.send("/quit\n")
  assert term.wait() == 0, term.text[-3000:]
  assert "Traceback" not in term.text and "Segmentation" not in term.text


@pytest.mark.slow
def test_failed_message_leaves_nothing_and_ctrl_c_at_the_prompt_leaves(chat, tmp_path):
  import numpy as np  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415

  good, bad = str(tmp_path / "good.png"), str(tmp_path / "bad.png")
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), np.uint8)).save(good)
  with open(bad, "w") as f:
    f.write("not an image\n")
  term = chat("--max_new_tokens", "6")
  term.expect(PROMPT, 0)

  def turn(line):
    start = term.send(line + "\n")
    return term.expect(r"(?s)(.*?)\n> $", start).group(1)

  # A good image then a bad one: the message fails whole, before the good image reaches the cache.
  turn("/image " + good)
  turn("/image " + bad)
  failed = turn("Hello.")
  assert "cannot decode image" in failed, failed
  after_failure = turn("Hello.")
  turn("/reset")
  fresh = turn("Hello.")
  # Greedy: the reply after the failed message is the first reply of a fresh conversation (no image carried).
  assert after_failure.strip() and after_failure == fresh, (after_failure, fresh)
  assert "the message was not sent" in failed, failed
  term.send("\x03")
  assert term.wait() == 0, term.text[-3000:]
  assert "Traceback" not in term.text


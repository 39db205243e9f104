"""Issue 14, point 8: the set-up (run.sh) leaves an environment without broken packages (so pip prints no
`ERROR` about dashscope's dependencies), the tokenizer finds qwen.tiktoken without dashscope installed, and
the documented `tensorboard --logdir WORKDIR` starts and serves a run's scalars."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request


from omni_jax.input import tokenizer
from omni_jax.train import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def test_the_ranks_come_from_the_environment_and_no_package_is_broken():
  assert tokenizer.bundled_ranks_path() == tokenizer.RANKS_FILE
  assert len(tokenizer.load_ranks(tokenizer.RANKS_FILE)) == tokenizer.NUM_RANKS
  assert importlib.util.find_spec("dashscope") is None  # not installed: its dependencies are not wanted
  out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr  # what `pip install` would print as an ERROR


def _setup_function(name):
  """The text of one shell function of run.sh."""
  lines, inside = [], False
  for line in open(os.path.join(ROOT, "run.sh")):
    inside = inside or line.startswith(f"{name}() {{")
    if inside:
      lines.append(line)
      if line.rstrip() == "}":
        break
  assert lines, name
  return "".join(lines)


def test_the_setup_takes_qwen_tiktoken_out_of_the_wheel(tmp_path):
  venv_bin = tmp_path / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  for tool in ("pip", "python"):
    os.symlink(os.path.join(BIN, tool), venv_bin / tool)
  script = _setup_function("bpe_ranks") + "bpe_ranks\n"
  out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr
  assert "ERROR" not in out.stdout + out.stderr
  got = tmp_path / ".venv" / "share" / "omni_jax" / "qwen.tiktoken"
  assert got.read_bytes() == open(tokenizer.RANKS_FILE, "rb").read()
  assert not any(p.name.startswith("dashscope") for p in (tmp_path / ".venv").rglob("*"))  # nothing installed


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_tensorboard_serves_a_runs_scalars(tmp_path):
  exe = os.path.join(BIN, "tensorboard")
  assert os.path.exists(exe) or shutil.which("tensorboard"), "tensorboard is not installed (setup.cfg)"
  writer = metrics.Writer(str(tmp_path))
  for step, loss in ((1, 2.5), (2, 2.0)):
    writer.write(step, {"train/loss": loss})
  writer.close()
  port = _free_port()
  log = open(tmp_path / "tensorboard.log", "w")
  proc = subprocess.Popen([exe if os.path.exists(exe) else "tensorboard", "--logdir", str(tmp_path), "--host",
                           "localhost", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
  try:
    url = f"http://localhost:{port}/data/plugin/scalars/scalars?run=tensorboard&tag=train/loss"
    end, body = time.time() + 120, None
    while time.time() < end and proc.poll() is None:
      try:
        with urllib.request.urlopen(url, timeout=5) as r:
          body = json.loads(r.read())
        if body:
          break
      except (OSError, ValueError):
        pass
      time.sleep(0.5)
    assert proc.poll() is None, (tmp_path / "tensorboard.log").read_text()
    assert [(s, v) for _, s, v in body] == [(1, 2.5), (2, 2.0)], body
    with urllib.request.urlopen(f"http://localhost:{port}/", timeout=5) as r:
      assert r.status == 200 and b"<html" in r.read().lower()
  finally:
    proc.terminate()
    proc.wait(timeout=30)

"""The import graph keeps its floors: setup.cfg's import-linter contract holds, with no exceptions, and names
every top-level module of the library (a new module must take its floor)."""

import configparser
import os
import pkgutil
import re
import subprocess
import sys

import omni_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def floors() -> list[set[str]]:
  config = configparser.ConfigParser()
  config.read(os.path.join(ROOT, "setup.cfg"))
  contract = config["importlinter:contract:floors"]
  assert "ignore_imports" not in contract and "unmatched_ignore_imports_alerting" not in contract
  return [set(re.split(r"\s*\|\s*", line.strip())) for line in contract["layers"].strip().splitlines()]


def test_every_module_has_a_floor():
  named = set().union(*floors())
  modules = {m.name for m in pkgutil.iter_modules(omni_jax.__path__)}
  assert modules - named == set(), "top-level modules on no floor of setup.cfg's import contract"
  assert named - modules == set(), "floors naming modules that do not exist"


def test_imports_point_down():
  lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
  out = subprocess.run([lint, "--config", os.path.join(ROOT, "setup.cfg")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
  assert "1 kept, 0 broken" in out.stdout

"""tests/xla_env.py: the XLA_FLAGS of the test processes and of the processes they start."""

import os

import jaxlib
import xla_env


def test_flags_set_the_device_count_and_keep_the_rest(monkeypatch):
  monkeypatch.setenv(xla_env._ANSWER, xla_env.COMPILE_FLAGS)  # pylint: disable=protected-access
  base = "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8"
  assert xla_env.flags(4, base).split() == [
      "--xla_dump_to=/tmp/x", "--xla_force_host_platform_device_count=4", xla_env.COMPILE_FLAGS]
  assert xla_env.flags(None, base).split() == base.split() + [xla_env.COMPILE_FLAGS]  # base's own count
  assert xla_env.flags(1, "").split() == ["--xla_force_host_platform_device_count=1", xla_env.COMPILE_FLAGS]
  # A caller that sets the emitters itself keeps its choice.
  assert xla_env.flags(2, "--xla_cpu_use_fusion_emitters=true").split() == [
      "--xla_cpu_use_fusion_emitters=true", "--xla_force_host_platform_device_count=2"]
  env = xla_env.env(2, {"XLA_FLAGS": base, "PATH": "p"}, JAX_PLATFORMS="cpu")
  assert env == {"XLA_FLAGS": xla_env.flags(2, base), "PATH": "p", "JAX_PLATFORMS": "cpu"}


def test_this_session_compiles_with_the_flag_where_jaxlib_knows_it():
  # jaxlib 0.10 (what Python 3.11, CI's, installs) knows the flag, and this process runs with it; jaxlib 0.11
  # dropped it (the fusion emitters are its only ones), and there the tests run without it.
  knows = tuple(int(x) for x in jaxlib.__version__.split(".")[:2]) < (0, 11)
  assert xla_env.compile_flags() == (xla_env.COMPILE_FLAGS if knows else "")
  assert (xla_env.COMPILE_FLAGS in os.environ["XLA_FLAGS"].split()) == knows


def test_a_flag_this_jaxlib_does_not_know_is_left_out(monkeypatch):
  # XLA aborts a process on an unknown flag: the probe process takes that, and the tests run without it.
  monkeypatch.setattr(xla_env, "COMPILE_FLAGS", "--xla_no_such_flag_for_the_probe=true")
  monkeypatch.delenv(xla_env._ANSWER)  # pylint: disable=protected-access
  assert xla_env.compile_flags() == ""
  assert "--xla_no_such_flag" not in xla_env.flags(1, "")

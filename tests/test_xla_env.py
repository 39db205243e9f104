"""tests/xla_env.py: the XLA_FLAGS of the test processes and of the processes they start."""

import os

import jaxlib
import xla_env

EMITTERS, OPT_LEVEL = xla_env.COMPILE_FLAGS


def test_flags_set_the_device_count_and_keep_the_rest(monkeypatch):
  monkeypatch.setenv(xla_env._ANSWER, " ".join(xla_env.COMPILE_FLAGS))  # pylint: disable=protected-access
  base = "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8"
  assert xla_env.flags(4, base).split() == [
      "--xla_dump_to=/tmp/x", "--xla_force_host_platform_device_count=4", EMITTERS, OPT_LEVEL]
  assert xla_env.flags(None, base).split() == base.split() + [EMITTERS, OPT_LEVEL]  # base's own count
  assert xla_env.flags(1, "").split() == ["--xla_force_host_platform_device_count=1", EMITTERS, OPT_LEVEL]
  # A caller that sets a flag itself keeps its choice.
  assert xla_env.flags(2, "--xla_cpu_use_fusion_emitters=true").split() == [
      "--xla_cpu_use_fusion_emitters=true", "--xla_force_host_platform_device_count=2", OPT_LEVEL]
  assert xla_env.flags(None, "--xla_backend_optimization_level=2").split() == [
      "--xla_backend_optimization_level=2", EMITTERS]
  env = xla_env.env(2, {"XLA_FLAGS": base, "PATH": "p"}, JAX_PLATFORMS="cpu")
  assert env == {"XLA_FLAGS": xla_env.flags(2, base), "PATH": "p", "JAX_PLATFORMS": "cpu"}


def test_a_process_with_its_own_opt_level_gets_none_of_the_tests(monkeypatch):
  monkeypatch.setenv(xla_env._ANSWER, " ".join(xla_env.COMPILE_FLAGS))  # pylint: disable=protected-access
  assert xla_env.flags(1, "", own_opt_level=True).split() == ["--xla_force_host_platform_device_count=1", EMITTERS]
  # Started from a test process, whose own XLA_FLAGS carry the tests' level: that one is dropped, not a caller's.
  test_process = xla_env.flags(8, "")
  assert OPT_LEVEL in test_process.split()
  assert OPT_LEVEL not in xla_env.env(1, {"XLA_FLAGS": test_process}, own_opt_level=True)["XLA_FLAGS"].split()
  assert xla_env.flags(1, "--xla_backend_optimization_level=2", own_opt_level=True).split() == [
      "--xla_backend_optimization_level=2", "--xla_force_host_platform_device_count=1", EMITTERS]


def test_this_session_compiles_with_the_flags_where_jaxlib_knows_them():
  # jaxlib 0.10 (what Python 3.11, CI's, installs) knows both flags, and this process runs with them; jaxlib 0.11
  # dropped the emitters flag (the fusion emitters are its only ones), and there the tests run without that one.
  knows = tuple(int(x) for x in jaxlib.__version__.split(".")[:2]) < (0, 11)
  want = [EMITTERS, OPT_LEVEL] if knows else [OPT_LEVEL]
  assert xla_env.compile_flags().split() == want
  assert [f for f in os.environ["XLA_FLAGS"].split() if f in xla_env.COMPILE_FLAGS] == want


def test_a_flag_this_jaxlib_does_not_know_is_left_out(monkeypatch):
  # XLA aborts a process on an unknown flag: the probe processes take that, and the tests run without it (and
  # with the flags it does know).
  monkeypatch.setattr(xla_env, "COMPILE_FLAGS", ("--xla_no_such_flag_for_the_probe=true", OPT_LEVEL))
  monkeypatch.delenv(xla_env._ANSWER)  # pylint: disable=protected-access
  assert xla_env.compile_flags() == OPT_LEVEL
  assert "--xla_no_such_flag" not in xla_env.flags(1, "")

"""Importing omni_jax on a machine without a TPU keeps jax off its TPU backend (JAX_PLATFORMS=cpu when unset),
so libtpu (installed by the `tpu` extra for the AOT tests) prints no initialisation errors; a JAX_PLATFORMS the
user set, even empty, is left alone."""

import glob
import os
import subprocess
import sys

import pytest

import omni_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOW = "import os, jax; print(os.environ.get('JAX_PLATFORMS'), jax.devices()[0].platform)"


def _run(code: str, **env_changes) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env.update(env_changes)
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)


@pytest.mark.skipif(any(glob.glob(p) for p in omni_jax._TPU_NODES) or  # noqa: SLF001
                    any(os.path.exists(p) for p in omni_jax._GPU_NODES),  # noqa: SLF001
                    reason="an accelerator is attached: jax keeps its own choice")
@pytest.mark.parametrize("order", ["omni_jax first", "jax first"])
def test_no_tpu_initialisation_errors_without_a_tpu(order):
  imports = "import omni_jax.cli; import jax" if order == "omni_jax first" else "import jax; import omni_jax.cli"
  out = _run(imports + "; print(jax.devices()[0].platform)")
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["cpu"], out.stdout
  noise = [line for line in out.stderr.splitlines() if "TPU" in line or "libtpu" in line]
  assert not noise, out.stderr[-3000:]


def test_a_jax_platforms_the_user_set_is_kept():
  out = _run("import omni_jax; " + SHOW, JAX_PLATFORMS="cpu")
  assert out.returncode == 0 and out.stdout.split() == ["cpu", "cpu"], out.stderr[-3000:]
  out = _run("import omni_jax, os; print(repr(os.environ['JAX_PLATFORMS']))", JAX_PLATFORMS="")
  assert out.returncode == 0 and out.stdout.strip() == "''", out.stderr[-3000:]

"""Configs build, carry the released dimensions, accept command-line overrides and fail fast when wrong."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import qwen2_5_omni_3b, qwen2_5_omni_7b, tiny
from omni_jax import cli
from omni_jax import config as config_lib
from omni_jax import towers
from omni_jax.errors import ConfigError
from omni_jax.input import preprocess, sources
from omni_jax.models import omni


def _count(state, prefix):
  return sum(int(np.prod(v.get_value().shape)) for p, v in nnx.to_flat_state(state)
             if ".".join(map(str, p)).startswith(prefix))


def test_7b_thinker_text_has_the_released_size():
  _, abstract = omni.abstract_model(qwen2_5_omni_7b.get_config())
  # The released 7B checkpoint: text ≈ 7.07 B inside thinker.model, lm_head 0.545 B (152064 x 3584).
  assert _count(abstract, "thinker.lm_head") == 152064 * 3584
  text = _count(abstract, "thinker.model.embed_tokens") + _count(abstract, "thinker.model.layers") + \
      _count(abstract, "thinker.model.norm")
  assert abs(text / 1e9 - 7.07) < 0.01, text


def test_3b_thinker_text_dimensions():
  c = qwen2_5_omni_3b.get_config()
  text = config_lib.thinker_text(c)
  assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
          text.head_dim, text.vocab_size) == (2048, 36, 16, 2, 128, 151936)


@pytest.mark.parametrize("key,value,message", [
    ("mrope_section", (2, 3, 4), r"model.thinker.text.mrope_section: \[2, 3, 4\] sums to 9, must equal head_dim/2 = 8"),
    ("num_key_value_heads", 3, r"num_attention_heads=4 is not divisible by num_key_value_heads=3"),
    ("hidden_size", 0, r"model.thinker.text.hidden_size: must be a positive integer, got 0"),
])
def test_invalid_text_config_names_the_key(key, value, message):
  c = tiny.get_config()
  c.model.thinker.text[key] = value
  with pytest.raises(ConfigError, match=message):
    towers.validate(c)


def test_invalid_runtime_and_sharding_config_names_the_key():
  c = tiny.get_config()
  c.model.dtype = "float8"
  with pytest.raises(ConfigError, match=r"config.model.dtype: unknown dtype 'float8'"):
    towers.validate(c)
  c = tiny.get_config()
  c.model.remat_policy = "sometimes"
  with pytest.raises(ConfigError, match=r"config.model.remat_policy: unknown policy"):
    towers.validate(c)
  c = tiny.get_config()
  c.sharding_rules = c.sharding_rules + (("embed", ("pipeline",)),)
  with pytest.raises(ConfigError, match=r"rule for 'embed' names unknown mesh axes \['pipeline'\]"):
    towers.validate(c)
  c = tiny.get_config()
  c.mesh.pipeline = 2
  with pytest.raises(ConfigError, match=r"config.mesh: unknown axes \['pipeline'\]"):
    towers.validate(c)
  c = tiny.get_config()
  c.model.attention_impl = "flash2"
  with pytest.raises(ConfigError, match=r"config.model.attention_impl: must be one of .*got 'flash2'"):
    towers.validate(c)


def test_config_and_errors_import_no_higher_floor():
  """omni_jax.errors imports nothing (no jax); omni_jax.config imports neither layers nor sharding."""
  code = ("import sys, omni_jax.errors; assert 'jax' not in sys.modules; import omni_jax.config; "
          "assert not [m for m in sys.modules if m.startswith(('omni_jax.layers', 'omni_jax.sharding'))]")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_all_shipped_configs_validate():
  for module in (tiny, qwen2_5_omni_3b, qwen2_5_omni_7b):
    towers.validate(module.get_config())


def test_command_line_override(tmp_path):
  """--config.x=y overrides reach the config (ml_collections config_flags, as train.py uses them)."""
  script = tmp_path / "show.py"
  script.write_text(
      "from absl import app, flags\n"
      "from ml_collections import config_flags\n"
      "C = config_flags.DEFINE_config_file('config')\n"
      "def main(_):\n"
      "  print(C.value.model.thinker.text.num_hidden_layers, C.value.model.dtype)\n"
      "app.run(main)\n")
  r = subprocess.run([sys.executable, str(script), "--config=configs/tiny.py",
                      "--config.model.thinker.text.num_hidden_layers=5", "--config.model.dtype=bfloat16"],
                     capture_output=True, text=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == ["5", "bfloat16"]


@pytest.mark.parametrize("error", [
    ConfigError("config.train.steps: must be a positive integer"),
    sources.DataError("dataset 'x': nope.jsonl does not exist"),
    preprocess.SampleError("malformed", "x.jsonl:3: no messages"),
    FileNotFoundError("no such checkpoint"),
])
def test_user_errors_end_with_one_line(error, capsys):
  """The entry points print a UserError (or a missing file) as one line and exit 2; anything else is a bug."""
  with pytest.raises(SystemExit) as exit_info:
    with cli.user_errors():
      raise error
  assert exit_info.value.code == cli.USER_ERROR
  assert capsys.readouterr().err == f"error: {error}\n"
  with pytest.raises(KeyError):
    with cli.user_errors():
      raise KeyError("a bug keeps its traceback")

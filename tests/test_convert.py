"""HF checkpoint <-> omni_jax: exact round trips, the command line, and errors that list the bad keys."""

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import hf_reference as ref
from omni_jax.convert import hf
from omni_jax.convert.rules import CheckpointMismatch
from omni_jax.models import omni

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _converted_keys(hf_dir):
  """On-disk keys of the towers the config builds (the round trip covers exactly those)."""
  config = hf.config_from_hf(hf.read_config(hf_dir))
  _, abstract = omni.abstract_model(config)
  return set(k[len("thinker."):] for k in hf.state_to_tensors(hf.load_state(hf_dir, abstract)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("hf")
  ref.build_thinker("gqa4", seed=3).save_pretrained(d)
  return str(d)


def test_round_trip_is_bit_exact(hf_dir, tmp_path):
  config = hf.config_from_hf(hf.read_config(hf_dir))
  _, abstract = omni.abstract_model(config)
  hf.save(tmp_path, config, hf.load_state(hf_dir, abstract))
  before, after = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(tmp_path / "model.safetensors")
  keys = _converted_keys(hf_dir)
  assert set(after) == keys and len(keys) == 3 * 12 + 3 + (9 + 2 * 15) + (6 + 2 * 16)  # text + audio + vision
  for k in keys:
    assert after[k].dtype == before[k].dtype and np.array_equal(after[k], before[k]), k


def test_bfloat16_round_trip_and_sharded_output(hf_dir, tmp_path):
  src = tmp_path / "bf16"
  src.mkdir()
  tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(os.path.join(hf_dir, "model.safetensors")).items()}
  save_file(tensors, src / "model.safetensors")
  (src / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
  config = hf.config_from_hf(hf.read_config(src))
  _, abstract = omni.abstract_model(config)
  out = tmp_path / "out"
  hf.save(out, config, hf.load_state(str(src), abstract), dtype=ml_dtypes.bfloat16, max_shard_bytes=20_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  after = {}
  for f in set(index["weight_map"].values()):
    after.update(load_file(out / f))
  for k, v in after.items():
    assert v.dtype == ml_dtypes.bfloat16 and np.array_equal(v.view(np.uint16), tensors[k].view(np.uint16)), k


def test_command_line_both_ways_and_transformers_reloads(hf_dir, tmp_path):
  orbax_dir, back = tmp_path / "orbax", tmp_path / "back"
  for args in (["--hf_dir", hf_dir, "--out_dir", str(orbax_dir)], ["--orbax_dir", str(orbax_dir), "--out_dir", str(back)]):
    r = subprocess.run([sys.executable, "-m", "omni_jax.convert", *args], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
  after = load_file(back / "model.safetensors")
  before = load_file(os.path.join(hf_dir, "model.safetensors"))
  assert all(np.array_equal(after[k], before[k]) for k in after)
  from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration
  # The tiny encoders' sizes come from the source config: a text-only config.json would make transformers
  # initialise full-size default encoders, which takes a minute on CPU.
  reloaded = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
      back, config=Qwen2_5OmniThinkerConfig.from_pretrained(hf_dir)).eval()
  original = ref.build_thinker("gqa4", seed=3)
  ids = torch.tensor(ref.text_ids(np.random.default_rng(0), 1, 8, 160))
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(input_ids=ids).logits.numpy(), original(input_ids=ids).logits.numpy())


def test_tower_not_built_is_reported(hf_dir, tmp_path, caplog):
  """A full-model checkpoint (thinker. + talker. keys) loads; the talker, not built yet, is reported."""
  tensors = {"thinker." + k: v for k, v in load_file(os.path.join(hf_dir, "model.safetensors")).items()}
  tensors["talker.codec_head.weight"] = np.zeros((4, 2), np.float32)
  save_file(tensors, tmp_path / "model.safetensors")
  thinker = json.loads(open(os.path.join(hf_dir, "config.json")).read())
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni", "thinker_config": thinker}))
  config = hf.config_from_hf(hf.read_config(tmp_path))
  _, abstract = omni.abstract_model(config)
  state = hf.load_state(str(tmp_path), abstract)
  assert len(hf.state_to_tensors(state, config=config)) == len(tensors) - 1
  assert any("1 tensors of the talker are not converted" in r.message for r in caplog.records)


def _corrupt(hf_dir, tmp_path, edit):
  d = tmp_path / "bad"
  d.mkdir()
  tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
  edit(tensors)
  save_file(tensors, d / "model.safetensors")
  (d / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
  config = hf.config_from_hf(hf.read_config(d))
  return d, omni.abstract_model(config)[1]


def test_missing_key_is_listed(hf_dir, tmp_path):
  d, abstract = _corrupt(hf_dir, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(CheckpointMismatch, match=r"1 missing: \['thinker.model.layers.1.mlp.up_proj.weight'\]"):
    hf.load_state(str(d), abstract)


def test_unknown_key_is_listed(hf_dir, tmp_path):
  d, abstract = _corrupt(hf_dir, tmp_path, lambda t: t.update({"model.layers.0.mystery.weight": np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointMismatch, match=r"1 unknown: \['thinker.model.layers.0.mystery.weight'\]"):
    hf.load_state(str(d), abstract)


def test_shape_mismatch_is_listed(hf_dir, tmp_path):
  def shrink(t):
    t["model.norm.weight"] = t["model.norm.weight"][:-1]
  d, abstract = _corrupt(hf_dir, tmp_path, shrink)
  with pytest.raises(CheckpointMismatch, match=r"model.norm.weight: checkpoint \(31,\) vs model \(32,\)"):
    hf.load_state(str(d), abstract)


def test_missing_directory_fails_clearly(tmp_path):
  r = subprocess.run([sys.executable, "-m", "omni_jax.convert", "--hf_dir", str(tmp_path / "nope"), "--out_dir",
                      str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode != 0 and "config.json: missing" in r.stderr


def test_config_json_round_trip(hf_dir):
  config = hf.config_from_hf(hf.read_config(hf_dir))
  again = hf.config_from_hf(hf.config_to_hf(config))
  assert again.model.thinker.to_dict() == config.model.thinker.to_dict()

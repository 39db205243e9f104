"""HF import/export of the Talker and the speaker table (omni_jax.convert; spk_dict.pt <-> speakers).

A full tiny transformers checkpoint (Thinker + Talker + Token2Wav, spk_dict.pt) -> orbax -> HF is bit-exact for
every Thinker and Talker tensor and for the speaker table (names, bos ids, tensor dtypes and values); the
talker_config round-trips; transformers' Qwen2_5OmniForConditionalGeneration loads the export with the same
weights; spk_dict.pt is read without torch (equal to torch.load, dtypes kept); a spk_dict.pt holding pickled
code is refused without running it.
"""

import ast
import json
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

import hf_reference as ref
from omni_jax import checkpoint
from omni_jax.convert import cli, hf, speakers, torch_pickle

pytestmark = pytest.mark.parity
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tensors(directory) -> dict:
  out = {}
  for name in os.listdir(directory):
    if name.endswith(".safetensors"):
      with safe_open(os.path.join(directory, name), framework="numpy") as f:
        out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  model = ref.build_omni(seed=7)
  model.speaker_map["Ethan"]["ref_mel"] = model.speaker_map["Ethan"]["ref_mel"].to(torch.float16)  # dtypes kept
  path = tmp_path_factory.mktemp("hf_full")
  model.save_pretrained(path)
  torch.save(model.speaker_map, path / speakers.SPK_FILE)
  return path


def test_full_model_round_trip_is_bit_exact_and_loads_in_transformers(hf_dir, tmp_path):
  cli.main(["--hf_dir", str(hf_dir), "--out_dir", str(tmp_path / "orbax")])
  config = checkpoint.load_config(str(tmp_path / "orbax"))
  assert dict(config.model.talker.speakers) == ref.SPEAKERS
  assert config.model.talker.default_speaker == "Chelsie"
  assert config.model.talker.num_codes == 112  # below the lowest special codec id (pad 112)
  assert os.path.isfile(tmp_path / "orbax" / speakers.TENSORS_FILE)

  cli.main(["--orbax_dir", str(tmp_path / "orbax"), "--out_dir", str(tmp_path / "hf")])
  source, exported = _tensors(hf_dir), _tensors(tmp_path / "hf")
  kept = source  # Thinker, Talker and Token2Wav
  assert sorted(exported) == sorted(kept)
  assert any(k.startswith("talker.") for k in exported)
  for k, v in kept.items():
    assert exported[k].dtype == v.dtype and np.array_equal(exported[k], v), k

  src_cfg, out_cfg = hf.read_config(hf_dir), hf.read_config(tmp_path / "hf")
  assert out_cfg["model_type"] == "qwen2_5_omni" and out_cfg["enable_audio_output"]
  for part in ("dit_config", "bigvgan_config"):  # ours over the source's: the same values where both say them
    mine, theirs = out_cfg["token2wav_config"][part], src_cfg["token2wav_config"][part]
    for key, value in theirs.items():
      if key in mine and key not in ("rope_parameters",):
        assert mine[key] == value, (part, key)
  for key, value in out_cfg["talker_config"].items():
    if key in src_cfg["talker_config"]:
      assert src_cfg["talker_config"][key] == value, key
  # And back: the exported config.json gives the same model config.
  again = hf.config_from_hf(out_cfg)
  assert again.model.talker.to_dict() == hf.config_from_hf(src_cfg).model.talker.to_dict()
  assert again.model.token2wav.to_dict() == hf.config_from_hf(src_cfg).model.token2wav.to_dict()

  table, original = speakers.read_spk_dict(tmp_path / "hf" / speakers.SPK_FILE), torch.load(
      hf_dir / speakers.SPK_FILE, weights_only=True)
  assert sorted(table) == sorted(original)
  for name, entry in original.items():
    assert table[name]["bos_token"] == entry["bos_token"]
    for k in ("cond", "ref_mel"):
      assert_same_tensor(table[name][k], entry[k])

  from transformers import Qwen2_5OmniForConditionalGeneration  # noqa: PLC0415

  loaded = Qwen2_5OmniForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
  assert sorted(loaded.speaker_map) == sorted(original)
  weights = {f"talker.{k}": v for k, v in loaded.talker.state_dict().items()}
  for k, v in weights.items():
    if k in kept:
      assert np.array_equal(v.numpy(), kept[k]), k


def test_speakers_edited_in_the_config_are_exported(hf_dir, tmp_path):
  """bos ids come from config.model.talker.speakers (e.g. a voice added for training), tensors where known."""
  cli.main(["--hf_dir", str(hf_dir), "--out_dir", str(tmp_path / "orbax")])
  config = checkpoint.load_config(str(tmp_path / "orbax"))
  config.model.talker.speakers = dict(ref.SPEAKERS, Nova=149)
  checkpoint.save_config(str(tmp_path / "orbax"), config)
  cli.main(["--orbax_dir", str(tmp_path / "orbax"), "--out_dir", str(tmp_path / "hf")])
  table = speakers.read_spk_dict(tmp_path / "hf" / speakers.SPK_FILE)
  assert {n: e["bos_token"] for n, e in table.items()} == dict(ref.SPEAKERS, Nova=149)
  assert "cond" not in table["Nova"] and "cond" in table["Ethan"]


def assert_same_tensor(got: np.ndarray, want: torch.Tensor):
  assert got.dtype.name == str(want.dtype).removeprefix("torch.") and got.shape == tuple(want.shape)
  np.testing.assert_array_equal(got.astype(np.float64), want.double().numpy())


def test_spk_dict_reads_without_torch_as_torch_load_does(tmp_path):
  """The restricted reader (omni_jax.convert.torch_pickle) against torch.load: dtypes, a strided view, a scalar
  tensor, shared storages; and write_spk_dict gives back the same file contents."""
  g = torch.Generator().manual_seed(0)
  base = torch.randn(3, 8, generator=g)
  table = {"Chelsie": {"bos_token": 151870, "cond": base[0:1], "ref_mel": torch.randn(1, 5, 4, generator=g).bfloat16()},
           "Ethan": {"bos_token": torch.tensor(151871), "cond": base[1:2, ::2],
                     "ref_mel": torch.randn(1, 5, 4, generator=g).half()}}
  torch.save(table, tmp_path / "spk_dict.pt")
  got = torch_pickle.load(tmp_path / "spk_dict.pt")
  for name, entry in table.items():
    for k, v in entry.items():
      if isinstance(v, torch.Tensor):
        assert_same_tensor(got[name][k], v)
      else:
        assert got[name][k] == v
  read = speakers.read_spk_dict(tmp_path / "spk_dict.pt")
  speakers.write_spk_dict(str(tmp_path / "again.pt"), read)
  again = torch.load(tmp_path / "again.pt", weights_only=True)
  for name, entry in table.items():
    assert again[name]["bos_token"] == int(entry["bos_token"])
    for k in ("cond", "ref_mel"):
      assert again[name][k].dtype == entry[k].dtype and torch.equal(again[name][k], entry[k]), (name, k)
  # Where torch cannot be imported (it is no dependency of the library), the table still reads.
  code = ("import sys; sys.modules['torch'] = None; from omni_jax.convert import speakers; "
          f"print(sorted(speakers.read_spk_dict({str(tmp_path / 'spk_dict.pt')!r})))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == "['Chelsie', 'Ethan']", out.stderr[-2000:]


def test_the_library_imports_torch_only_to_write_spk_dict():
  """torch is a test dependency: no module of omni_jax imports it, except the export's spk_dict.pt writer."""
  found = []
  for path in sorted(pathlib.Path(ROOT, "omni_jax").rglob("*.py")):
    tree = ast.parse(path.read_text())
    parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
      else:
        continue
      if any(n == "torch" or n.startswith("torch.") or n == "safetensors.torch" for n in names):
        owner = node
        while owner in parent and not isinstance(owner, (ast.FunctionDef, ast.AsyncFunctionDef)):
          owner = parent[owner]
        found.append((path.relative_to(ROOT).as_posix(), getattr(owner, "name", "<module>")))
  assert sorted(set(found)) == [("omni_jax/convert/speakers.py", "write_spk_dict")]


class _Exploit:
  def __reduce__(self):
    return (os.system, ("touch " + _Exploit.marker,))


def test_a_speaker_table_with_pickled_code_is_refused(tmp_path):
  _Exploit.marker = str(tmp_path / "ran")
  path = tmp_path / speakers.SPK_FILE
  with open(path, "wb") as f:
    pickle.dump({"Chelsie": {"bos_token": 1, "cond": _Exploit()}}, f)
  with pytest.raises(speakers.SpeakerTableError, match=str(path)):
    speakers.read_spk_dict(str(path))
  assert not os.path.exists(_Exploit.marker)
  torch.save({"Chelsie": {"cond": torch.zeros(2)}}, path)
  with pytest.raises(speakers.SpeakerTableError, match="'Chelsie' has no bos_token"):
    speakers.read_spk_dict(str(path))


def test_thinker_only_checkpoint_drops_the_base_talker(tmp_path):
  from configs import tiny  # noqa: PLC0415

  base = tiny.get_config()
  assert "talker" in base.model
  thinker_json = json.loads(ref.thinker_config("gqa2").to_json_string())
  assert "talker" not in hf.config_from_hf(thinker_json, base=base).model
  out = hf.config_to_hf(hf.config_from_hf(thinker_json, base=base))
  assert out["model_type"] == "qwen2_5_omni_thinker"

"""PEFT interop of LoRA adapters (omni_jax.convert.peft): our adapters exported as a PEFT directory load with
`peft` onto transformers' Thinker (and the full model) and give our logits; adapters made by `peft` import and
give transformers' logits (float32, tiny perturbed models, 1e-4)."""

import copy
import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx, traverse_util
from safetensors.numpy import load_file, save_file

import hf_reference as ref
from omni_jax import adapters, checkpoint, loader, towers
from omni_jax.convert import cli
from omni_jax.convert import hf
from omni_jax.convert import peft as peft_io
from omni_jax.layers import lora
from omni_jax.models import omni

import peft  # noqa: E402  (the test extra installs it: a parity test never skips)

pytestmark = pytest.mark.parity

LENGTH = 12


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
  """(transformers' perturbed tiny Thinker, its directory, our config of it)."""
  d = tmp_path_factory.mktemp("thinker")
  model = ref.build_thinker("gqa2", seed=5)
  model.save_pretrained(d)
  return model, str(d), hf.config_from_hf(hf.read_config(d))


def _with_lora(config, **lora_kw):
  c = ml_collections.ConfigDict(config.to_dict())
  c.lora = ml_collections.ConfigDict(dict(dict(rank=4, alpha=8.0, base_dtype="float32"), **lora_kw))
  return c


def _base(hf_dir, config):
  """Our base parameters (pure dict) read from a transformers directory."""
  _, abstract = omni.abstract_model(adapters.without_lora(config) if adapters.is_lora(config) else config)
  return nnx.to_pure_dict(hf.load_state(hf_dir, abstract))


def _random_adapters(config, seed):
  """The adapters config.lora makes, with random a and b (b != 0: the adapters change the logits)."""
  _, abstract = omni.abstract_model(config)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32),
                      lora.adapters(nnx.to_pure_dict(abstract)))


def _adapted(config, base, adapter_params):
  graphdef, state = omni.abstract_model(config)
  merged = {**traverse_util.flatten_dict(base), **traverse_util.flatten_dict(adapter_params)}
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(merged))
  return nnx.merge(graphdef, state)


def _ids(vocab=200, rows=2):
  return ref.text_ids(np.random.default_rng(7), rows, LENGTH, vocab)


def _our_logits(model, ids):
  pos = np.broadcast_to(np.arange(ids.shape[1]), (3,) + ids.shape)
  return np.asarray(model.thinker(jnp.asarray(ids), jnp.asarray(pos), jnp.ones(ids.shape, jnp.int32)))


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long)).logits.numpy()


def _lora_tensors(peft_model) -> dict:
  """The LoRA weights PEFT holds after loading (its own save format; no base-layer copies)."""
  from peft import get_peft_model_state_dict

  return {k: v.numpy() for k, v in get_peft_model_state_dict(peft_model).items() if ".lora_" in k}


def _assert_loaded_exactly(peft_model, directory):
  """PEFT adapted exactly the modules of the file (target_modules) and holds its values (the key names)."""
  written = load_file(os.path.join(directory, peft_io.WEIGHTS_FILE))
  held = _lora_tensors(peft_model)
  assert set(held) == set(written)
  for k, v in written.items():
    np.testing.assert_array_equal(held[k], v, err_msg=k)


# --------------------------------------------------------------------------------------- export


def _lora_checkpoint(tmp_path, config, base, adapter_params):
  """A base converter output and a LoRA checkpoint over it (adapters + the base's path and fingerprint), as
  omni_jax.adapters reads them."""
  base_dir, lora_dir = str(tmp_path / "base"), str(tmp_path / "lora")
  checkpoint.save_params(base_dir, base, adapters.without_lora(config))
  _, abstract = omni.abstract_model(config)
  digest = adapters.fingerprint(adapters.load_base(base_dir, nnx.to_pure_dict(abstract)))
  checkpoint.save_params(lora_dir, adapter_params, adapters.record_base(config, base_dir, digest))
  return base_dir, lora_dir


def test_export_loads_in_peft_onto_the_thinker_and_gives_our_logits(thinker, tmp_path):
  from peft import PeftModel
  from transformers import Qwen2_5OmniThinkerForConditionalGeneration

  _, hf_dir, plain = thinker
  # The LM's MLP by path, every q_proj (LM and audio encoder, "q" in transformers' vision blocks), the audio
  # encoder's fc1 and the LM head: short names cannot say this, so target_modules is a regex.
  config = _with_lora(plain, targets={"thinker": [r"model\.layers\.mlp\..*", "q_proj", "fc1", "lm_head"]})
  base = _base(hf_dir, config)
  trained = _random_adapters(config, 1)
  ids = _ids()
  ours = _our_logits(_adapted(config, base, trained), ids)
  base_dir, lora_dir = _lora_checkpoint(tmp_path, config, base, trained)

  cli.main(["--orbax_dir", base_dir, "--out_dir", str(tmp_path / "hf_base")])  # our HF export of the base
  cli.main(["--orbax_dir", lora_dir, "--peft_out", str(tmp_path / "adapter")])
  written = json.loads((tmp_path / "adapter" / peft_io.CONFIG_FILE).read_text())
  assert (written["r"], written["lora_alpha"], written["use_rslora"], written["bias"]) == (4, 8.0, False, "none")
  assert isinstance(written["target_modules"], str)
  keys = load_file(tmp_path / "adapter" / peft_io.WEIGHTS_FILE)
  assert "base_model.model.model.language_model.layers.1.mlp.up_proj.lora_A.weight" in keys
  assert "base_model.model.model.visual.blocks.0.attn.q.lora_B.weight" in keys
  assert "base_model.model.lm_head.lora_B.weight" in keys

  hf_model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(tmp_path / "hf_base").eval()
  assert np.abs(_hf_logits(hf_model, ids) - ours).max() > 1e-2  # the adapters change the logits
  peft_model = PeftModel.from_pretrained(hf_model, str(tmp_path / "adapter")).eval()
  _assert_loaded_exactly(peft_model, str(tmp_path / "adapter"))
  err = np.abs(_hf_logits(peft_model, ids) - ours).max()
  assert err <= 1e-4, err

  # The same adapters merged into the base (convert's default for a LoRA checkpoint) in plain transformers.
  cli.main(["--orbax_dir", lora_dir, "--out_dir", str(tmp_path / "hf_merged")])
  merged = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(tmp_path / "hf_merged").eval()
  err = np.abs(_hf_logits(merged, ids) - ours).max()
  assert err <= 1e-4, err

  # And back: the directory imports as the same adapters and targets.
  back, lora_config = peft_io.import_adapter(str(tmp_path / "adapter"), plain)
  flat, want = traverse_util.flatten_dict(back), traverse_util.flatten_dict(trained)
  assert set(flat) == set(want)
  for k in want:
    np.testing.assert_array_equal(flat[k], want[k], err_msg=".".join(k))
  assert (lora_config.rank, lora_config.alpha, lora_config.rslora) == (4, 8.0, False)
  assert lora.targeted(nnx.eval_shape(lambda: omni.OmniModel(_with_lora(plain, **lora_config.to_dict()),
                                                             rngs=nnx.Rngs(0))), lora.LoraConfig.from_config(
                           _with_lora(plain, **lora_config.to_dict())))  # a valid config.lora


def test_short_target_names_when_they_are_exact(thinker, tmp_path):
  _, hf_dir, plain = thinker
  config = _with_lora(plain, targets={"thinker": ["k_proj", "lm_head"]}, rslora=True)
  written = peft_io.export_adapter(str(tmp_path), _random_adapters(config, 2), config, base_model="Qwen/x")
  # k_proj: the LM's and the audio encoder's k_proj and the vision blocks' k, all adapted.
  assert written["target_modules"] == ["k", "k_proj", "lm_head"]
  assert written["use_rslora"] and written["base_model_name_or_path"] == "Qwen/x"


def test_full_model_and_talker_layouts_load_in_peft(tmp_path):
  from peft import PeftModel

  hf_model = ref.build_omni(seed=3)
  talker_copy = copy.deepcopy(hf_model.talker)
  hf_model.save_pretrained(tmp_path / "hf")
  # Without our Token2Wav (slow to trace, no adapters here): transformers still builds one, so the full layout
  # cannot use short target names (they might hit its modules).
  plain = towers.without(hf.config_from_hf(hf.read_config(tmp_path / "hf")), "token2wav")
  config = _with_lora(plain, targets={"thinker": [r"model\.layers\.self_attn\..*"],
                                      "talker": ["q_proj", "down_proj", "codec_head", "thinker_to_talker_proj"]})
  base = _base(str(tmp_path / "hf"), config)
  trained = _random_adapters(config, 4)
  ids = _ids(rows=1)
  ours = _our_logits(_adapted(config, base, trained), ids)

  written = peft_io.export_adapter(str(tmp_path / "full"), trained, config)  # default: the full model
  target = written["target_modules"]  # one regex; PEFT adapts exactly the modules of the file (below)
  assert re.fullmatch(target, "talker.model.layers.1.mlp.down_proj") and not re.fullmatch(target, "talker.model."
                                                                                              "layers.1.mlp.up_proj")
  peft_model = PeftModel.from_pretrained(hf_model, str(tmp_path / "full")).eval()
  _assert_loaded_exactly(peft_model, str(tmp_path / "full"))
  err = np.abs(_hf_logits(peft_model.base_model.model.thinker, ids) - ours).max()
  assert err <= 1e-4, err
  back, lora_config = peft_io.import_adapter(str(tmp_path / "full"), plain)
  assert set(traverse_util.flatten_dict(back)) == set(traverse_util.flatten_dict(trained))
  assert lora_config.targets.talker == ["codec_head", "down_proj", "q_proj", "thinker_to_talker_proj"]

  # One tower onto its own transformers class: the Talker's adapters onto Qwen2_5OmniTalkerForConditionalGeneration.
  written = peft_io.export_adapter(str(tmp_path / "talker"), trained, config, layout="talker")
  assert written["target_modules"] == ["codec_head", "down_proj", "q_proj", "thinker_to_talker_proj"]
  talker = PeftModel.from_pretrained(talker_copy, str(tmp_path / "talker"))
  _assert_loaded_exactly(talker, str(tmp_path / "talker"))
  back, _ = peft_io.import_adapter(str(tmp_path / "talker"), plain, layout="talker")
  want = traverse_util.flatten_dict(trained)
  for k, v in traverse_util.flatten_dict(back).items():
    assert k[0] == "talker"
    np.testing.assert_array_equal(v, want[k])


# --------------------------------------------------------------------------------------- import


def _v4_names(directory):
  """Rewrite a directory's keys to the names PEFT writes under transformers 4 (the checkpoint's names)."""
  path = os.path.join(directory, peft_io.WEIGHTS_FILE)
  tensors = load_file(path)
  renames = (("model.language_model.", "model."), ("model.audio_tower.", "audio_tower."),
             ("model.visual.", "visual."))
  out = {}
  for k, v in tensors.items():
    rest = k[len(peft_io.PREFIX):]
    for new, old in renames:
      if rest.startswith(new):
        rest = old + rest[len(new):]
        break
    out[peft_io.PREFIX + rest] = v
  assert set(out) != set(tensors)
  save_file(out, path)


@pytest.mark.parametrize("variant", ["plain", "patterns", "v4_names"])
def test_peft_adapter_imports_and_gives_transformers_logits(thinker, tmp_path, variant):
  from peft import LoraConfig, get_peft_model

  _, hf_dir, plain = thinker
  kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"])
  if variant == "patterns":  # per-module ranks and alphas, rsLoRA, and one decoder layer only for v_proj's
    kw.update(rank_pattern={"v_proj": 2, "lm_head": 6}, alpha_pattern={"down_proj": 3.0}, use_rslora=True,
              target_modules=["q_proj", "v_proj", "down_proj", "lm_head"], layers_to_transform=[1],
              layers_pattern="layers")
  torch.manual_seed(0)
  made = get_peft_model(ref.build_thinker("gqa2", seed=5), LoraConfig(**kw)).eval()
  with torch.no_grad():
    for name, p in made.named_parameters():
      if "lora_B" in name:
        p.normal_(0, 0.3)
  made.save_pretrained(tmp_path / "adapter")
  if variant == "v4_names":
    _v4_names(str(tmp_path / "adapter"))
  ids = _ids()
  want = _hf_logits(made, ids)

  params, lora_config = peft_io.import_adapter(str(tmp_path / "adapter"), plain)
  config = _with_lora(plain, **lora_config.to_dict())
  got = _our_logits(_adapted(config, _base(hf_dir, config), params), ids)
  assert np.abs(got - _hf_logits(ref.build_thinker("gqa2", seed=5), ids)).max() > 1e-2
  err = np.abs(got - want).max()
  assert err <= 1e-4, err
  if variant == "plain":  # generate.py / the server: --checkpoint HF_DIR --adapter PEFT_DIR, merged on load
    _, graphdef, served, _, _, _ = loader.restore(hf_dir, adapter=str(tmp_path / "adapter"))
    assert np.abs(_our_logits(nnx.merge(graphdef, served), ids) - want).max() <= 1e-4
  if variant == "patterns":
    assert lora_config.rank == 6 and lora_config.rslora
    v = traverse_util.flatten_dict(params)[("thinker", "model", "layers", "self_attn", "v_proj", "lora", "a")]
    assert not np.any(v[0]) and not np.any(v[1][:, 2:])  # layer 0 left out, rank 2 padded to 6
  else:
    # q_proj / v_proj: the LM's and the audio encoder's (transformers' vision blocks call theirs q / v).
    assert lora_config.targets.thinker == ["audio_tower\\.layers\\.self_attn\\.q_proj",
                                           "audio_tower\\.layers\\.self_attn\\.v_proj", "down_proj", "lm_head",
                                           "model\\.layers\\.self_attn\\.o_proj", "model\\.layers\\.self_attn\\.q_proj",
                                           "model\\.layers\\.self_attn\\.v_proj"]


# --------------------------------------------------------------------------------------- errors


def _adapter_dir(path, config=None, tensors=None):
  os.makedirs(path, exist_ok=True)
  c = dict(peft_type="LORA", r=2, lora_alpha=4, lora_dropout=0.0, bias="none", target_modules=["q_proj"])
  c.update(config or {})
  with open(os.path.join(path, peft_io.CONFIG_FILE), "w") as f:
    json.dump(c, f)
  name = peft_io.PREFIX + "model.language_model.layers.0.self_attn.q_proj"
  save_file(tensors or {name + ".lora_A.weight": np.zeros((2, 32), np.float32),
                        name + ".lora_B.weight": np.zeros((32, 2), np.float32)},
            os.path.join(path, peft_io.WEIGHTS_FILE))
  return str(path)


@pytest.mark.parametrize("config,tensors,match", [
    ({"use_dora": True}, None, r"adapter_config\.json: use_dora=True \(DoRA"),
    ({"bias": "all"}, None, r"adapter_config\.json: bias='all'"),
    ({"peft_type": "IA3"}, None, "only LORA"),
    ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    ({"init_lora_weights": "pissa"}, None, "changed the base weights"),
    ({}, {peft_io.PREFIX + "model.language_model.layers.0.self_attn.q_proj.lora_magnitude_vector": np.ones(32)},
     r"adapter_model\.safetensors: .*lora_magnitude_vector' is a DoRA magnitude"),
    ({}, {peft_io.PREFIX + "model.language_model.layers.0.self_attn.qkv.lora_A.weight": np.ones((2, 32)),
          peft_io.PREFIX + "model.language_model.layers.0.self_attn.qkv.lora_B.weight": np.ones((32, 2))},
     r"adapter_model\.safetensors: .*self_attn\.qkv\.lora_A\.weight: the thinker of this config has no Linear"),
    ({}, {peft_io.PREFIX + "model.language_model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 7)),
          peft_io.PREFIX + "model.language_model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((32, 2))},
     r"lora_A \(2, 7\) / lora_B \(32, 2\), expected \(2, 32\)"),
], ids=["dora", "bias", "ia3", "modules_to_save", "pissa", "magnitude", "unknown_module", "shape"])
def test_unsupported_adapters_fail_naming_file_and_key(thinker, tmp_path, config, tensors, match):
  _, _, plain = thinker
  tensors = None if tensors is None else {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  d = _adapter_dir(tmp_path / "a", config, tensors)
  with pytest.raises(peft_io.PeftError, match=match):
    peft_io.import_adapter(d, plain)


def test_pickled_adapter_and_untargetable_modules_are_refused(thinker, tmp_path):
  _, _, plain = thinker
  d = _adapter_dir(tmp_path / "a")
  os.rename(os.path.join(d, peft_io.WEIGHTS_FILE), os.path.join(d, "adapter_model.bin"))
  with pytest.raises(peft_io.PeftError, match=r"adapter_model\.bin: a pickled adapter"):
    peft_io.import_adapter(d, plain)
  # Our patch embedding is a Linear; transformers' is a Conv3d: no PEFT LoRA pair maps onto it.
  config = _with_lora(plain, targets={"thinker": [r"visual\.patch_embed\.proj"]})
  with pytest.raises(peft_io.PeftError, match=r"thinker\.visual\.patch_embed\.proj: .* is not a Linear"):
    peft_io.export_adapter(str(tmp_path / "out"), _random_adapters(config, 0), config)


def test_convert_refuses_peft_out_for_a_model_without_adapters(thinker, tmp_path, capsys):
  _, hf_dir, plain = thinker
  checkpoint.save_params(str(tmp_path / "base"), _base(hf_dir, plain), plain)
  with pytest.raises(SystemExit) as e:
    cli.main(["--orbax_dir", str(tmp_path / "base"), "--peft_out", str(tmp_path / "adapter")])
  assert e.value.code == 2
  assert "not a LoRA checkpoint" in capsys.readouterr().err

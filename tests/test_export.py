"""The HF export generates and stops in transformers: generation_config.json, eos/pad ids, carried tokenizer
files, and `convert --orbax_dir` on converter outputs, training step directories and workdirs."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

import hf_reference as ref
from omni_jax import checkpoint
from omni_jax.convert import cli
from omni_jax.convert import export
from omni_jax.convert import hf
from omni_jax.models import omni

EOS_A, EOS_B = 150, 151  # two ordinary ids of the gqa2 vocabulary (200)


def _tokenizer_files(d):
  """A real (tiny, word-level) fast tokenizer saved by transformers, plus processor and template files."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {f"w{i}": i for i in range(200)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="w9"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w150", pad_token="w0").save_pretrained(d)
  (d / "chat_template.jinja").write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                                         "<|im_end|>\n{% endfor %}")
  (d / "preprocessor_config.json").write_text(json.dumps({"feature_size": 128, "sampling_rate": 16000}))
  torch.save({"Chelsie": {"bos_token": 150}}, d / "spk_dict.pt")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny thinker as save_pretrained writes it, with tokenizer files and a sampling generation_config."""
  d = tmp_path_factory.mktemp("hf")
  ref.build_thinker("gqa2", seed=3).save_pretrained(d)
  _tokenizer_files(d)
  (d / "generation_config.json").write_text(json.dumps(dict(
      do_sample=True, temperature=0.3, top_k=7, top_p=0.9, repetition_penalty=1.2, max_new_tokens=33,
      eos_token_id=[EOS_A, EOS_B], pad_token_id=0, bos_token_id=0, min_new_tokens=0)))
  return d


@pytest.fixture(scope="module")
def orbax_dir(hf_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("orbax")
  cli.main(["--hf_dir", str(hf_dir), "--out_dir", str(out)])
  return out


def _tiny_state(hf_dir):
  """(our config, our state) of the tiny thinker, without any generation values from the source."""
  config = hf.config_from_hf(hf.read_config(hf_dir))
  _, abstract = omni.abstract_model(config)
  return config, hf.load_state(str(hf_dir), abstract)


def _eos_always_wins(state, rng):
  """lm_head: every column 0 but EOS_A = v and EOS_B = -v, so one of the two has the largest logit whatever
  the hidden state (h.v and -h.v; all others 0)."""
  kernel = state["thinker"]["lm_head"]["kernel"]
  w = np.zeros(kernel.get_value().shape, np.float32)
  v = rng.standard_normal(w.shape[0]).astype(np.float32)
  w[:, EOS_A], w[:, EOS_B] = v, -v
  kernel.set_value(w)
  return state


def _generate(directory, n_prompt=6, vocab=200):
  from transformers import Qwen2_5OmniThinkerForConditionalGeneration

  model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(directory).eval()
  ids = torch.tensor(ref.text_ids(np.random.default_rng(1), 1, n_prompt, vocab))
  with torch.no_grad():  # the exported generation_config.json decides: greedy, max_new_tokens, eos ids
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids))
  return out[0, n_prompt:].tolist()


@pytest.mark.parametrize("eos", [(EOS_A, EOS_B), ()], ids=["eos", "no_eos"])
def test_export_generates_and_stops_in_transformers(hf_dir, tmp_path, eos):
  config, state = _tiny_state(hf_dir)
  state = _eos_always_wins(state, np.random.default_rng(0))
  config.model.thinker.eos_token_ids = eos
  config.generate.update(dict(do_sample=False, max_new_tokens=8))
  checkpoint.save_params(str(tmp_path / "orbax"), state, config)
  cli.main(["--orbax_dir", str(tmp_path / "orbax"), "--out_dir", str(tmp_path / "hf")])
  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert hf_config["eos_token_id"] == hf_config["text_config"]["eos_token_id"] == list(eos)
  assert hf_config["pad_token_id"] == hf_config["text_config"]["pad_token_id"] == 0
  assert hf_config["user_token_id"] == 6
  tokens = _generate(tmp_path / "hf")
  assert set(tokens) <= {EOS_A, EOS_B}
  if eos:
    assert len(tokens) < 8 and tokens[-1] in eos  # stopped at the first eos
  else:
    assert len(tokens) == 8  # control: nothing to stop at, runs to max_new_tokens


def test_generation_config_round_trips_and_the_config_overrides_it(hf_dir, orbax_dir, tmp_path):
  from transformers import GenerationConfig

  source = json.loads((hf_dir / "generation_config.json").read_text())
  config = checkpoint.load_config(str(orbax_dir))
  g = config.generate
  assert (g.do_sample, g.temperature, g.top_k, g.top_p, g.repetition_penalty, g.max_new_tokens) == (
      True, 0.3, 7, 0.9, 1.2, 33)
  assert list(config.model.thinker.eos_token_ids) == [EOS_A, EOS_B]
  cli.main(["--orbax_dir", str(orbax_dir), "--out_dir", str(tmp_path / "hf")])
  written = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
  assert written == source
  loaded = GenerationConfig.from_pretrained(tmp_path / "hf")
  assert (loaded.do_sample, loaded.temperature, loaded.top_k, loaded.top_p, loaded.max_new_tokens,
          loaded.eos_token_id) == (True, 0.3, 7, 0.9, 33, [EOS_A, EOS_B])
  # An edit of config.generate wins over the carried file; greedy drops the sampling keys (transformers
  # refuses them without do_sample) and keeps the file's other keys.
  config.generate.update(dict(do_sample=False, max_new_tokens=5))
  checkpoint.save_config(str(orbax_dir), config)
  try:
    cli.main(["--orbax_dir", str(orbax_dir), "--out_dir", str(tmp_path / "greedy")])
  finally:
    config.generate.update(dict(do_sample=True, max_new_tokens=33))
    checkpoint.save_config(str(orbax_dir), config)
  greedy = json.loads((tmp_path / "greedy" / "generation_config.json").read_text())
  assert greedy == dict(do_sample=False, max_new_tokens=5, repetition_penalty=1.2, eos_token_id=[EOS_A, EOS_B],
                        pad_token_id=0, bos_token_id=0, min_new_tokens=0)
  GenerationConfig.from_pretrained(tmp_path / "greedy").validate(strict=True)


def test_generation_config_without_a_source_file():
  from configs import tiny  # the released token ids and the default config.generate

  config = tiny.get_config()
  out = export.generation_config(config)
  g = config.generate
  assert out == dict(eos_token_id=[151645, 151643], pad_token_id=151643, bos_token_id=151643, do_sample=g.do_sample,
                     max_new_tokens=g.max_new_tokens, repetition_penalty=g.repetition_penalty,
                     temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
  del config["generate"]  # an older checkpoint's config: greedy
  old = export.generation_config(config)
  assert old["do_sample"] is False and "temperature" not in old and old["max_new_tokens"] == g.max_new_tokens


def test_ids_outside_the_vocabulary_are_fitted_for_the_export(caplog):
  from configs import tiny

  config = tiny.get_config()
  config.model.thinker.text.vocab_size = 151644  # keeps <|endoftext|> 151643, loses <|im_end|> 151645
  fitted = export.fit_token_ids(config)
  assert list(fitted.model.thinker.eos_token_ids) == [151643] and fitted.model.thinker.pad_token_id == 151643
  assert list(config.model.thinker.eos_token_ids) == [151645, 151643]  # the caller's config is left as is
  config.model.thinker.text.vocab_size = 256
  fitted = export.fit_token_ids(config)
  assert (list(fitted.model.thinker.eos_token_ids), fitted.model.thinker.pad_token_id,
          fitted.model.thinker.user_token_id) == ([], 0, 0)
  assert sum("outside the vocabulary" in r.getMessage() for r in caplog.records) == 4


def test_tokenizer_files_are_carried_hf_orbax_hf(hf_dir, orbax_dir, tmp_path):
  from transformers import AutoTokenizer

  carried = sorted(os.listdir(orbax_dir / export.ASSETS_DIR))
  assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
          "spk_dict.pt", "generation_config.json"} <= set(carried)
  cli.main(["--orbax_dir", str(orbax_dir), "--out_dir", str(tmp_path / "hf")])
  for name in carried:
    if name != "generation_config.json":  # rewritten from the config (same values: previous test)
      assert (tmp_path / "hf" / name).read_bytes() == (hf_dir / name).read_bytes(), name
  text = "w12 w150 w77 w3"
  assert (AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"] ==
          AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"] == [12, 150, 77, 3])


def _workdir(hf_dir, tmp_path):
  """WORKDIR/config.json + checkpoints/{1,2}/{params,train} as train.py writes them (step 1 perturbed)."""
  config, state = _tiny_state(hf_dir)
  work = tmp_path / "work"
  work.mkdir()
  checkpoint.save_config(str(work), config)
  params = nnx.to_pure_dict(state)
  ckpt = checkpoint.TrainCheckpointer(str(work / "checkpoints"), async_save=False)
  ckpt.save(1, jax.tree.map(lambda x: x + 1, params), {"step": np.int32(1)})
  ckpt.save(2, params, {"step": np.int32(2)})
  ckpt.close()
  return work


def test_orbax_dir_accepts_workdirs_and_step_dirs(hf_dir, tmp_path, caplog):
  work = _workdir(hf_dir, tmp_path)
  source = load_file(hf_dir / "model.safetensors")
  for arg, shift in ((work, 0), (work / "checkpoints", 0), (work / "checkpoints" / "1", 1)):
    out = tmp_path / f"hf_{shift}_{os.path.basename(arg)}"
    caplog.clear()
    cli.main(["--orbax_dir", str(arg), "--out_dir", str(out)])
    after = load_file(out / "model.safetensors")
    assert set(after) == set(source)
    for k in after:
      np.testing.assert_array_equal(after[k], source[k] + shift, err_msg=k)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    said = [r.getMessage() for r in caplog.records if "no tokenizer or processor files" in r.getMessage()]
    assert len(said) == 1 and str(arg) in said[0]


@pytest.mark.parametrize("what", ["missing", "empty", "no_config"])
def test_bad_orbax_dir_fails_with_one_line_naming_it(hf_dir, tmp_path, what, capsys):
  bad = tmp_path / "bad"
  if what == "empty":
    bad.mkdir()
  elif what == "no_config":
    config, state = _tiny_state(hf_dir)
    checkpoint.save_params(str(bad), state)  # params/ without config.json
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    cli.main(["--orbax_dir", str(bad), "--out_dir", str(tmp_path / "out")])
  assert e.value.code == 2  # omni_jax.cli.user_errors: one line on stderr, exit status 2
  message = capsys.readouterr().err.strip()
  assert message.startswith("error: " + str(bad)) and "\n" not in message
  assert ("no config.json" in message) == (what == "no_config")
  assert not (tmp_path / "out").exists()


def test_export_of_a_training_run_generates_in_transformers(tmp_path, caplog):
  """2 real training steps (tests/train_testlib's 256-token config, first without eos ids) -> export of the
  workdir -> transformers generates, and with an eos id stops exactly at its first occurrence."""
  import train_testlib as lib
  from omni_jax.train import loop

  c = lib.config(steps=2)
  c.model.thinker.update(dict(pad_token_id=0, user_token_id=6, eos_token_ids=()))
  c.generate.update(dict(do_sample=False, max_new_tokens=12))
  loop.run(c, str(tmp_path / "work"))
  cli.main(["--orbax_dir", str(tmp_path / "work"), "--out_dir", str(tmp_path / "hf")])
  assert any("no tokenizer or processor files" in r.getMessage() for r in caplog.records)
  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  hf_config = hf_config.get("thinker_config", hf_config)  # the config has a Talker: the full-model layout
  assert hf_config["eos_token_id"] == [] and hf_config["pad_token_id"] == 0
  tokens = _generate(tmp_path / "hf", vocab=256)
  assert len(tokens) == 12  # no eos id in this vocabulary: runs to max_new_tokens

  # The same weights with an eos id the model does produce: generate stops right after its first occurrence.
  eos = tokens[3]
  step_config = checkpoint.find_config(str(tmp_path / "work" / "checkpoints" / "2"))  # the step's own config
  config = checkpoint.load_config(step_config)
  config.model.thinker.eos_token_ids = (eos,)
  checkpoint.save_config(step_config, config)
  cli.main(["--orbax_dir", str(tmp_path / "work" / "checkpoints" / "2"), "--out_dir", str(tmp_path / "hf_eos")])
  stopped = _generate(tmp_path / "hf_eos", vocab=256)
  assert stopped == tokens[:tokens.index(eos) + 1] and len(stopped) < 12

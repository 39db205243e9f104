"""What an HF export needs beside the weights to generate and stop: generation_config.json and the tokenizer files.

HF -> orbax: the source directory's tokenizer / processor files (ASSET_FILES, whichever it has) are copied
unchanged into OUT/hf_assets/, and its generation_config.json seeds the config (`adopt_generation`):
config.generate takes the file's decoding values (a sampling key the file lacks takes transformers' default,
so the config describes how transformers decodes the source) and the eos ids are the file's `eos_token_id`
(what transformers stops at) when it states them.

orbax -> HF: the carried files are copied into the export; generation_config.json is written by
`generation_config`: the carried file's keys are kept, and the keys the config holds are written over them
(bos/eos/pad ids from model.thinker, do_sample / temperature / top_k / top_p / repetition_penalty /
max_new_tokens from config.generate). Since the import seeded config.generate from that same file, the
source's values survive a round trip, and an edit of config.generate (e.g. in a training config) wins.
A checkpoint without carried files (a training workdir) exports none; the log says so in one line.
"""

import json
import logging
import os
import shutil
from typing import Optional

import ml_collections

from omni_jax import defaults

log = logging.getLogger(__name__)

ASSETS_DIR = "hf_assets"  # under a converter output, beside params/ and config.json

# Tokenizer, chat template, processor, generation and speaker files of a transformers model directory.
ASSET_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
    "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "processor_config.json",
    "preprocessor_config.json", "video_preprocessor_config.json", "generation_config.json", "spk_dict.pt",
)
GENERATION_FILE = "generation_config.json"
# The source's token2wav_config (config.json): Token2Wav is not built yet, so an export of a model with a
# Talker writes it back and transformers builds the source's Token2Wav (its weights are not carried).
TOKEN2WAV_FILE = "token2wav_config.json"

# config.generate keys that generation_config.json holds under the same name.
_SAMPLING = ("temperature", "top_k", "top_p")
# transformers' GenerationConfig defaults for the keys a source file may leave out.
_HF_DEFAULTS = dict(do_sample=False, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0)


# --------------------------------------------------------------------------------------- files


def copy_assets(src_dir: str, dst_dir: str, *, skip: tuple[str, ...] = ()) -> list[str]:
  """Copy the ASSET_FILES that src_dir holds into dst_dir (created when there is one); their names."""
  names = [n for n in ASSET_FILES if n not in skip and os.path.isfile(os.path.join(src_dir, n))]
  if names:
    os.makedirs(dst_dir, exist_ok=True)
  for n in names:
    shutil.copyfile(os.path.join(src_dir, n), os.path.join(dst_dir, n))
  return names


def store_assets(hf_dir: str, out_dir: str, hf_config: Optional[dict] = None) -> list[str]:
  """HF -> orbax: the source's files into out_dir/hf_assets (replacing an older copy), and its
  token2wav_config when `hf_config` (its config.json) has one."""
  dst = os.path.join(out_dir, ASSETS_DIR)
  if os.path.isdir(dst):
    shutil.rmtree(dst)
  names = copy_assets(hf_dir, dst)
  if (hf_config or {}).get("token2wav_config") is not None:
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, TOKEN2WAV_FILE), "w") as f:
      json.dump(hf_config["token2wav_config"], f, indent=2)
    names.append(TOKEN2WAV_FILE)
  if names:
    log.info("%s: carried %s into %s", hf_dir, ", ".join(names), dst)
  else:
    log.info("%s: no tokenizer, processor or generation files to carry", hf_dir)
  return names


def assets_of(params_path: str) -> Optional[str]:
  """The hf_assets directory stored with a checkpoint (beside params/ or beside its config.json), if any."""
  from omni_jax import checkpoint  # local: keep this module light for hf.py

  for d in (params_path, checkpoint.find_config(params_path)):
    if d is not None and os.path.isdir(os.path.join(d, ASSETS_DIR)):
      return os.path.join(d, ASSETS_DIR)
  return None


def _read_json(directory: Optional[str], name: str) -> Optional[dict]:
  path = os.path.join(directory, name) if directory else None
  if path is None or not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_token2wav(directory: Optional[str]) -> Optional[dict]:
  return _read_json(directory, TOKEN2WAV_FILE)


def read_generation(directory: Optional[str]) -> Optional[dict]:
  return _read_json(directory, GENERATION_FILE)


# --------------------------------------------------------------------------------------- ids and values


def _ids(value) -> tuple[int, ...]:
  if value is None:
    return ()
  return tuple(int(i) for i in (value if isinstance(value, (list, tuple)) else [value]))


def complete_token_ids(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config with pad / eos / user ids filled in when it predates them (the released ids that fit its
  vocabulary, else pad 0, user 0 and no eos); a config that has them is returned as is."""
  t = config.model.thinker
  if all(k in t for k in ("pad_token_id", "eos_token_ids", "user_token_id")):
    return config
  fill = defaults.generation_ids_within(int(t.text.vocab_size))
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in fill.items():
    if key not in config.model.thinker:
      config.model.thinker[key] = value
  return config


def fit_token_ids(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config whose pad / eos / user ids lie inside its vocabulary, for an export: an eos id outside it can never
  be generated (dropped), a pad id outside it makes transformers refuse the embedding (-> 0); each is logged."""
  t = config.model.thinker
  vocab = int(t.text.vocab_size)
  outside = [i for i in t.eos_token_ids if int(i) >= vocab]
  bad = {k: int(t[k]) for k in ("pad_token_id", "user_token_id") if int(t[k]) >= vocab}
  if not outside and not bad:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  t = config.model.thinker
  if outside:
    t.eos_token_ids = tuple(int(i) for i in t.eos_token_ids if int(i) < vocab)
    log.warning("eos ids %s are outside the vocabulary (%d): left out of the export (eos ids: %s)", outside, vocab,
                list(t.eos_token_ids))
  for k, v in bad.items():
    t[k] = 0
    log.warning("%s %d is outside the vocabulary (%d): exported as 0", k, v, vocab)
  return config


def adopt_generation(config: ml_collections.ConfigDict, gen: dict) -> None:
  """HF -> orbax: config.generate and the eos ids (in place) from a source generation_config.json."""
  if "generate" not in config:
    defaults.generation(config)
  g = config.generate
  for k, default in _HF_DEFAULTS.items():
    value = gen.get(k)
    g[k] = type(g[k])(default if value is None else value)
  if gen.get("max_new_tokens") is not None:
    g.max_new_tokens = int(gen["max_new_tokens"])
  t = config.model.thinker
  if gen.get("eos_token_id") is not None:
    t.eos_token_ids = _ids(gen["eos_token_id"])


def generation_config(config: ml_collections.ConfigDict, carried: Optional[dict] = None) -> dict:
  """generation_config.json for an export: `carried` (the source's file, if any) with the config's values
  written over it. Greedy (do_sample False) leaves out temperature / top_k / top_p, which transformers
  rejects without sampling; a config without `generate` (older checkpoints) gets greedy decoding."""
  t = config.model.thinker
  out = dict(carried or {})
  out.pop("transformers_version", None)
  eos = [int(i) for i in t.eos_token_ids]
  if eos:
    out["eos_token_id"] = eos if len(eos) > 1 else eos[0]
  else:
    out.pop("eos_token_id", None)
  out["pad_token_id"] = int(t.pad_token_id)
  # Qwen2.5's convention: <|endoftext|> is both pad and bos (bos is used only when generate gets no prompt).
  out.setdefault("bos_token_id", int(t.pad_token_id))
  g = config.get("generate")
  if g is None:
    fallback = ml_collections.ConfigDict()
    defaults.generation(fallback)
    out["do_sample"] = False
    out.setdefault("max_new_tokens", int(fallback.generate.max_new_tokens))
  else:
    out["do_sample"] = bool(g.do_sample)
    out["max_new_tokens"] = int(g.max_new_tokens)
    out["repetition_penalty"] = float(g.repetition_penalty)
    if g.do_sample:
      out.update(temperature=float(g.temperature), top_k=int(g.top_k), top_p=float(g.top_p))
  if not out["do_sample"]:
    for k in _SAMPLING:
      out.pop(k, None)
  return out

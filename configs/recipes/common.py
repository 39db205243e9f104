"""Shared by the recipes: the model a recipe trains (from its `:arg`), and arg parsing.

  --config configs/recipes/stage1.py             # tiny model (CPU)
  --config configs/recipes/stage1.py:model=3b    # Qwen2.5-Omni-3B dimensions
"""

import ml_collections

from configs import qwen2_5_omni_3b, qwen2_5_omni_7b, tiny

MODELS = {"tiny": tiny, "3b": qwen2_5_omni_3b, "7b": qwen2_5_omni_7b}

# Parameter groups of the Thinker (regexes over dotted parameter paths, see omni_jax.train.state).
LLM = ("thinker.model", "thinker.lm_head")
ENCODERS = ("thinker.visual", "thinker.audio_tower")
# The encoders without their adapters (vision merger, audio output projection): stage 1 trains the
# adapters first, then the encoders.
ENCODER_BODIES = (r"thinker\.visual\.(patch_embed|blocks)", r"thinker\.audio_tower\.(conv1|conv2|layers|ln_post)")


def parse(arg, **defaults) -> ml_collections.ConfigDict:
  """'model=3b,phase=adapters' -> ConfigDict over `defaults` (unknown keys are an error)."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"recipe argument {key!r}: known are {sorted(defaults)}")
    out[key] = value
  return out


def base(model: str) -> ml_collections.ConfigDict:
  """The model's config without its Talker: these recipes are the paper's Thinker stages (the Talker trains on
  spoken replies with the model configs themselves: docs/talker.md)."""
  from omni_jax import towers  # pylint: disable=import-outside-toplevel

  if model not in MODELS:
    raise ValueError(f"recipe model {model!r}: choose one of {sorted(MODELS)}")
  return towers.without(MODELS[model].get_config(), "talker")


def model_config(model: str, talker: bool) -> ml_collections.ConfigDict:
  """base(model), or with talker=True the model's whole config (Thinker + Talker) for recipes that adapt the
  Talker too (the Talker's objective is weighted by the recipe)."""
  if not talker:
    return base(model)
  if model not in MODELS:
    raise ValueError(f"recipe model {model!r}: choose one of {sorted(MODELS)}")
  return MODELS[model].get_config()


def jsonl_data(c: ml_collections.ConfigDict, name: str, path: str) -> bool:
  """Point config.data at one JSONL dataset `name`: `path` is a file or glob (its train split), or holds
  `{split}` (e.g. data/prefs.{split}.jsonl), which names the train and the validation files. Returns whether
  a validation split was given."""
  import os  # pylint: disable=import-outside-toplevel

  path = os.path.expanduser(path)
  if "{split}" in path:
    spec = {s: path.replace("{split}", s) for s in ("train", "validation")}
  else:
    spec = {"train": path}
  d = c.data
  d.source = "jsonl"
  d.datasets = ml_collections.ConfigDict({name: spec})
  d.mixture = ml_collections.ConfigDict({name: 1.0})
  return "validation" in spec


# LoRA targets (omni_jax.layers.lora): every attention and MLP projection of a tower's decoder layers (q, k, v,
# o, gate, up, down), as paths inside the tower; the Thinker LM and the Talker share the names.
DECODER_PROJECTIONS = r"model\.layers\..*_proj"
TOWERS = {"thinker": ("thinker",), "talker": ("talker",), "both": ("thinker", "talker")}


def lora(towers_arg: str, *, rank: int, alpha: float, quant: str = "") -> ml_collections.ConfigDict:
  """config.lora for the decoder projections of `towers_arg` (thinker | talker | both); quant="int8" holds
  the frozen base as int8 weight-only (per output channel), else bfloat16."""
  if towers_arg not in TOWERS:
    raise ValueError(f"recipe towers {towers_arg!r}: choose one of {sorted(TOWERS)}")
  if quant not in ("", "none", "int8"):
    raise ValueError(f"recipe quant {quant!r}: choose int8 (or leave it out: a bfloat16 base)")
  return ml_collections.ConfigDict(dict(
      targets={t: [DECODER_PROJECTIONS] for t in TOWERS[towers_arg]}, rank=rank, alpha=float(alpha), dropout=0.05,
      rslora=False, base_dtype="int8" if quant == "int8" else "bfloat16"))

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

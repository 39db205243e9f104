"""The Talker's registry entry (omni_jax.towers): typed view of config.model.talker, constructor, FLOPs, the
next-code objective `talker_codes` and the preference objective `talker_dpo` (objective.py), and its batch fields
(the data hook, data.py).

Its checkpoint names follow transformers' on-disk layout (talker.thinker_to_talker_proj, talker.model.*,
talker.codec_head), so the generic leaf rules of the converter map it without exceptions.
"""

from typing import Any, Mapping

import ml_collections
import numpy as np

from omni_jax import config as config_lib
from omni_jax import dpo as dpo_lib
from omni_jax import sizes
from omni_jax import towers
from omni_jax.errors import ConfigError
from omni_jax.layers import lora
from omni_jax.models.talker import Talker, TalkerConfig, talker_config
from omni_jax.talker import data, objective


def view(config: ml_collections.ConfigDict) -> TalkerConfig:
  cfg = talker_config(config)
  width = config_lib.thinker_text(config).hidden_size
  if cfg.embedding_size != width:
    raise ConfigError(f"config.model.talker.embedding_size: {cfg.embedding_size} must equal the Thinker's width "
                      f"(model.thinker.text.hidden_size={width}): the text track is the Thinker's hidden states")
  vocab = config_lib.thinker_text(config).vocab_size
  for name in ("tts_text_start_token_id", "tts_text_end_token_id", "tts_text_pad_token_id"):
    if not 0 <= getattr(cfg, name) < vocab:
      raise ConfigError(f"config.model.talker.{name}: {getattr(cfg, name)} is outside the Thinker's vocabulary "
                        f"(model.thinker.text.vocab_size={vocab})")
  return cfg


def build(config: ml_collections.ConfigDict, rt: config_lib.Runtime, rngs) -> Talker:
  talker = Talker(talker_config(config), rt, rngs=rngs)
  talker.dpo = dpo_lib.DpoConfig.from_config(config)  # static: talker_dpo's settings (None: no DPO)
  return talker


class TalkerFlops:
  """Model FLOPs of the Talker per train step (same counting as ThinkerFlops: 6 per weight and token when it
  trains, 4 when frozen under LoRA adapters that train, 2 when frozen and nothing in it trains; causal
  attention over the Talker rows)."""

  def __init__(self, config: ml_collections.ConfigDict, frozen: frozenset = frozenset(), param_paths: tuple = ()):
    cfg = talker_config(config)
    t = cfg.text
    per_layer = (t.hidden_size * t.num_attention_heads * t.head_dim * 2
                 + t.hidden_size * t.num_key_value_heads * t.head_dim * 2 + t.hidden_size * t.intermediate_size * 3)
    self.text = t
    self.matmul_params = (t.num_hidden_layers * per_layer + cfg.embedding_size * t.hidden_size
                          + t.hidden_size * t.vocab_size)
    base = [p for p in param_paths if p[:1] == ("talker",) and not lora.is_adapter(p)]
    adapters = [p for p in param_paths if p[:1] == ("talker",) and lora.is_adapter(p) and p not in frozen]
    # Frozen base weights: 4 when its LoRA adapters train (they need the input gradients), else 2.
    self.factor = (4 if adapters else 2) if base and all(p in frozen for p in base) else 6

  def step_flops(self, batch: Mapping[str, Any]) -> float:
    if "talker_segment_ids" not in batch:
      return 0.0
    rows, seq_len = np.shape(batch["talker_segment_ids"])
    t = self.text
    attention = sizes.causal_attention_flops(rows, seq_len, t.num_hidden_layers, t.num_attention_heads, t.head_dim)
    return float(rows * seq_len * self.factor * self.matmul_params + 3 * attention)


TOWER = towers.Tower(
    name="talker", section="model.talker", view=view, build=build, stacked=("talker.model.layers",),
    decoders=("talker.model.layers",),
    flops=TalkerFlops,
    objectives=(towers.Objective("talker_codes", objective.code_loss, objective.num_codes),
                towers.Objective("talker_dpo", objective.dpo_loss, objective.num_dpo_pairs, summary=dpo_lib.summary,
                                 default=False)),
    data=data.DATA)

"""The Thinker's registry entry (omni_jax.towers): the typed view of config.model.thinker, its constructor,
converter rules (rules.py), FLOPs formula (flops.py), and objectives `thinker_text` and `thinker_dpo`
(objective.py). Its batch fields are the core ones of omni_jax.batch, so it has no data hook."""

import dataclasses
from typing import Optional

import ml_collections

from omni_jax import config as config_lib
from omni_jax import dpo as dpo_lib
from omni_jax import towers
from omni_jax.errors import ConfigError
from omni_jax.models.audio import AudioConfig, thinker_audio
from omni_jax.models.thinker import Thinker
from omni_jax.models.vision import VisionConfig, thinker_vision
from omni_jax.thinker import objective
from omni_jax.thinker.flops import ThinkerFlops
from omni_jax.thinker.rules import RULES


@dataclasses.dataclass(frozen=True)
class ThinkerView:
  """config.model.thinker, typed and validated."""
  text: config_lib.TextConfig
  ids: config_lib.TokenIds
  audio: Optional[AudioConfig]
  vision: Optional[VisionConfig]


def view(config: ml_collections.ConfigDict) -> ThinkerView:
  text = config_lib.thinker_text(config)
  ids = config_lib.TokenIds.from_config(config.model.thinker)
  for f in dataclasses.fields(config_lib.TokenIds):
    if f.name.endswith(("_token_id", "_token_ids")):
      values = getattr(ids, f.name)
      for value in values if isinstance(values, tuple) else (values,):
        if not 0 <= value < text.vocab_size:
          raise ConfigError(f"config.model.thinker.{f.name}: {value} is outside the vocabulary "
                            f"(model.thinker.text.vocab_size={text.vocab_size})")
  dpo_lib.validate(config)  # config.dpo, which both towers' DPO objectives read
  return ThinkerView(text, ids, thinker_audio(config), thinker_vision(config))


def build(config: ml_collections.ConfigDict, rt: config_lib.Runtime, rngs) -> Thinker:
  """The Thinker (sizes checked; the token ids against the vocabulary only by view(), at startup: tiny test
  models keep the released ids without using them)."""
  thinker = Thinker(config_lib.thinker_text(config), rt, rngs=rngs, audio=thinker_audio(config),
                    ids=config_lib.TokenIds.from_config(config.model.thinker), vision=thinker_vision(config))
  thinker.loss_layout = objective.LossLayout.from_config(config)  # static: how text_loss applies the LM head
  thinker.dpo = dpo_lib.DpoConfig.from_config(config)  # static: thinker_dpo's settings (None: no DPO)
  return thinker


TOWER = towers.Tower(
    name="thinker", section="model.thinker", view=view, build=build,
    stacked=("thinker.model.layers", "thinker.audio_tower.layers", "thinker.visual.blocks"),
    decoders=("thinker.model.layers",),
    rules=tuple(RULES),
    parts={"thinker.visual.": "vision encoder", "thinker.audio_tower.": "audio encoder"},
    flops=ThinkerFlops,
    objectives=(towers.Objective("thinker_text", objective.text_loss, objective.num_labels, metrics=""),
                towers.Objective("thinker_dpo", objective.dpo_loss, objective.num_dpo_pairs, summary=dpo_lib.summary,
                                 default=False)))

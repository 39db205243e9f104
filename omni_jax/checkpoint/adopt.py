"""A config adopts the model architecture stored with a checkpoint, so that a --config with other model
sizes still restores it. The Talker's speaker table is the exception: voices the config adds to the stored
table are merged in (a new voice is a name over an unused Thinker row, not architecture)."""

import logging

import ml_collections

from omni_jax import towers
from omni_jax.checkpoint.stored_config import find_config, load_config, tuples
from omni_jax.errors import ConfigError

log = logging.getLogger(__name__)


def adopt_model_config(config: ml_collections.ConfigDict, params_path: str) -> ml_collections.ConfigDict:
  """config with each tower's section (model.thinker, ...: omni_jax.towers) replaced by the architecture
  stored with a checkpoint (if any); a differing architecture is logged."""
  where = find_config(params_path)
  if where is None:
    return config
  saved = load_config(where)
  if "model" not in saved:
    return config
  absent = []
  for tower in towers.registered():
    key = tower.section.split(".", 1)[1]  # "model.thinker" -> "thinker"
    if key not in saved.model:
      if config.model.get(key) is not None:
        absent.append(tower)
      continue
    stored = tuples(saved.model[key].to_dict())
    current = config.model.get(key)
    if current is not None and stored == tuples(current.to_dict()):
      continue
    log.warning("using the model architecture stored in %s/config.json (config.%s differs)", where, tower.section)
    config = config.copy_and_resolve_references()
    added = _added_speakers(stored, current) if key == "talker" and current is not None else {}
    with config.unlocked():
      config.model[key] = ml_collections.ConfigDict(stored)
      if added:  # a new voice (docs/new_voice.md): names the run adds to the stored table keep their rows
        config.model[key].speakers.update(added)
        if current.get("default_speaker") in added:
          config.model[key].default_speaker = current.default_speaker
        log.warning("config.model.talker.speakers: adding %s to the stored speakers", added)
  for tower in absent:
    config = _new_tower(config, tower, where)
  return config


def _added_speakers(stored: dict, current) -> dict:
  """{name: bos row} the config's Talker adds to the stored speaker table; a row the stored table already
  uses is an error."""
  have = dict(stored.get("speakers") or {})
  added = {k: int(v) for k, v in dict(current.get("speakers") or {}).items() if k not in have}
  clash = {k: v for k, v in added.items() if v in set(have.values())}
  if clash:
    raise ConfigError(f"config.model.talker.speakers: {clash} reuse rows of the stored speakers {have}")
  return added


def _new_tower(config: ml_collections.ConfigDict, tower, where: str) -> ml_collections.ConfigDict:
  """A tower the config builds but the checkpoint does not hold: kept (it starts from scratch, e.g. a Talker
  added to a converted Thinker) when it fits the stored towers, else left out with its objectives."""
  try:
    tower.view(config)
    log.warning("%s holds no %s: this config's %s starts from scratch", where, tower.name, tower.section)
    return config
  except ConfigError as e:
    log.warning("%s holds no %s, and config.%s does not fit its other towers (%s): the %s is left out",
                where, tower.name, tower.section, e, tower.name)
  return towers.without(config, tower.name)

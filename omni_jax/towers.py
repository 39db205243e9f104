"""The tower registry: every tower of the model (the Thinker now; the Talker and Token2Wav next) in one place.

A tower is one `Tower` entry: its config section and typed view, its module constructor, its converter
mapping rules, its FLOPs formula and its objectives. The rest of the code reads the registry:
  * omni_jax.models.omni.OmniModel builds `model.<name>` for each tower whose config section is present;
  * omni_jax.convert.hf maps parameters with the registered rules and stacks, and reports the checkpoint
    parts (`parts`) of towers the config does not build instead of failing on them;
  * omni_jax.train.metrics.FlopCounter sums the towers' FLOPs formulas;
  * omni_jax.train.step / omni_jax.evaluate.loss sum the weighted objectives (config.train.objectives);
  * validate() checks the whole config: the common keys (omni_jax.config) and each built tower's view.

Adding a tower: write its modules and a `TOWER = Tower(...)` entry module, then name that module in
BUILTIN below (or call register() from your own code, as tests/test_towers.py does). Nothing else changes.
"""

import contextlib
import copy
import dataclasses
import importlib
from typing import Any, Callable, Mapping, Optional, Sequence

import ml_collections

from omni_jax import config as config_lib
from omni_jax.config import ConfigError

# Modules holding the built-in entries (each defines TOWER); imported on first use of the registry, since
# they import the model code, which imports omni_jax.config.
BUILTIN = ("omni_jax.models.thinker_tower", "omni_jax.models.talker_tower", "omni_jax.models.token2wav_tower")

# Checkpoint parts that no registered tower implements yet: a checkpoint holding them converts with a
# warning (left out) instead of failing on unknown keys. A tower registering the prefix takes it over.
PLANNED: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class Objective:
  """A training objective: sums over its units (e.g. label tokens) that the step divides by a global count.

  loss(model, batch, rng, evaluate=False) -> {"loss_sum": [...], "count": [...], ...}: sums over this
    (micro-)batch; arrays of shape [len(omni_jax.batch.KINDS)] are reported per modality. `model` is the
    OmniModel (sharding rules active); `rng` a key distinct per step, micro-batch and objective. With
    evaluate=True it may add more sums (e.g. "correct" for accuracy); training never asks for them.
  normalizer(batch) -> scalar: the count the loss_sum is divided by, over the WHOLE global batch (all
    micro-batches), so grad accumulation and sharding give the same update.
  metrics: scalar-name prefix under train/ and eval/ ("" keeps today's names: train/loss, eval/ppl, ...;
    default: the objective's name, e.g. train/talker_codes/loss).
  summary(sums, prefix) -> {scalar name: value}: the scalars of its sums (summed over batches, as numpy);
    default: omni_jax.train.metrics' loss / ppl / accuracy, per modality.
  default: whether it trains when config.train.objectives is absent (False: only when named there, e.g. the
    DPO objectives, which need config.dpo).
  """
  name: str
  loss: Callable[..., dict]
  normalizer: Callable[[Mapping[str, Any]], Any]
  metrics: Optional[str] = None
  summary: Optional[Callable[[Mapping[str, Any], str], dict]] = None
  default: bool = True

  @property
  def metric_prefix(self) -> str:
    return self.name if self.metrics is None else self.metrics


@dataclasses.dataclass(frozen=True)
class Tower:
  """One tower of the model.

  name: the OmniModel attribute and the top-level checkpoint prefix ("thinker" -> thinker.*).
  section: the config section that switches the tower on ("model.thinker"); absent -> not built.
  view(config) -> typed, validated view of the section (raises ConfigError naming the key).
  build(config, runtime, rngs) -> the nnx.Module stored as OmniModel.<name>.
  stacked: our paths whose children are a stack of layers (on disk each layer has an index).
  rules: converter exceptions (omni_jax.convert.rules.Rule), tried before the generic leaf rules.
  parts: on-disk prefixes -> description, reported when the checkpoint has them but the model does not.
  flops(config, frozen, param_paths) -> object with step_flops(host batch) -> float (for MFU).
  objectives: the objectives this tower contributes (weights: config.train.objectives).
  """
  name: str
  section: str
  view: Callable[[ml_collections.ConfigDict], Any]
  build: Callable[..., Any]
  stacked: Sequence[str] = ()
  rules: Sequence[Any] = ()
  parts: Mapping[str, str] = dataclasses.field(default_factory=dict)
  flops: Optional[Callable[..., Any]] = None
  objectives: Sequence[Objective] = ()


_REGISTRY: dict[str, Tower] = {}
_LOADED = [False]


def register(tower: Tower) -> Tower:
  """Add (or replace) a tower entry; returns it."""
  _load_builtin()
  _REGISTRY[tower.name] = tower
  return tower


def unregister(name: str) -> None:
  _load_builtin()
  _REGISTRY.pop(name, None)


def _load_builtin() -> None:
  if not _LOADED[0]:
    _LOADED[0] = True
    for module in BUILTIN:
      tower = importlib.import_module(module).TOWER
      _REGISTRY.setdefault(tower.name, tower)


def registered() -> tuple[Tower, ...]:
  _load_builtin()
  return tuple(_REGISTRY.values())


def get(name: str) -> Tower:
  _load_builtin()
  return _REGISTRY[name]


def _has_section(config: ml_collections.ConfigDict, section: str) -> bool:
  node = config
  for part in section.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node or node[part] is None:
      return False
    node = node[part]
  return True


def built(config: ml_collections.ConfigDict) -> tuple[Tower, ...]:
  """The towers the config builds (those whose section is present), in registration order."""
  return tuple(t for t in registered() if _has_section(config, t.section))


# --------------------------------------------------------------------------------------- objectives

_SHARED: list[dict] = []


@contextlib.contextmanager
def shared_outputs(memo: Optional[dict] = None):
  """A scope in which objectives of one (micro-)batch share forward passes (see shared()): the Talker's code
  loss reads the Thinker's hidden states from the same forward that gives the text loss. memo: the scope's
  store (default: a fresh one); the DPO reference keeps its own, so its forwards are shared apart."""
  _SHARED.append({} if memo is None else memo)
  try:
    yield
  finally:
    _SHARED.pop()


def shared(key: str, compute: Callable[[], Any]) -> Any:
  """compute() once per shared_outputs() scope (every call outside a scope computes)."""
  if not _SHARED:
    return compute()
  memo = _SHARED[-1]
  if key not in memo:
    memo[key] = compute()
  return memo[key]



def _all_objectives(towers: Sequence[Tower]) -> dict[str, Objective]:
  return {o.name: o for t in towers for o in t.objectives}


def objective_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
  """{objective name: weight} from config.train.objectives (default: every built tower's default objective, 1.0)."""
  weights = config.train.get("objectives", None) if "train" in config else None
  if weights is None:
    return {name: 1.0 for name, o in _all_objectives(built(config)).items() if o.default}
  return {k: float(v) for k, v in weights.items()}


def weighted_objectives(config: ml_collections.ConfigDict) -> list[tuple[Objective, float]]:
  """(objective, weight) pairs the train step sums (weight 0 ones are left out: no work for them)."""
  known = _all_objectives(built(config))
  return [(known[name], w) for name, w in objective_weights(config).items() if w > 0]


def objective(name: str) -> Objective:
  return _all_objectives(registered())[name]


def _validate_objectives(config: ml_collections.ConfigDict, towers: Sequence[Tower]) -> None:
  weights = config.train.get("objectives", None)
  if weights is None:
    return
  key = "train.objectives"
  if not isinstance(weights, (Mapping, ml_collections.ConfigDict)):
    raise ConfigError(f"config.{key}: must map objective names to weights, got {weights!r}")
  known = _all_objectives(towers)
  everywhere = {o.name: t for t in registered() for o in t.objectives}
  for name, w in weights.items():
    if name not in known:
      why = (f"its tower {everywhere[name].name!r} is not built (config.{everywhere[name].section} is absent)"
             if name in everywhere else "unknown objective")
      raise ConfigError(f"config.{key}.{name}: {why}; objectives of the built towers: {sorted(known)}")
    ok = isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0
    if not ok:
      raise ConfigError(f"config.{key}.{name}: the weight must be a number >= 0, got {w!r}")
  if not any(w > 0 for w in weights.values()):
    raise ConfigError(f"config.{key}: at least one objective needs a positive weight, got {dict(weights)}")


def without(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """A copy of config that does not build tower `name`: its section and its objectives' weights removed (for
  a model adopted from a checkpoint that has no such tower)."""
  tower = get(name)
  config = copy.deepcopy(config)  # keeps typed placeholders (e.g. init_from), which a resolved copy loses
  with config.unlocked():
    parent, key = tower.section.rsplit(".", 1)
    node = config
    for part in parent.split("."):
      node = node[part]
    if key in node:
      del node[key]
    weights = config.train.get("objectives", None) if "train" in config else None
    for objective in tower.objectives:
      if weights is not None and objective.name in weights:
        del weights[objective.name]
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Fail fast on an inconsistent config (train.py / eval.py at startup): the common keys, every built
  tower's section, the objective weights. Every error names the key."""
  towers = built(config)
  if not towers:
    raise ConfigError(f"config.model: builds no tower; expected one of {[t.section for t in registered()]}")
  for tower in towers:
    tower.view(config)
  config_lib.validate_common(config)
  if "train" in config:
    _validate_objectives(config, towers)

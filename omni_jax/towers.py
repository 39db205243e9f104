"""The tower registry: every tower of the model (the Thinker, the Talker, Token2Wav) in one place.

A tower is one `Tower` entry: its config section and typed view, its module constructor, its converter
mapping rules, its FLOPs formula, its objectives and its data hook (the batch fields it adds). The rest of the
code reads the registry:
  * omni_jax.models.omni.OmniModel builds `model.<name>` for each tower whose config section is present;
  * omni_jax.convert.hf maps parameters with the registered rules and stacks, and reports the checkpoint
    parts (`parts`) of towers the config does not build instead of failing on them;
  * omni_jax.train.metrics.FlopCounter sums the towers' FLOPs formulas;
  * omni_jax.train.step / omni_jax.evaluate.loss sum the weighted objectives (config.train.objectives);
  * validate() checks the whole config: the common keys (omni_jax.config) and each built tower's view;
  * the data pipeline (omni_jax.input) asks each tower's data hook (TowerData, below) for its per-sample
    targets, bucket sizes and batch fields, and packs them without knowing any tower (data_hooks()).

This module imports no jax: the data workers read the data hooks without loading the model code.

Adding a tower: write a package holding its entry module `tower` (TOWER = Tower(...)) and, if it adds batch
fields, a numpy-only module `data` (DATA = a TowerData), then name the package in BUILTIN below (or call
register() from your own code, as tests/test_towers.py does). Nothing else changes.
"""

import contextlib
import copy
import dataclasses
import importlib
import importlib.util
from typing import Any, Callable, Mapping, Optional, Sequence

import ml_collections

from omni_jax import batch as batch_lib
from omni_jax.errors import ConfigError

# Packages of the built-in towers. Each holds its entry in `<package>.tower` (TOWER; it imports the model code,
# so it loads on first use of the registry) and, if it adds batch fields, its data hook in `<package>.data`
# (DATA; numpy only, loaded alone by data_hooks()).
BUILTIN = ("omni_jax.thinker", "omni_jax.talker", "omni_jax.token2wav")

@dataclasses.dataclass(frozen=True)
class Objective:
  """A training objective: sums over its units (e.g. label tokens) that the step divides by a global count.

  loss(model, batch, rng, evaluate=False) -> {"loss_sum": [...], "count": [...], ...}: sums over this
    (micro-)batch; arrays of shape [len(omni_jax.batch.KINDS)] are reported per modality. `model` is the
    OmniModel (sharding rules active); `rng` a key distinct per step, micro-batch and objective. With
    evaluate=True it may add more sums (e.g. "correct" for accuracy); training never asks for them.
  normalizer(batch) -> scalar: the count the loss_sum is divided by, over the WHOLE global batch (all
    micro-batches), so grad accumulation and sharding give the same update. The step differentiates
    sum(loss_sum) / normalizer: every entry of loss_sum weighted alike, which a loss may rely on (the Thinker's
    fused LM head computes its gradient in the forward pass, omni_jax.layers.head_loss).
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
  decoders: those of the stacked paths a decode step reads for every new token (generation may hold them one
    buffer per layer: omni_jax.generate.model.splits_layers); encoders run over many positions at once.
  rules: converter exceptions (omni_jax.convert.rules.Rule), tried before the generic leaf rules.
  parts: on-disk prefixes -> description, reported when the checkpoint has them but the model does not.
  flops(config, frozen, param_paths) -> object with step_flops(host batch) -> float (for MFU).
  objectives: the objectives this tower contributes (weights: config.train.objectives).
  data: its data hook (None: it adds no batch fields).
  """
  name: str
  section: str
  view: Callable[[ml_collections.ConfigDict], Any]
  build: Callable[..., Any]
  stacked: Sequence[str] = ()
  decoders: Sequence[str] = ()
  rules: Sequence[Any] = ()
  parts: Mapping[str, str] = dataclasses.field(default_factory=dict)
  flops: Optional[Callable[..., Any]] = None
  objectives: Sequence[Objective] = ()
  data: Optional["TowerData"] = None


_REGISTRY: dict[str, Tower] = {}
_REMOVED: set[str] = set()  # built-in towers unregistered by code (their data hooks go too)
_LOADED = [False]


def register(tower: Tower) -> Tower:
  """Add (or replace) a tower entry; returns it."""
  _load_builtin()
  _REGISTRY[tower.name] = tower
  _REMOVED.discard(tower.name)
  return tower


def unregister(name: str) -> None:
  _load_builtin()
  _REGISTRY.pop(name, None)
  _REMOVED.add(name)


def _load_builtin() -> None:
  if not _LOADED[0]:
    _LOADED[0] = True
    for package in BUILTIN:
      tower = importlib.import_module(f"{package}.tower").TOWER
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
  # The model's lower floors load jax; the data workers import this module without them.
  from omni_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from omni_jax import sharding  # pylint: disable=import-outside-toplevel
  from omni_jax.layers import attention  # pylint: disable=import-outside-toplevel

  towers = built(config)
  if not towers:
    raise ConfigError(f"config.model: builds no tower; expected one of {[t.section for t in registered()]}")
  for tower in towers:
    tower.view(config)
  config_lib.validate_common(config)
  attention.check_implementation(config.model.get("attention_impl", None))
  sharding.check_config(config)
  if "train" in config:
    _validate_objectives(config, towers)


# --------------------------------------------------------------------------------------- data hooks


class TargetError(ValueError):
  """A sample that cannot give a tower its targets; `reason` names the skip (counted as skipped/<reason>)."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


class Targets:
  """A run's maker of one tower's per-sample targets (made at startup by TowerData.targets). Picklable and numpy
  only: the preprocessor calls it in the data workers on every rendered sample."""

  def sample(self, name: str, messages: Sequence[Mapping], spans: Sequence[tuple[int, int]], pair: bool) -> Any:
    """The target of one rendered sample, or None (nothing for this tower). messages: the conversation as
    rendered (system prompt included); spans: the [start, end) token spans of its assistant messages; pair:
    the sample is one side of a preference pair, whose reply is its last message. Raises TargetError."""
    del name, messages, spans, pair
    return None

  def prefers(self, name: str, chosen: Any, rejected: Any, text: bool) -> bool:
    """Whether this tower learns the preference of a pair whose two sides have these targets (either may be
    None); text: whether the two replies' texts differ. Raises TargetError for a pair it cannot use."""
    del name, chosen, rejected, text
    return False

  def bucket_sizes(self, seq_len: int) -> dict[str, int]:
    """This run's default room for the tower's targets in a bucket of seq_len tokens (TowerData.sizes keys)."""
    del seq_len
    return {}


class TowerData:
  """A tower's data hook: what it adds to the batches (omni_jax.batch). The data pipeline (omni_jax.input) calls
  it and names no tower. Numpy only: the data workers import no jax.

  A sample carries the targets the run's Targets made for it (Sample.targets[name]); the packer puts it in a
  row of a bucket whose sizes leave room for them (fits), and assemble() writes them into the tower's fields of
  that row (write). A bucket whose sizes give the tower no room carries none of its fields.

  name: the tower's.
  fields: {batch field: number of dims, rows first}.
  token_fields: those whose second axis runs over positions (sharded like the tokens, over the context axis).
  pair_fields: those present only in the batches of a preference run (a bucket with max_pairs > 0).
  sizes: {bucket key: default}: the room per row for its targets (keys of config.data.buckets too).
  """
  name: str = ""
  fields: Mapping[str, int] = {}
  token_fields: frozenset = frozenset()
  pair_fields: frozenset = frozenset()
  sizes: Mapping[str, int] = {}

  def targets(self, config, preference: bool, train_sources: Callable[[], Mapping[str, Any]]) -> Optional[Targets]:
    """The run's Targets (None: the run trains nothing on this tower's data). config: the run's (a ConfigDict
    or plain dicts); preference: the mixture holds preference pairs; train_sources() opens the mixture's train
    splits ({dataset name: random-access source}) for a tower that scans them at startup."""
    del config, preference, train_sources
    return None

  def check_sizes(self, sizes: Mapping[str, int]) -> None:
    """Raise ValueError when a bucket's sizes for this tower are inconsistent."""

  def fits(self, targets: Sequence[Any], sizes: Mapping[str, int]) -> bool:
    """Whether one row of a bucket with these sizes holds these targets (those of the row's samples)."""
    del sizes
    return not targets

  def describe(self, targets: Sequence[Any]) -> str:
    """What these targets need, for the message of a sample that no bucket holds (e.g. "12 Talker positions")."""
    return f"{len(targets)} {self.name} targets"

  def empty(self, rows: int, sizes: Mapping[str, int], pairs: bool) -> dict:
    """The tower's fields of a batch of `rows` rows before any sample is written ({} when the sizes give it no
    room); pairs: the bucket holds preference pairs (pair_fields are added)."""
    del rows, sizes, pairs
    return {}

  def write(self, batch: dict, row: int, cursor: int, at: int, segment: int, target: Any, pair: int) -> int:
    """Write one sample's target into row `row` of the batch's fields; returns the next cursor.

    cursor: the tower's own place in the row (0 before the row's first sample, e.g. the next free slot); at:
    the sample's first token in the row; segment: its segment id; pair: the number of its preference pair in
    the row when the pair prefers for this tower (Targets.prefers), else 0.
    """
    raise NotImplementedError

  def check(self, batch: Mapping[str, Any]) -> None:
    """Raise ValueError naming the field when the tower's fields of a batch disagree with each other or with the
    text fields (omni_jax.batch.check already checked their dims, rows, and all-or-none)."""


def trains(config, objective: str) -> bool:
  """Whether config.train.objectives gives `objective` a positive weight (without it, every objective trains).
  Plain Python over a ConfigDict or dicts, for the data hooks."""
  weights = (config.get("train", None) or {}).get("objectives", None)
  return weights is None or float(weights.get(objective, 0.0)) > 0


def data_hooks() -> tuple[TowerData, ...]:
  """The data hooks of every tower, without loading the model code: the built-in packages' `data` modules, then
  the hooks of towers registered by code (a registered tower replaces a built-in one of its name)."""
  hooks: dict[str, Optional[TowerData]] = {}
  for package in BUILTIN:
    if importlib.util.find_spec(f"{package}.data") is not None:
      hook = importlib.import_module(f"{package}.data").DATA
      hooks[hook.name] = hook
  for tower in _REGISTRY.values():
    if tower.name in hooks or tower.data is not None:
      hooks[tower.name] = tower.data
  return tuple(h for name, h in hooks.items() if h is not None and name not in _REMOVED)


def token_fields() -> frozenset[str]:
  """The batch fields laid out per position ([B, positions, ...]): the text's and the towers' token_fields."""
  return frozenset(batch_lib.TOKEN_FIELDS).union(*(h.token_fields for h in data_hooks()))


def check_batch(batch: Mapping[str, Any]) -> None:
  """omni_jax.batch.check with every tower's fields."""
  batch_lib.check(batch, data_hooks())

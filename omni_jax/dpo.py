"""Preference tuning (DPO) of the Thinker and the Talker: config.dpo, its frozen reference model, and the summary
of the objectives' sums. The losses are omni_jax.preference's; the objectives are the towers' own:
`thinker_dpo` (omni_jax.thinker.objective) on text replies and `talker_dpo` (omni_jax.talker.objective) on
spoken replies (two code sequences for the same text).

config.dpo (absent: no DPO), read into DpoConfig, which each tower's module carries as `.dpo` (static):
  beta (0.1), label_smoothing (0.0, cDPO; sigmoid only), loss ("sigmoid" | "ipo"), max_pairs_per_row (8: the
  static pair axis of the objectives; the pipeline packs no more), reference ("auto"), sft_weight (0.0: the
  chosen reply's NLL per token added to each pair's loss, RPO).

The reference ("auto"): with config.lora, the same model with its adapters off (omni_jax.layers.lora.disabled():
the frozen base, no second copy of the weights); without it, the frozen copy of the starting weights that
OmniModel holds as model.reference.<tower>. A tower that does not train (no adapters under LoRA, or no copy in
model.reference) is its own reference, so its forward is shared with the policy's.
"""

import contextlib
import dataclasses
import re
import types
from typing import Any, Callable, Mapping, Optional

import jax
import ml_collections
import numpy as np

from omni_jax import preference, towers
from omni_jax.errors import ConfigError

OBJECTIVES = ("thinker_dpo", "talker_dpo")
KEYS = ("beta", "label_smoothing", "loss", "max_pairs_per_row", "reference", "sft_weight")
ADAPTERS_OFF, FROZEN_COPY = "adapters_off", "frozen_copy"


@dataclasses.dataclass(frozen=True)
class DpoConfig:
  """config.dpo, typed and validated, with its reference resolved: ADAPTERS_OFF (a LoRA run; `adapted` names the
  towers that carry adapters) or FROZEN_COPY (model.reference)."""
  beta: float = 0.1
  label_smoothing: float = 0.0
  loss: str = "sigmoid"
  max_pairs_per_row: int = 8
  sft_weight: float = 0.0
  reference: str = FROZEN_COPY
  adapted: tuple[str, ...] = ()

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Optional["DpoConfig"]:
    """None without config.dpo; ConfigError naming the key on a bad value."""
    section = config.get("dpo", None)
    if section is None:
      return None
    if not isinstance(section, (Mapping, ml_collections.ConfigDict)):
      raise ConfigError(f"config.dpo: must be a ConfigDict of {list(KEYS)}, got {section!r}")
    unknown = sorted(set(section.keys()) - set(KEYS))
    if unknown:
      raise ConfigError(f"config.dpo: unknown keys {unknown}; known: {list(KEYS)}")
    get = lambda k: section.get(k, getattr(cls, k, None))  # noqa: E731

    def number(key, ok, what):
      value = get(key)
      if not isinstance(value, (int, float, np.number)) or isinstance(value, bool) or not ok(value):
        raise ConfigError(f"config.dpo.{key}: must be {what}, got {value!r}")
      return float(value)

    beta = number("beta", lambda v: v > 0, "a number > 0")
    smoothing = number("label_smoothing", lambda v: 0 <= v < 0.5, "a number in [0, 0.5)")
    sft_weight = number("sft_weight", lambda v: v >= 0, "a number >= 0")
    loss = get("loss")
    if loss not in preference.LOSSES:
      raise ConfigError(f"config.dpo.loss: must be one of {list(preference.LOSSES)}, got {loss!r}")
    if loss == "ipo" and smoothing:
      raise ConfigError(f"config.dpo.label_smoothing: {smoothing} applies to the sigmoid loss only (cDPO); IPO "
                        "has none: set it to 0.0")
    pairs = get("max_pairs_per_row")
    if not isinstance(pairs, (int, np.integer)) or isinstance(pairs, bool) or pairs <= 0:
      raise ConfigError(f"config.dpo.max_pairs_per_row: must be a positive integer, got {pairs!r}")
    if section.get("reference", "auto") != "auto":
      raise ConfigError(f"config.dpo.reference: must be 'auto' (the adapter-free model with config.lora, else a "
                        f"frozen copy of the starting weights), got {section.get('reference')!r}")
    lora = config.get("lora", None)
    if lora is None:
      return cls(beta, smoothing, loss, int(pairs), sft_weight, FROZEN_COPY, ())
    targets = lora.get("targets", None) or {}
    return cls(beta, smoothing, loss, int(pairs), sft_weight, ADAPTERS_OFF, tuple(sorted(targets.keys())))

  def sums(self, policy: preference.PairLogps, reference: preference.PairLogps) -> dict:
    """The objective's sums over the valid pairs (omni_jax.preference.pair_objective_sums)."""
    return preference.pair_objective_sums(policy, reference, beta=self.beta, label_smoothing=self.label_smoothing,
                                          loss=self.loss, sft_weight=self.sft_weight)


def validate(config: ml_collections.ConfigDict) -> Optional[DpoConfig]:
  """config.dpo and the DPO objectives' weights agree (the Thinker's view calls this at startup)."""
  cfg = DpoConfig.from_config(config)
  weights = (config.train.get("objectives", None) if "train" in config else None) or {}
  weighted = [name for name in OBJECTIVES if float(weights.get(name, 0.0) or 0.0) > 0]
  if cfg is None and weighted:
    raise ConfigError(f"config.train.objectives.{weighted[0]}: preference tuning needs config.dpo (beta, loss, "
                      "...; configs/recipes/dpo.py)")
  if cfg is not None and "train" in config and not weighted:
    raise ConfigError(f"config.dpo: set, but config.train.objectives weights none of {list(OBJECTIVES)}; give one "
                      "a positive weight, or drop config.dpo (it builds a frozen reference)")
  return cfg


def copied_towers(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The towers a full (adapter-free) DPO run copies into model.reference, frozen: every built tower that
  config.train.freeze does not freeze whole (a frozen tower is its own reference). () without config.dpo or with
  config.lora (whose reference is the same model with its adapters off)."""
  if config.get("dpo", None) is None or config.get("lora", None) is not None:
    return ()
  freeze = tuple(config.train.get("freeze", ())) if "train" in config else ()
  return tuple(t.name for t in towers.built(config) if not any(re.fullmatch(p, t.name) for p in freeze))


def settings(module) -> Optional[DpoConfig]:
  """The DpoConfig a tower's module carries (None: the run does no DPO)."""
  return getattr(module, "dpo", None)


@contextlib.contextmanager
def _adapters_off(cfg: DpoConfig):
  """Inside: a LoRA run's adapters are off (the reference); nothing changes for a frozen-copy reference."""
  if cfg.reference != ADAPTERS_OFF:
    yield
    return
  from omni_jax.layers import lora  # pylint: disable=import-outside-toplevel  (LoRA runs only)

  with lora.disabled():
    yield


def reference_towers(model, cfg: DpoConfig, names) -> tuple[Any, tuple[str, ...]]:
  """(an object whose .<name> is each tower's reference module, the names among them that do not train and are
  therefore the policy's own module)."""
  frozen = getattr(model, "reference", None)
  if cfg.reference == FROZEN_COPY and frozen is None:
    raise ValueError("config.dpo without config.lora needs the frozen copy model.reference (OmniModel builds it "
                     "when config.dpo is set)")
  towers_of, same = {}, []
  for name in names:
    if cfg.reference == ADAPTERS_OFF:  # the policy's own modules, run under lora.disabled()
      towers_of[name] = getattr(model, name)
      trains = name in cfg.adapted
    else:
      copy = getattr(frozen, name, None)
      towers_of[name] = getattr(model, name) if copy is None else copy
      trains = copy is not None
    if not trains:
      same.append(name)
  return types.SimpleNamespace(**towers_of), tuple(same)


def reference(model, cfg: DpoConfig, key: str, compute: Callable[[Any], Any], names=("thinker",),
              policy_outputs: Optional[Mapping[str, Any]] = None) -> Any:
  """compute(ref) on the frozen reference under stop_gradient, once per omni_jax.towers.shared_outputs scope and
  key; ref has the reference module of each tower in `names` as an attribute.

  The reference's own forwards are shared between the objectives apart from the policy's (a memo of their own:
  thinker.inputs.outputs(ref.thinker, ...) is the reference's forward). policy_outputs: the policy's shared
  outputs by tower name (e.g. {"thinker": thinker.inputs.outputs(model.thinker, batch)}), reused for a tower
  that does not train instead of a second forward.
  """
  def run():
    ref, same = reference_towers(model, cfg, names)
    memo = towers.shared("dpo/reference_outputs", dict)
    for name in same:
      if policy_outputs and name in policy_outputs:
        memo.setdefault(name, policy_outputs[name])
    with _adapters_off(cfg), towers.shared_outputs(memo):
      return jax.tree.map(jax.lax.stop_gradient, compute(ref))

  return towers.shared(f"dpo/reference/{key}", run)


def summary(sums: Mapping[str, Any], prefix: str) -> dict:
  """Scalars of a DPO objective's sums (train/ and eval/, omni_jax.train.metrics.summarize): the mean loss over
  pairs, the pair count, the mean rewards of the chosen and rejected replies, their margin, and the accuracy
  (share of pairs whose chosen reward is the higher)."""
  total = lambda k: float(np.sum(np.asarray(sums[k], np.float64)))  # noqa: E731
  n = total("count")
  per = max(n, 1.0)
  return {f"{prefix}/loss": total("loss_sum") / per, f"{prefix}/pairs": n,
          f"{prefix}/rewards_chosen": total("chosen_reward") / per,
          f"{prefix}/rewards_rejected": total("rejected_reward") / per,
          f"{prefix}/margin": total("margin") / per, f"{prefix}/accuracy": total("correct") / per}

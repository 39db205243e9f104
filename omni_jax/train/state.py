"""The train state, parameter groups (frozen / trainable, decayed / not) and its sharded creation.

Parameters live in the state as a plain nested dict (nnx.to_pure_dict of the model), the layout of a params
checkpoint, so train-state checkpoints, converter checkpoints and init_from all share one tree. The optimizer
sees only the trainable subtree: frozen parameters carry no optimizer state at all and pass through the step
untouched (bit-identical).
"""

import re
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omni_jax import dpo, sharding
from omni_jax.errors import ConfigError
from omni_jax.layers import lora
from omni_jax.models import omni
from omni_jax.train import optim

Params = dict


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # optimizer steps taken (int32 scalar)
  params: Params  # every model parameter (float32 master weights), nested dict
  opt_state: Any  # optax state of the trainable parameters only
  rng: jax.Array  # raw uint32 key, split once per step


def path_str(path: Sequence[Any]) -> str:
  return ".".join(str(p) for p in path)


def frozen_paths(params: Params, patterns: Sequence[str]) -> frozenset:
  """Paths (tuples) of the parameters that `patterns` freeze.

  A pattern freezes a parameter when it fully matches the parameter's dotted path or a dotted prefix of it:
  "thinker.visual" freezes the whole vision tower, r"thinker\\.visual\\.(blocks|patch_embed)" its body but
  not the merger. A pattern that freezes nothing is a config error (a typo would silently train everything).
  """
  flat = traverse_util.flatten_dict(params)
  compiled = [(p, re.compile(p)) for p in patterns]
  used, out = set(), set()
  for path in flat:
    prefixes = [path_str(path[:i]) for i in range(1, len(path) + 1)]
    for p, rx in compiled:
      if any(rx.fullmatch(s) for s in prefixes):
        out.add(path)
        used.add(p)
  unused = [p for p, _ in compiled if p not in used]
  if unused:
    raise ConfigError(f"config.train.freeze: {unused} match no parameter (paths look like "
                      f"{path_str(next(iter(flat)))!r})")
  return frozenset(out)


def partition(params: Params, frozen: frozenset) -> tuple[Params, Params]:
  """(trainable, frozen) nested dicts; together they hold every leaf of `params` once."""
  flat = traverse_util.flatten_dict(params)
  train = {k: v for k, v in flat.items() if k not in frozen}
  fixed = {k: v for k, v in flat.items() if k in frozen}
  return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(fixed)


def combine(a: Params, b: Params) -> Params:
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(a), **traverse_util.flatten_dict(b)})


def decay_mask(abstract_state: nnx.State) -> Params:
  """True for parameters that get weight decay: not biases, not norm scales (logical axis `norm`)."""

  def decays(path, var):
    names = var.get_metadata().get("out_sharding") or ()
    return not (path[-1] == "bias" or "norm" in names)

  return traverse_util.unflatten_dict({p: decays(p, v) for p, v in nnx.to_flat_state(abstract_state)})


def opt_shardings(abstract_opt: Any, param_shardings: Params, mesh: Mesh) -> Any:
  """Shardings for an optax state: moments are laid out like their parameters, counters are replicated.

  A moment's dict-key path inside the optax state is its parameter's path (optax maps over the param tree).
  """
  by_path = traverse_util.flatten_dict(param_shardings)
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    return by_path.get(keys, replicated) if keys else replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_opt)


class Setup:
  """Everything static about the train state of a config on a mesh: graphdef, shardings, param groups."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
    self.config, self.mesh = config, mesh
    # Full DPO trains against frozen copies of its towers (model.reference), never saved (train/loop.py).
    self.reference = dpo.copied_towers(config)
    self.graphdef, abstract = omni.abstract_model(config, self.reference)
    self._abstract_model = (self.graphdef, abstract)
    self.abstract_params = nnx.to_pure_dict(abstract)
    self.param_shardings = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh, config.sharding_rules))
    self.frozen = frozen_paths(self.abstract_params, tuple(config.train.freeze))
    self.lora = lora.LoraConfig.from_config(config)
    flat = traverse_util.flatten_dict(self.abstract_params)
    if self.lora is not None:  # the base is frozen whole: only adapters train (those freeze names excepted)
      self.frozen |= frozenset(k for k in flat if not lora.is_adapter(k))
    self.frozen |= frozenset(k for k in flat if k[0] == "reference")
    trainable_mask, _ = partition(decay_mask(abstract), self.frozen)
    self.schedule = optim.schedule(config.train)
    self.tx = optim.make(config.train, trainable_mask)
    abstract_train, _ = partition(self.abstract_params, self.frozen)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_train)
    replicated = NamedSharding(mesh, PartitionSpec())
    self.shardings = TrainState(step=replicated, params=self.param_shardings,
                                opt_state=opt_shardings(abstract_opt, self.param_shardings, mesh), rng=replicated)
    self._init = None
    self.abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=self.abstract_params,
                               opt_state=abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))

  def abstract_with_shardings(self) -> TrainState:
    """Restore target: shapes, dtypes and the current mesh's layout (orbax reshards on restore)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract,
                        self.shardings)

  def num_params(self, trainable_only: bool = False) -> int:
    flat = traverse_util.flatten_dict(self.abstract_params)
    return sum(v.size for k, v in flat.items() if not (trainable_only and k in self.frozen))

  def init_params(self, only: Sequence[str] | None = None) -> Params:
    """Freshly initialised parameters on their devices: all of them, or the top-level parts `only`."""
    _, state, _ = omni.create_sharded(self.config, self.mesh, reference=self.reference,
                                      abstract=self._abstract_model, only=only)
    return nnx.to_pure_dict(state)

  def init(self, params: Params | None = None) -> TrainState:
    """A fresh state: parameters initialised on their devices (or the given ones), zeroed optimizer state."""
    if params is None:
      params = self.init_params()

    if self._init is None:
      def make(params):
        trainable, _ = partition(params, self.frozen)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(trainable),
                          rng=jax.random.key_data(jax.random.key(self.config.get("seed", 0))).astype(jnp.uint32))

      self._init = jax.jit(make, in_shardings=(self.param_shardings,), out_shardings=self.shardings)
    return self._init(params)

"""The whole model: one attribute per tower the config builds (omni_jax.towers), and its sharded creation."""

from typing import Optional, Sequence

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from omni_jax import config as config_lib
from omni_jax import sharding, towers, xla_options
from omni_jax.layers import grouped_init, lora


class OmniModel(nnx.Module):
  """Top-level container; attribute names are the towers' names, which are the checkpoint's top-level
  prefixes (thinker., talker., ...). A tower whose config section is absent is not built."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs, reference: Sequence[str] = ()):
    rt = config_lib.Runtime.from_config(config.model)
    with grouped_init.grouped():  # the towers' parameters drawn a group at a time: a smaller init program
      for tower in towers.built(config):
        setattr(self, tower.name, tower.build(config, rt, rngs))
    if reference:  # full DPO's frozen reference: copies of the towers that train (omni_jax.dpo.copied_towers)
      self.reference = Towers({name: nnx.clone(getattr(self, name)) for name in reference})
    adapters = lora.LoraConfig.from_config(config)
    if adapters is not None:
      lora.attach(self, adapters, rngs)


class Towers(nnx.Module):
  """A named group of tower modules (model.reference.<tower>)."""

  def __init__(self, modules: dict):
    for name, module in modules.items():
      setattr(self, name, module)


def abstract_model(config: ml_collections.ConfigDict, reference: Sequence[str] = ()) -> tuple[nnx.GraphDef, nnx.State]:
  """graphdef + abstract state (shapes/dtypes, no memory), e.g. to build shardings or restore targets."""
  return nnx.split(nnx.eval_shape(lambda: OmniModel(config, rngs=nnx.Rngs(0), reference=reference)))


def create_sharded(config: ml_collections.ConfigDict, mesh: Mesh, seed: Optional[int] = None,
                   reference: Sequence[str] = (), abstract: Optional[tuple[nnx.GraphDef, nnx.State]] = None,
                   only: Optional[Sequence[str]] = None):
  """(graphdef, state, shardings): parameters initialised directly in their sharded layout on `mesh`.

  The initialiser runs under jit with out_shardings, so no host or device ever holds a full copy of a
  sharded parameter. abstract: abstract_model(config, reference), where the caller has it already.
  only: the top-level parts of the state to initialise (e.g. ["token2wav"]); `state` and `shardings` hold
  those alone, with the values a whole initialisation gives them. XLA drops the rest of the initialiser, so a
  tower added to a restored model costs its own initialisation, not the whole model's.
  """
  seed = config.get("seed", 0) if seed is None else seed
  graphdef, abstract_state = abstract or abstract_model(config, reference)
  if only is not None:
    unknown = sorted(set(only) - set(abstract_state.keys()))
    if unknown:
      raise ValueError(f"create_sharded(only=...): {unknown} are not parts of the model "
                       f"({sorted(abstract_state.keys())})")
    abstract_state = nnx.State({k: abstract_state[k] for k in only})
  shardings = sharding.state_shardings(abstract_state, mesh, config.sharding_rules)

  @jax.jit(out_shardings=shardings)
  def init():
    state = nnx.split(OmniModel(config, rngs=nnx.Rngs(seed), reference=reference))[1]
    return state if only is None else nnx.State({k: state[k] for k in only})

  with sharding.activate(mesh, config.sharding_rules):
    options = xla_options.for_program("init", mesh.devices.flat[0].platform)
    state = init.lower().compile(compiler_options=options)()
  return graphdef, state, shardings

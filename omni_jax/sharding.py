"""Device meshes, the logical-axis rule table, and the one helper that constrains activations.

Every parameter carries logical axis names (see layers.linear.param). A rule table from the config maps each
logical name to mesh axes; this module turns names into PartitionSpecs and NamedShardings. Mesh axes that
do not divide a dimension are dropped for that dimension (so tiny configs run on any mesh; for a parameter
this is logged as a warning, once per parameter), as are axes of size 1 and axes already used by an earlier
dimension.
"""

import contextlib
import contextvars
import logging
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omni_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "context", "tensor")

Rules = Sequence[tuple[str, Any]]

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("omni_jax_sharding", default=None)


def mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Mesh sizes in MESH_AXES order; one axis may be -1 (takes the remaining devices)."""
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f"config.mesh has unknown axes {sorted(unknown)}; known: {MESH_AXES}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ConfigError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    if num_devices % known:
      raise ConfigError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible "
                       f"by the fixed axes ({known})")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ConfigError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"{num_devices} are present")
  return tuple(sizes)


def make_mesh(shape: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh over `devices` (default: all devices of all processes) with axes MESH_AXES."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(shape, len(devices))
  if len(devices) == len(jax.devices()) and jax.process_count() > 1:
    # Auto axes: jax.make_mesh defaults to Explicit ones, which this codebase's constrain() does not use.
    return jax.make_mesh(sizes, MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def check_config(config) -> None:
  """config.mesh and config.sharding_rules name only known mesh axes (towers.validate, at startup)."""
  if "mesh" in config:
    unknown = set(config.mesh.keys()) - set(MESH_AXES)
    if unknown:
      raise ConfigError(f"config.mesh: unknown axes {sorted(unknown)}; known {MESH_AXES}")
  if "sharding_rules" in config:
    _rule_table(config.sharding_rules)


def _rule_table(rules: Rules) -> dict[str, tuple[str, ...]]:
  table = {}
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      raise ConfigError(f"config.sharding_rules: {rule!r} is not a (logical name, mesh axes) pair")
    name, axes = rule
    if axes is None:
      axes = ()
    elif isinstance(axes, str):
      axes = (axes,)
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ConfigError(f"config.sharding_rules: rule for {name!r} names unknown mesh axes {bad}")
    table[name] = tuple(axes)
  return table


def logical_to_spec(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh, rules: Rules,
                    strict: bool = True, warn_as: Optional[str] = None,
                    units: Optional[Sequence[int]] = None) -> PartitionSpec:
  """PartitionSpec for an array of `shape` whose dimensions carry logical `names`.

  units: per dimension, the indivisible piece (head_dim for a flattened heads x head_dim axis): a mesh axis
  shards a dimension only if it divides its number of pieces, so heads are never split.

  warn_as: a parameter path; a mesh axis dropped because it does not divide a dimension is then logged
  (once per path, axis and dimension), so that a mistyped mesh cannot silently replicate a large model.
  """
  table = _rule_table(rules)
  used: set[str] = set()
  spec = []
  units = tuple(units) if units is not None else (1,) * len(shape)
  for name, dim, unit in zip(names, shape, units):
    if name is not None and name not in table and strict:
      raise KeyError(f"logical axis {name!r} has no rule in config.sharding_rules")
    chosen = []
    size = 1
    for axis in table.get(name, ()) if name is not None else ():
      n = mesh.shape[axis]
      if n == 1 or axis in used:
        continue
      if (dim // unit) % (size * n):
        if warn_as is not None:
          _warn_dropped(warn_as, name, axis, n, dim, size, unit)
        continue
      chosen.append(axis)
      size *= n
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*spec)


_WARNED: set = set()


def _warn_dropped(path: str, name: str, axis: str, n: int, dim: int, size: int, unit: int = 1) -> None:
  key = (path, name, axis, n, dim)
  if key in _WARNED:
    return
  _WARNED.add(key)
  already = f" (already split {size} ways)" if size > 1 else ""
  what = f"size {dim}" if unit == 1 else f"{dim // unit} pieces of {unit} (whole heads)"
  log.warning("parameter %s: mesh axis %r (size %d) does not divide its %r dimension of %s%s; that "
              "dimension is not sharded over %r", path, axis, n, name, what, already, axis)


def shard_units(variable: nnx.Variable) -> Optional[tuple]:
  """A parameter's per-dimension shard units (omni_jax.layers.linear.param), None if all 1."""
  units = variable.get_metadata().get("shard_units")
  return tuple(units) if units is not None else None


def _names_of(variable: nnx.Variable) -> Optional[tuple]:
  names = variable.get_metadata().get("out_sharding")
  return tuple(names) if names is not None else None


def variable_spec(variable: nnx.Variable, mesh: Mesh, rules: Rules, where: Optional[str] = None) -> PartitionSpec:
  """A parameter's PartitionSpec from its logical names and shard units (replicated without names)."""
  names = _names_of(variable)
  shape = variable.get_value().shape
  if names is None:
    return PartitionSpec()
  units = shard_units(variable)
  if units is not None and len(units) < len(shape):  # stacked layers: a leading `layers` axis was added
    units = (1,) * (len(shape) - len(units)) + units
  return logical_to_spec(names, shape, mesh, rules, warn_as=where, units=units)


def state_specs(state: Any, mesh: Mesh, rules: Rules) -> Any:
  """PartitionSpecs for an nnx State (or abstract state) from each variable's logical names."""

  def spec(path, variable):
    where = ".".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
    return variable.replace(variable_spec(variable, mesh, rules, where))

  return jax.tree_util.tree_map_with_path(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for an nnx State (or abstract state)."""
  specs = state_specs(state, mesh, rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


@contextlib.contextmanager
def activate(mesh: Optional[Mesh], rules: Rules):
  """Within this context (at trace time), constrain() pins activations to the mesh by the rules."""
  token = _ACTIVE.set((mesh, tuple(rules)) if mesh is not None else None)
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active() -> Optional[tuple[Mesh, tuple]]:
  """(mesh, rules) inside activate(), else None."""
  return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op outside activate() or on a 1-device mesh."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  if mesh.size == 1:
    return x
  spec = logical_to_spec(names, x.shape, mesh, rules, strict=False)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


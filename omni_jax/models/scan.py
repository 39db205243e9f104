"""Run a stack of identical layers: one lax.scan (or an unrolled loop) with a rematerialisation policy.

The layers are created stacked (nnx.vmap, leading `layers` axis), so checkpoints have the same layout
whether the forward pass scans or unrolls. For decoding, split_layers holds each stacked parameter as one
buffer per layer (LayerSlices) and the stack runs unrolled over them: a layer's matmuls then read its weights
where they lie. A slice of the stacked arrays (dynamic in a scan, static unrolled) is a copy on a GPU, which
costs a decode step twice the weights' bytes.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from omni_jax.errors import ConfigError
from omni_jax.layers import flash, grouped_init, lora
from omni_jax.layers.linear import Linear

_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
    # Every matmul's output and the attention kernels' residuals kept, the elementwise work (norms, rotary,
    # SwiGLU, residual adds) recomputed inside the backward pass's fusions. Scanned layers on a GPU keep
    # fewer per-layer stacks than with "none" and run no kernel twice (flash_gpu and blocked name their
    # residuals; a kernel that does not, such as TPU splash, runs its forward again).
    "dots_and_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_saveable, jax.checkpoint_policies.save_only_these_names(flash.RESIDUALS)),
}


def create_stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
  """num_layers independently initialised copies of a layer, stacked along a leading `layers` axis."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(r):
    with grouped_init.suspended():  # the variables made inside vmap are not the ones it returns
      return make_layer(r)

  return make(rngs)


@jax.tree_util.register_pytree_node_class
class LayerSlices:
  """A stacked parameter held as one array per layer (split_layers): what a stack's variable holds instead of
  the [layers, ...] array. A pytree of those arrays, so it crosses jit boundaries as separate buffers."""

  def __init__(self, layers):
    self.layers = tuple(layers)

  def __len__(self) -> int:
    return len(self.layers)

  def tree_flatten(self):
    return self.layers, None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(children)


def _is_slices(x) -> bool:
  return isinstance(x, LayerSlices)


def _layer_sharding(sharding):
  """A stacked array's NamedSharding without its first (`layers`) dimension: one layer's."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
  return sharding


def _split_array(a):
  """LayerSlices of a stacked array (or of a ShapeDtypeStruct, for compiling without weights): each layer's
  array keeps the stacked one's sharding of its other dimensions."""
  n = a.shape[0]
  sharding = _layer_sharding(getattr(a, "sharding", None))
  if isinstance(a, jax.ShapeDtypeStruct):
    return LayerSlices(jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=sharding) for _ in range(n))
  slicer = jax.jit(lambda x: tuple(x[i] for i in range(n)),
                   out_shardings=None if sharding is None else (sharding,) * n)
  return LayerSlices(slicer(a))


LAYER_BUFFERS = ("auto", "split", "stacked")  # config.generate.layer_buffers


def splits_on(mode: str, platform: str) -> bool:
  """Whether config.generate.layer_buffers `mode` holds inference stacks as per-layer buffers on `platform`:
  "split" everywhere, "stacked" nowhere, "auto" on GPUs, whose programs copy a stack's slice before each matmul
  that reads it (a TPU reads the slice inside the matmul's fusion). A ConfigError names the key otherwise."""
  if mode not in LAYER_BUFFERS:
    raise ConfigError(f"config.generate.layer_buffers: must be one of {LAYER_BUFFERS}, got {mode!r}")
  return mode == "split" or (mode == "auto" and platform == "gpu")


def split_layers(state, under: Sequence[tuple] = ()):
  """`state` (an nnx State, arrays or ShapeDtypeStructs) with every stacked variable (its first logical axis
  `layers`) held as LayerSlices, only those under one of the `under` paths (key tuples, e.g. ("thinker",
  "model", "layers")) if any are given; run_stacked then unrolls those stacks over the per-layer buffers. The
  stacked arrays are not changed (the caller drops them to free their memory)."""

  def split(path, variable):
    names = variable.get_metadata().get("out_sharding")
    value = variable.get_value()
    keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    if not names or names[0] != "layers" or _is_slices(value):
      return variable
    if under and not any(keys[:len(prefix)] == tuple(prefix) for prefix in under):
      return variable
    return variable.replace(_split_array(value))

  return jax.tree_util.tree_map_with_path(split, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def split_shardings(shardings, split_state):
  """The shardings of split_state = split_layers(state) from state's: each per-layer buffer's."""

  def one(sharding, variable):
    value = variable.get_value()
    if not _is_slices(value):
      return sharding
    return sharding.replace(LayerSlices((_layer_sharding(sharding.get_value()),) * len(value)))

  return jax.tree.map(one, shardings, split_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def astype(value, dtype):
  """A parameter's value (an array, or LayerSlices of them) in `dtype`."""
  if _is_slices(value):
    return LayerSlices(jnp.asarray(a, dtype) for a in value.layers)
  return jnp.asarray(value, dtype)


def is_split(state) -> bool:
  """Whether split_layers holds any of state's stacks as per-layer buffers."""
  return any(_is_slices(leaf) for leaf in jax.tree.leaves(state, is_leaf=_is_slices))


# Whether the compiler copies a layer's static slice of a stacked KV cache before the attention's matmuls.
# Compiled for an H200 (7B decode step, 256 cache slots): jax 0.11's XLA:GPU copies every layer's window
# (batch 32: 896 MiB a step, 56 kernels); jax 0.10's reads the slice inside the matmul's fusion, and lays a
# layer's buffer of its own out for the single-row product with a transpose at every step instead (batch 1,
# 4,096 slots: 1.12x the bytes).
STACKED_CACHE_SLICES_COPIED = jax.__version_info__ >= (0, 11)


def caches_per_layer(state) -> bool:
  """Whether a decoder stack with weights `state` keeps its KV cache as one buffer per layer (KVCache.create's
  per_layer): where its weights are split (it runs unrolled) and a stacked cache's slices would be copied."""
  return STACKED_CACHE_SLICES_COPIED and is_split(state)


def _cast_before_the_loop(layers: nnx.Module, state):
  """state with every Linear's kernel and bias already in the dtype the Linear computes in (int8 kernels, which
  a scale multiplies, are left). Cast inside a differentiated scan without rematerialisation, each layer's
  cast weights are residuals of the backward pass: the loop writes them into stacks of their own ([layers,
  ...] in bfloat16 beside the float32 stack) and the backward loop reads them back. Cast before the loop, the
  bfloat16 stack is the loop's input, which the backward pass reads as the forward did. The values are the
  same: a cast commutes with taking a layer's slice."""
  casts = {}
  for path, module in nnx.iter_graph(layers):
    if isinstance(module, Linear) and module.kernel_scale is None:
      for name in ("kernel", "bias"):
        if getattr(module, name) is not None:
          casts[(*path, name)] = module.dtype
  flat = dict(nnx.to_flat_state(state))
  for path, dtype in casts.items():
    variable = flat.get(path)
    if variable is not None and jnp.issubdtype(variable.get_value().dtype, jnp.floating):
      flat[path] = variable.replace(jnp.asarray(variable.get_value(), dtype))
  return nnx.from_flat_state(flat)


def run_stacked(layers: nnx.Module, x: jax.Array, *args, scan: bool, remat_policy: str,
                per_layer: tuple = (), carry=None):
  """x -> layer_{L-1}(... layer_0(x, *args, *per_layer[:][0]) ..., *args, *per_layer[:][L-1]).

  per_layer: pytrees with a leading num_layers axis; layer i also receives their row i (e.g. a flag that
  picks this layer's attention mask), so layers that differ only in data still run as one scan.
  carry: state every layer reads and updates, e.g. a KV cache of all layers (leading num_layers axis):
  layer i is called with carry=..., layer=i and returns (x, carry), and the result is (x, carry). It
  travels in the loop's carry, which XLA updates in place; as a per-layer input stacked again as an output
  it would be copied whole at every call. Stacks held as LayerSlices (split_layers) run unrolled, each layer
  on its own buffers, whatever `scan` says.
  """
  graphdef, state = nnx.split(layers)
  split = is_split(state)
  if scan and not split and remat_policy == "none" and carry is None:  # what the backward pass would keep
    state = _cast_before_the_loop(layers, state)
  leaves = jax.tree.leaves(state, is_leaf=_is_slices)
  num_layers = len(next(leaf for leaf in leaves if _is_slices(leaf))) if split else leaves[0].shape[0]

  def body(c, xs):
    h, carried = c
    layer_state, extra, index = xs
    with lora.layer(index):  # each layer draws its own adapter-dropout masks
      layer = nnx.merge(graphdef, layer_state)
      if carry is None:
        return (layer(h, *args, *extra), None), None
      return layer(h, *args, *extra, carry=carried, layer=index), None

  if remat_policy != "none":
    body = jax.checkpoint(body, policy=_POLICIES[remat_policy], prevent_cse=not scan or split)
  xs = (state, tuple(per_layer), jnp.arange(num_layers))
  c = (x, carry)
  if scan and not split:
    c, _ = jax.lax.scan(body, c, xs)
  else:
    for i in range(num_layers):
      layer_state, extra, _ = jax.tree.map(lambda a: a.layers[i] if _is_slices(a) else a[i], xs, is_leaf=_is_slices)
      # The index as a Python int: a layer's rows of `carry` (its KV cache) are then a static slice, which a
      # GPU's matmul reads in place, where a traced index's dynamic slice is copied first.
      c, _ = body(c, (layer_state, extra, i))
  return c if carry is not None else c[0]

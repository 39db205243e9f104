"""Run a stack of identical layers: one lax.scan (or an unrolled loop) with a rematerialisation policy.

The layers are created stacked (nnx.vmap, leading `layers` axis), so checkpoints have the same layout
whether the forward pass scans or unrolls.
"""

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from omni_jax.layers import grouped_init, lora

_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


def create_stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
  """num_layers independently initialised copies of a layer, stacked along a leading `layers` axis."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(r):
    with grouped_init.suspended():  # the variables made inside vmap are not the ones it returns
      return make_layer(r)

  return make(rngs)


def run_stacked(layers: nnx.Module, x: jax.Array, *args, scan: bool, remat_policy: str,
                per_layer: tuple = (), carry=None):
  """x -> layer_{L-1}(... layer_0(x, *args, *per_layer[:][0]) ..., *args, *per_layer[:][L-1]).

  per_layer: pytrees with a leading num_layers axis; layer i also receives their row i (e.g. a flag that
  picks this layer's attention mask), so layers that differ only in data still run as one scan.
  carry: state every layer reads and updates, e.g. a KV cache of all layers (leading num_layers axis):
  layer i is called with carry=..., layer=i and returns (x, carry), and the result is (x, carry). It
  travels in the loop's carry, which XLA updates in place; as a per-layer input stacked again as an output
  it would be copied whole at every call.
  """
  graphdef, state = nnx.split(layers)

  def body(c, xs):
    h, carried = c
    layer_state, extra, index = xs
    with lora.layer(index):  # each layer draws its own adapter-dropout masks
      layer = nnx.merge(graphdef, layer_state)
      if carry is None:
        return (layer(h, *args, *extra), None), None
      return layer(h, *args, *extra, carry=carried, layer=index), None

  if remat_policy != "none":
    body = jax.checkpoint(body, policy=_POLICIES[remat_policy], prevent_cse=not scan)
  xs = (state, tuple(per_layer), jnp.arange(jax.tree.leaves(state)[0].shape[0]))
  c = (x, carry)
  if scan:
    c, _ = jax.lax.scan(body, c, xs)
  else:
    for i in range(jax.tree.leaves(state)[0].shape[0]):
      c, _ = body(c, jax.tree.map(lambda a: a[i], xs))
  return c if carry is not None else c[0]

"""The jitted train step: a pure function (state, batch) -> (state, metrics).

Inside the step: the weighted sum of the objectives that config.train.objectives names (each tower registers
its own in omni_jax.towers; the Thinker's next-token cross-entropy is `thinker_text`), gradient accumulation
over micro-batches with lax.scan, AdamW. Each objective gets a key of its own, split from state.rng per step
and per micro-batch (flow matching draws noise with it).

Each objective's loss is a SUM over its units (label tokens) divided by their count over the whole global
batch (all micro-batches, all devices), so k micro-batches of b rows give the same update as one batch of
k*b rows, and every device's tokens weigh the same whatever the sharding.
"""

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omni_jax import batch as batch_lib
from omni_jax import sharding, towers, xla_options
from omni_jax.layers import lora
from omni_jax.thinker.inputs import label_mask, model_inputs  # noqa: F401
from omni_jax.train import state as state_lib

NUM_KINDS = len(batch_lib.KINDS)
Batch = Mapping[str, jax.Array]


def objective_sums(model, batch: Batch, rng: jax.Array, objectives, mesh: Optional[Mesh], rules,
                   evaluate: bool = False) -> dict:
  """{objective name: its sums} on one (micro-)batch; objective i gets fold_in(rng, i)."""
  with sharding.activate(mesh, rules), towers.shared_outputs():
    return {o.name: o.loss(model, batch, jax.random.fold_in(rng, i), evaluate=evaluate)
            for i, o in enumerate(objectives)}


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, rules) -> dict:
  """Rows over data/fsdp (activation_batch), text over context (activation_length); media rows likewise."""
  out = {}
  token_fields = towers.token_fields()
  for k, v in batch.items():
    per_token = k in token_fields
    names = ("activation_batch", "activation_length") if per_token else ("activation_batch",)
    names = names + (None,) * (len(v.shape) - len(names))
    out[k] = NamedSharding(mesh, sharding.logical_to_spec(names, v.shape, mesh, rules))
  return out


def split_micro(batch: Batch, k: int, mesh: Mesh, rules) -> Batch:
  """[B, ...] -> [k, B/k, ...]; micro-batch j takes rows j, j+k, j+2k, ... so each device keeps its rows."""

  def split(x):
    y = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    return jnp.moveaxis(y, 1, 0)

  micro = {key: split(v) for key, v in batch.items()}
  shard = batch_shardings({key: v[0] for key, v in micro.items()}, mesh, rules)
  return {key: jax.lax.with_sharding_constraint(
      v, NamedSharding(mesh, PartitionSpec(None, *shard[key].spec))) for key, v in micro.items()}


def make_train_step(setup: state_lib.Setup) -> Callable:
  """The pure step function; jit it with jit_train_step."""
  config, mesh, graphdef = setup.config, setup.mesh, setup.graphdef
  rules = config.sharding_rules
  k = config.train.grad_accum_steps
  nan_step = config.train.get("debug_nan_at_step", -1)
  train_shardings, _ = state_lib.partition(setup.param_shardings, setup.frozen)
  weighted = towers.weighted_objectives(config)
  objectives = [o for o, _ in weighted]

  def step(state: state_lib.TrainState, batch: Batch):
    trainable, frozen = state_lib.partition(state.params, setup.frozen)
    # Each objective's normaliser: its count over the whole global batch.
    norms = [jnp.maximum(o.normalizer(batch), 1).astype(jnp.float32) for o in objectives]
    scale = jnp.float32(1.0)
    if nan_step >= 0:  # test hook: poison the loss of one step
      scale = jnp.where(state.step + 1 == nan_step, jnp.float32(jnp.nan), scale)
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))

    def loss_fn(trainable, micro, key):
      model = nnx.merge(graphdef, state_lib.combine(trainable, frozen))
      # Adapter dropout draws apart from the objectives' keys (fold_in(key, i) for objective i).
      with lora.dropout_key(jax.random.fold_in(key, len(objectives)) if setup.lora is not None else None):
        sums = objective_sums(model, micro, key, objectives, mesh, rules)
      loss = sum(w * jnp.sum(sums[o.name]["loss_sum"]) / n for (o, w), n in zip(weighted, norms))
      return loss * scale, sums

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:
      (_, sums), grads = grad_fn(trainable, batch, step_rng)
    else:
      def accumulate(carry, xs):
        grads, sums = carry
        micro, key = xs
        (_, s), g = grad_fn(trainable, micro, key)
        grads = jax.tree.map(jnp.add, grads, g)
        grads = jax.lax.with_sharding_constraint(grads, train_shardings)
        return (grads, jax.tree.map(jnp.add, sums, s)), None

      micros = split_micro(batch, k, mesh, rules)
      keys = jax.random.split(step_rng, k)
      zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, trainable), train_shardings)
      shapes = jax.eval_shape(loss_fn, trainable, jax.tree.map(lambda x: x[0], micros), keys[0])[1]
      zero_sums = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
      (grads, sums), _ = jax.lax.scan(accumulate, (zeros, zero_sums), (micros, keys))

    updates, opt_state = setup.tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_state = state.replace(step=state.step + 1, params=state_lib.combine(trainable, frozen),
                              opt_state=opt_state, rng=jax.random.key_data(rng))
    sums = jax.tree.map(lambda x: x * scale, sums)
    loss = sum(w * jnp.sum(sums[o.name]["loss_sum"]) / n for (o, w), n in zip(weighted, norms))
    metrics = {"loss": loss, "objectives": sums, "grad_norm": optax.global_norm(grads),
               "tokens": jnp.sum(batch["segment_ids"] > 0), "lr": setup.schedule(state.step)}
    return new_state, metrics

  return step


def jit_train_step(setup: state_lib.Setup) -> Callable:
  """jax.jit of the step with the state's shardings in and out, the batch's shardings in, state donated.

  One compiled program per batch layout (fields and shapes: e.g. each length bucket of the pipeline), built on
  first use.
  """
  step = make_train_step(setup)
  cache = {}

  def run(state, batch):
    key = tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))
    if key not in cache:
      cache[key] = jit_for_layout(setup, batch, step)
    return cache[key](state, batch)

  return run


def jit_for_layout(setup: state_lib.Setup, batch: Mapping[str, Any], step: Optional[Callable] = None):
  """The jitted step for one batch layout (arrays or ShapeDtypeStructs); omni_jax.aot lowers exactly this."""
  step = step or make_train_step(setup)
  replicated = NamedSharding(setup.mesh, PartitionSpec())
  b_shard = batch_shardings(batch, setup.mesh, setup.config.sharding_rules)
  platform = next(iter(setup.mesh.devices.flat)).platform
  return jax.jit(step, in_shardings=(setup.shardings, b_shard), out_shardings=(setup.shardings, replicated),
                 donate_argnums=(0,), compiler_options=xla_options.for_program("train", platform))

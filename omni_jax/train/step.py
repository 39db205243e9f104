"""The loss and the jitted train step: a pure function (state, batch) -> (state, metrics).

Inside the step: TMRoPE positions from the batch (omni_jax.positions.rope_index), the Thinker forward pass
(nnx.merge of the graphdef with the parameters), next-token cross-entropy over label tokens that never
crosses a packed-segment boundary, gradient accumulation over micro-batches with lax.scan, AdamW.

The loss is a SUM over label tokens divided by the label count of the whole global batch (all micro-batches,
all devices), so k micro-batches of b rows give the same update as one batch of k*b rows, and every
device's tokens weigh the same whatever the sharding.
"""

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omni_jax import batch as batch_lib
from omni_jax import config as config_lib
from omni_jax import positions as positions_lib
from omni_jax import sharding
from omni_jax.train import state as state_lib

NUM_KINDS = len(batch_lib.KINDS)
Batch = Mapping[str, jax.Array]


def _flat(x: Optional[jax.Array]) -> Optional[jax.Array]:
  """[B, N, ...] per-row media -> [B*N, ...] in transformers' row-major item order."""
  return None if x is None else x.reshape((-1,) + x.shape[2:])


def model_inputs(batch: Batch, ids: config_lib.TokenIds) -> tuple[jax.Array, dict]:
  """(positions [3, B, L], media kwargs of Thinker.__call__) from a batch (omni_jax.batch contract)."""
  positions, _ = positions_lib.rope_index(
      batch["input_ids"], ids=ids, image_grid_thw=_flat(batch.get("image_grid_thw")),
      video_grid_thw=_flat(batch.get("video_grid_thw")), second_per_grids=_flat(batch.get("second_per_grids")),
      use_audio_in_video=batch.get("use_audio_in_video", False), segment_ids=batch["segment_ids"])
  media = {}
  if "audio_features" in batch:  # the audio tower takes the batch's audios as one buffer
    media.update(audio_features=_flat(batch["audio_features"]), audio_lengths=_flat(batch["audio_lengths"]))
  for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
    if key in batch:  # [B, P, patch_dim] + [B, N, 3]: one buffer per row, sharded over the batch
      media[key] = batch[key]
  return positions, media


def forward(graphdef: nnx.GraphDef, params: state_lib.Params, batch: Batch, mesh: Optional[Mesh],
            rules) -> jax.Array:
  """Logits [B, L, V] of the Thinker for a batch."""
  model = nnx.merge(graphdef, params)
  positions, media = model_inputs(batch, model.thinker.ids)
  with sharding.activate(mesh, rules):
    return model.thinker(batch["input_ids"], positions, batch["segment_ids"], **media)


def label_mask(batch: Batch) -> jax.Array:
  """[B, L-1] bool: position i is trained to predict labels[i + 1] (same segment, not IGNORE, not padding)."""
  seg = batch["segment_ids"]
  return (batch["labels"][:, 1:] != batch_lib.IGNORE) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)


def token_stats(logits: jax.Array, batch: Batch, with_accuracy: bool = False) -> dict:
  """Per-modality sums over the label tokens of a batch: loss_sum, count (and correct) as [NUM_KINDS]."""
  valid = label_mask(batch)
  targets = jnp.where(valid, batch["labels"][:, 1:], 0)
  logits = logits[:, :-1].astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
  onehot = jax.nn.one_hot(batch["kind"][:, 1:], NUM_KINDS, dtype=jnp.float32) * valid[..., None]
  out = {"loss_sum": jnp.einsum("bl,blk->k", jnp.where(valid, nll, 0.0), onehot),
         "count": jnp.sum(onehot, axis=(0, 1))}
  if with_accuracy:
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    out["correct"] = jnp.einsum("bl,blk->k", correct, onehot)
  return out


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, rules) -> dict:
  """Rows over data/fsdp (activation_batch), text over context (activation_length); media rows likewise."""
  out = {}
  for k, v in batch.items():
    names = ("activation_batch", "activation_length") if k in batch_lib.TEXT_FIELDS else ("activation_batch",)
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

  def step(state: state_lib.TrainState, batch: Batch):
    trainable, frozen = state_lib.partition(state.params, setup.frozen)
    num_labels = jnp.maximum(jnp.sum(label_mask(batch)), 1).astype(jnp.float32)  # global: the whole batch
    scale = jnp.float32(1.0)
    if nan_step >= 0:  # test hook: poison the loss of one step
      scale = jnp.where(state.step + 1 == nan_step, jnp.float32(jnp.nan), scale)

    def loss_fn(trainable, micro):
      logits = forward(graphdef, state_lib.combine(trainable, frozen), micro, mesh, rules)
      stats = token_stats(logits, micro)
      return jnp.sum(stats["loss_sum"]) * scale / num_labels, stats

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:
      (_, stats), grads = grad_fn(trainable, batch)
    else:
      def accumulate(carry, micro):
        grads, stats = carry
        (_, s), g = grad_fn(trainable, micro)
        grads = jax.tree.map(jnp.add, grads, g)
        grads = jax.lax.with_sharding_constraint(grads, train_shardings)
        return (grads, jax.tree.map(jnp.add, stats, s)), None

      zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, trainable), train_shardings)
      zero_stats = {"loss_sum": jnp.zeros(NUM_KINDS), "count": jnp.zeros(NUM_KINDS)}
      (grads, stats), _ = jax.lax.scan(accumulate, (zeros, zero_stats), split_micro(batch, k, mesh, rules))

    updates, opt_state = setup.tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    rng, _ = jax.random.split(jax.random.wrap_key_data(state.rng))
    new_state = state.replace(step=state.step + 1, params=state_lib.combine(trainable, frozen),
                              opt_state=opt_state, rng=jax.random.key_data(rng))
    loss_sum = stats["loss_sum"] * scale
    metrics = {"loss": jnp.sum(loss_sum) / num_labels, "loss_sum": loss_sum, "count": stats["count"],
               "grad_norm": optax.global_norm(grads), "tokens": jnp.sum(batch["segment_ids"] > 0),
               "lr": setup.schedule(state.step)}
    return new_state, metrics

  return step


def jit_train_step(setup: state_lib.Setup, example_batch: Optional[Mapping[str, Any]] = None) -> Callable:
  """jax.jit of the step with the state's shardings in and out, the batch's shardings in, state donated.

  One compiled program per batch layout (fields and shapes: e.g. each length bucket of the pipeline), built on
  first use; example_batch is accepted for older callers and not needed.
  """
  step = make_train_step(setup)
  replicated = NamedSharding(setup.mesh, PartitionSpec())
  cache = {}

  def run(state, batch):
    key = tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))
    if key not in cache:
      b_shard = batch_shardings(batch, setup.mesh, setup.config.sharding_rules)
      cache[key] = jax.jit(step, in_shardings=(setup.shardings, b_shard),
                           out_shardings=(setup.shardings, replicated), donate_argnums=(0,))
    return cache[key](state, batch)

  return run

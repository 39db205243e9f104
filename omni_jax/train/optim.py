"""The optimizer: AdamW with linear warmup + cosine decay and global-norm clipping."""

from typing import Any

import ml_collections
import optax


def schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
  """0 -> t.lr linearly over t.warmup_steps, then cosine down to t.lr * t.end_lr_factor at t.steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
      decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.lr * t.end_lr_factor)


def make(t: ml_collections.ConfigDict, decay_mask: Any) -> optax.GradientTransformation:
  """decay_mask: a tree of bools over the trainable parameters (False for biases and norm scales)."""
  parts = []
  if t.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(t.grad_clip_norm))
  parts.append(optax.adamw(schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts)

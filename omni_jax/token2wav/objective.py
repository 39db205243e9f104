"""The DiT's training objective `token2wav_flow`: conditional flow matching (rectified flow) on the DiT rows of
a batch (token2wav_* fields, omni_jax.batch).

The sign convention is the sampler's (token2wav.sampling: noise at t = 0, mel at t = 1, dx/dt = v):

  x_t = (1 - t) x0 + t x1,   x0 ~ N(0, I),  x1 = the target mel,   target velocity  x1 - x0,

  loss = mean over the real frames of each row (token2wav_lengths) and the 80 bins of (v(x_t, t) - (x1 - x0))^2;

the padding after a row's reply is masked out of the DiT's attention too (its `frames`), so a padded row trains
exactly as the unpadded reply would.

Time t per row from config.train.token2wav.time_sampling (targets.FlowConfig; default "cosine", the
distribution of inference's sway-warped grid). Condition dropout per row, so that classifier-free guidance
has an unconditional model to subtract: with probability drop_code a row loses its codes (id 0) AND its
speaker (the exact unconditional input of guidance), else with drop_audio its speaker only (zero reference
mel; the `cond` vector is always zero in training, targets.py). Evaluation (evaluate=True) drops nothing:
eval/token2wav_flow/loss is the conditional loss, with the fixed evaluation key.
"""

from typing import Mapping

import jax
import jax.numpy as jnp

from omni_jax.token2wav.targets import FlowConfig

Batch = Mapping[str, jax.Array]


def sample_time(rng: jax.Array, rows: int, flow: FlowConfig) -> jax.Array:
  """t [rows] in [0, 1] by flow.time_sampling."""
  if flow.time_sampling == "logit_normal":
    return jax.nn.sigmoid(flow.logit_mean + flow.logit_std * jax.random.normal(rng, (rows,), jnp.float32))
  u = jax.random.uniform(rng, (rows,), jnp.float32)
  if flow.time_sampling == "cosine":
    return 1.0 - jnp.cos(0.5 * jnp.pi * u)  # = time_grid's sway warp (s = -1) of a uniform time
  return u


def dropout_masks(rng: jax.Array, rows: int, flow: FlowConfig) -> tuple[jax.Array, jax.Array]:
  """(drop_audio, drop_code) [rows] bool; drop_code implies drop_audio (the unconditional rows)."""
  k_code, k_audio = jax.random.split(rng)
  drop_code = jax.random.uniform(k_code, (rows,)) < flow.drop_code
  drop_audio = drop_code | (jax.random.uniform(k_audio, (rows,)) < flow.drop_audio)
  return drop_audio, drop_code


def frame_mask(batch: Batch) -> jax.Array:
  """[B, T] bool: the real mel frames of each DiT row."""
  frames = batch["token2wav_mel"].shape[1]
  return jnp.arange(frames)[None] < batch["token2wav_lengths"][:, None]


def attended_frames(batch: Batch) -> jax.Array:
  """[B]: the frames each DiT row attends to: its real frames, so the padding after a reply is invisible as at
  inference; an empty row (no reply, no loss) attends to all, which keeps its softmax finite."""
  lengths = batch["token2wav_lengths"]
  return jnp.where(lengths > 0, lengths, batch["token2wav_mel"].shape[1])


def flow_loss(model, batch: Batch, rng: jax.Array, evaluate: bool = False) -> dict:
  """{"loss_sum": sum over real frames of the per-frame mean squared velocity error, "count": real frames}."""
  if "token2wav_mel" not in batch:  # a bucket without DiT rows
    zero = jnp.zeros((), jnp.float32)
    return {"loss_sum": zero, "count": zero}
  token2wav = model.token2wav
  dit, flow = token2wav.code2wav_dit_model, token2wav.flow
  x1 = batch["token2wav_mel"].astype(jnp.float32)
  rows = x1.shape[0]
  k_time, k_noise, k_drop = jax.random.split(rng, 3)
  t = sample_time(k_time, rows, flow)
  x0 = jax.random.normal(k_noise, x1.shape, jnp.float32)
  xt = (1.0 - t[:, None, None]) * x0 + t[:, None, None] * x1
  if evaluate:
    drop_audio = drop_code = jnp.zeros((rows,), bool)
  else:
    drop_audio, drop_code = dropout_masks(k_drop, rows, flow)
  speaker = jnp.zeros((rows, dit.cfg.enc_emb_dim), jnp.float32)  # no x-vector model offline (targets.py)
  v = dit(xt, batch["token2wav_reference"], speaker, batch["token2wav_codes"], t, drop_audio=drop_audio,
          drop_code=drop_code, frames=attended_frames(batch))
  err = jnp.mean(jnp.square(v - (x1 - x0)), axis=-1)  # [B, T]
  mask = frame_mask(batch)
  return {"loss_sum": jnp.sum(jnp.where(mask, err, 0.0)), "count": jnp.sum(mask).astype(jnp.float32)}


def num_frames(batch: Batch) -> jax.Array:
  """Real mel frames in the whole (global) batch: the normaliser."""
  if "token2wav_lengths" not in batch:
    return jnp.zeros((), jnp.int32)
  return jnp.sum(batch["token2wav_lengths"])

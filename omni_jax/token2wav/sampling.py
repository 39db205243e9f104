"""Samplers of the DiT's flow, as transformers' Token2Wav runs them: noise at t = 0 -> mel at t = 1 along
dx/dt = v(t, x).

- time grid: linspace(0, 1, num_steps) warped by sway: t + s (cos(pi t / 2) - 1 + t) (s = -1: 1 - cos(pi t / 2));
- velocity: classifier-free guidance v = v_c + g (v_c - v_u) with one batch-doubled DiT pass (unconditional
  rows: code id 0, zero speaker vector, zero reference mel through ECAPA); g < 1e-5: one unguided pass;
- "rk4": the reference's Runge-Kutta 3/8 rule, 4 velocity evaluations per interval (36 for 10 points), one
  per loop iteration;
  "euler": x += dt v(t0, x), 1 evaluation per interval (the fast streaming option).

Explicit `noise` [B, T, mel] or a `seed` makes the mel reproducible; the whole loop is one jit
(lax.fori_loop over the intervals), compiled once per (model graph, shapes, sampler settings). `flow_mel` is
that program for whole utterances (`sample`) and streaming windows (token2wav.streaming) alike.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from omni_jax.config import from_config_dict
from omni_jax.errors import ConfigError

METHODS = ("rk4", "euler")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """config.generate.token2wav: transformers' Token2Wav defaults (num_steps 10, guidance 0.5, sway -1, RK4)."""
  num_steps: int = 10
  guidance_scale: float = 0.5
  sway_coefficient: Optional[float] = -1.0
  method: str = "rk4"

  @classmethod
  def from_config(cls, cfg: Optional[ml_collections.ConfigDict], key: str = "generate.token2wav") -> "SamplerConfig":
    if cfg is None:
      return cls()
    # The `streaming` subsection is token2wav.streaming.StreamingConfig's.
    return from_config_dict(cls, {k: v for k, v in cfg.items() if k != "streaming"}, key)

  def validate(self, key: str):
    if not isinstance(self.num_steps, int) or self.num_steps < 2:
      raise ConfigError(f"config.{key}.num_steps: must be an integer >= 2 (time points), got {self.num_steps!r}")
    if self.method not in METHODS:
      raise ConfigError(f"config.{key}.method: {self.method!r} is not one of {METHODS}")
    if not self.guidance_scale >= 0:
      raise ConfigError(f"config.{key}.guidance_scale: must be >= 0, got {self.guidance_scale!r}")


def time_grid(num_steps: int, sway_coefficient: Optional[float]) -> jax.Array:
  """The num_steps time points in float32, sway-warped as the reference."""
  t = jnp.linspace(0.0, 1.0, num_steps, dtype=jnp.float32)
  if sway_coefficient is not None:
    t = t + sway_coefficient * (jnp.cos(jnp.pi / 2 * t) - 1 + t)
  return t


def guided_velocity(model, x, reference_mel, speaker, codes, t, guidance_scale: float,
                    encoded_reference=None) -> jax.Array:
  """v_c + g (v_c - v_u) from one batch-doubled pass; a single unguided pass when g < 1e-5 (as the reference).
  encoded_reference: model.encode_reference(reference_mel, guidance=guidance_scale >= 1e-5), or None."""
  if guidance_scale < 1e-5:
    return model(x, reference_mel, speaker, codes, t, encoded_reference=encoded_reference)
  cond, uncond = jnp.split(model(x, reference_mel, speaker, codes, t, guidance=True,
                                 encoded_reference=encoded_reference), 2)
  return cond + (cond - uncond) * guidance_scale


def integrate(velocity, x0: jax.Array, grid: jax.Array, method: str) -> jax.Array:
  """x at grid[-1] from x0 at grid[0]; velocity(t, x). The reference's operation order (float32 parity)."""
  if method not in METHODS:
    raise ValueError(f"unknown sampler method {method!r}; choose one of {METHODS}")
  if method == "euler":
    def interval(i, x):
      dt = grid[i + 1] - grid[i]
      return x + dt * velocity(grid[i], x)

    return jax.lax.fori_loop(0, grid.shape[0] - 1, interval, x0)

  # RK4 runs one velocity evaluation per loop iteration (four per interval): the loop body holds the model
  # once, not four times, so the program compiles as fast as Euler's. Every stage computes its expression as the
  # reference writes it and keeps it by `where` (elementwise, fused): no conditional, which a GPU would run by
  # reading the stage back to the host.
  def stage(i, carry):
    x, k1, k2, k3 = carry
    s, t0, t1 = i % 4, grid[i // 4], grid[i // 4 + 1]
    dt = t1 - t0
    t = jnp.where(s == 0, t0, jnp.where(s == 1, t0 + dt * (1 / 3), jnp.where(s == 2, t0 + dt * (2 / 3), t1)))
    at = jnp.where(s == 0, x, jnp.where(s == 1, x + dt * k1 * (1 / 3),
                                        jnp.where(s == 2, x + dt * (k2 - k1 * (1 / 3)), x + dt * (k1 - k2 + k3))))
    k = velocity(t, at)
    return (jnp.where(s == 3, x + (k1 + 3 * (k2 + k3) + k) * dt / 8, x),
            jnp.where(s == 0, k, k1), jnp.where(s == 1, k, k2), jnp.where(s == 2, k, k3))

  zeros = jnp.zeros_like(x0)
  return jax.lax.fori_loop(0, 4 * (grid.shape[0] - 1), stage, (x0, zeros, zeros, zeros))[0]


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9, 10))
def _flow(graphdef, state, reference_mel, speaker, codes, noise, frames, num_steps, guidance_scale, sway_coefficient,
          method):
  dit = nnx.merge(graphdef, state)
  # The reference mel's encoding does not depend on x or t: once per sample, not once per evaluation.
  encoded = dit.encode_reference(reference_mel, guidance=guidance_scale >= 1e-5)
  # A right-padded window: the padding is invisible to the real frames.
  model = dit if frames is None else functools.partial(dit, frames=frames)
  velocity = lambda t, x: guided_velocity(model, x, reference_mel, speaker, codes, t, guidance_scale, encoded)
  return integrate(velocity, noise, time_grid(num_steps, sway_coefficient), method)


def flow_mel(dit_split: tuple, reference_mel, speaker, codes, noise, sampler: SamplerConfig,
             frames: Optional[jax.Array] = None) -> jax.Array:
  """The DiT's mel [B, T, mel] from `noise` [B, T, mel] under the one compiled sampler program.

  dit_split: nnx.split(dit), split once by callers that sample often. frames (int32 scalar, optional): the
  real frames of a right-padded window (token2wav.streaming); None for a whole utterance."""
  sway = None if sampler.sway_coefficient is None else float(sampler.sway_coefficient)
  return _flow(*dit_split, jnp.asarray(reference_mel, jnp.float32), jnp.asarray(speaker, jnp.float32),
               jnp.asarray(codes, jnp.int32), jnp.asarray(noise, jnp.float32), frames, sampler.num_steps,
               float(sampler.guidance_scale), sway, sampler.method)


def sample(model, codes: jax.Array, speaker: jax.Array, reference_mel: jax.Array, *,
           noise: Optional[jax.Array] = None, seed: Optional[int] = None, rng: Optional[jax.Array] = None,
           sampler: SamplerConfig = SamplerConfig()) -> jax.Array:
  """The mel [B, T = repeats * N, mel_dim] (channels last; transformers returns it as [B, mel, T]) of codes
  [B, N] for a speaker (its `cond` vector [B, enc_emb_dim] and reference mel [B, T_ref, mel_dim]).

  The starting noise: `noise` [B, T, mel_dim] if given (inject transformers' torch.randn for parity), else
  N(0, 1) from `rng` (a jax key) or `seed`; one of the three is required.
  """
  sampler.validate("generate.token2wav")
  cfg = model.cfg
  b, n = codes.shape
  shape = (b, n * cfg.repeats, cfg.mel_dim)
  if noise is None:
    if rng is None and seed is None:
      raise ValueError("token2wav.sample: give noise, rng or seed (the starting noise must be reproducible)")
    rng = jax.random.key(seed) if rng is None else rng
    noise = jax.random.normal(rng, shape, jnp.float32)
  elif tuple(noise.shape) != shape:
    raise ValueError(f"token2wav.sample: noise {tuple(noise.shape)} must be {shape} (codes {tuple(codes.shape)}, "
                     f"repeats={cfg.repeats}, mel_dim={cfg.mel_dim})")
  model.check_inputs(noise, reference_mel, speaker, codes)
  return flow_mel(nnx.split(model), reference_mel, speaker, codes, noise, sampler)

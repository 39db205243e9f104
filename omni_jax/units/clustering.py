"""k-means in jitted JAX: k-means++ seeding, Lloyd iterations, nearest-centroid assignment.

Deterministic for a seed: the random draws come from jax.random, and the centroid sums are one-hot matmuls
(no scatter-add, whose float order can vary on accelerators). Distances use HIGHEST matmul precision, so
TF32 on GPUs does not flip near-ties between devices. Memory is bounded by `block` x k per step.
"""

import functools
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def nearest(x: jax.Array, centroids: jax.Array) -> jax.Array:
  """[..., d] -> [...] int32 index of the nearest centroid (squared Euclidean; ties go to the lower id)."""
  c2 = jnp.sum(centroids * centroids, axis=-1)
  scores = c2 - 2.0 * jnp.einsum("...d,kd->...k", x, centroids, precision=_HIGHEST)
  return jnp.argmin(scores, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(1,))
def _kmeans_pp(x: jax.Array, k: int, key: jax.Array) -> jax.Array:
  """k-means++ seeding: each new centroid is a frame drawn with probability ~ its squared distance to the
  nearest centroid so far (uniformly when every frame already sits on a centroid)."""
  n = x.shape[0]
  first_key, key = jax.random.split(key)
  first = x[jax.random.randint(first_key, (), 0, n)]
  centroids = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first)
  dist = jnp.sum((x - first) ** 2, axis=-1)

  def body(i, carry):
    centroids, dist = carry
    total = jnp.sum(dist)
    p = jnp.where(total > 0, dist / jnp.where(total > 0, total, 1.0), 1.0 / n)
    pick = jax.random.choice(jax.random.fold_in(key, i), n, p=p)
    c = x[pick]
    return centroids.at[i].set(c), jnp.minimum(dist, jnp.sum((x - c) ** 2, axis=-1))

  centroids, _ = jax.lax.fori_loop(1, k, body, (centroids, dist))
  return centroids


@functools.partial(jax.jit, static_argnums=(2, 3))
def _lloyd(x: jax.Array, centroids: jax.Array, iterations: int, block: int):
  """Lloyd iterations over x in blocks; a centroid that loses all its frames stays where it was.
  Returns (centroids, mean squared distance of the frames to their nearest centroid)."""
  n, d = x.shape
  k = centroids.shape[0]
  pad = -n % block
  blocks = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, block, d)
  valid = (jnp.arange(n + pad) < n).reshape(-1, block).astype(x.dtype)

  def statistics(centroids):
    c2 = jnp.sum(centroids * centroids, axis=-1)

    def step(carry, xs):
      sums, counts, err = carry
      xb, vb = xs
      scores = c2 - 2.0 * jnp.dot(xb, centroids.T, precision=_HIGHEST)
      ids = jnp.argmin(scores, axis=-1)
      onehot = jax.nn.one_hot(ids, k, dtype=x.dtype) * vb[:, None]
      best = jnp.min(scores, axis=-1) + jnp.sum(xb * xb, axis=-1)
      return (sums + jnp.dot(onehot.T, xb, precision=_HIGHEST), counts + onehot.sum(0),
              err + jnp.sum(jnp.maximum(best, 0.0) * vb)), None

    init = (jnp.zeros((k, d), x.dtype), jnp.zeros((k,), x.dtype), jnp.zeros((), x.dtype))
    (sums, counts, err), _ = jax.lax.scan(step, init, (blocks, valid))
    return sums, counts, err / n

  def update(_, centroids):
    sums, counts, _ = statistics(centroids)
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centroids)

  centroids = jax.lax.fori_loop(0, iterations, update, centroids)
  return centroids, statistics(centroids)[2]


def fit(frames: np.ndarray, k: int, *, seed: int = 0, iterations: int = 20,
        block: int = 2048) -> tuple[np.ndarray, float]:
  """k centroids of [n, d] float frames: (centroids [k, d] float32, mean squared distance to them)."""
  frames = np.asarray(frames, np.float32)
  if frames.ndim != 2:
    raise ValueError(f"k-means needs [frames, dim] data, got shape {frames.shape}")
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
    raise ValueError(f"vocab_size must be a positive integer, got {k!r}")
  if k > frames.shape[0]:
    raise ValueError(f"vocab_size={k} is more than the {frames.shape[0]} frames to cluster; give more audio "
                     f"or a smaller vocab_size")
  if iterations < 0:
    raise ValueError(f"iterations must be >= 0, got {iterations}")
  x = jnp.asarray(frames)
  centroids = _kmeans_pp(x, int(k), jax.random.key(seed))
  centroids, err = _lloyd(x, centroids, int(iterations), int(min(block, max(1, frames.shape[0]))))
  return np.asarray(centroids, np.float32), float(err)


class FrameSample:
  """A uniform random subset of at most `limit` frames from a stream of [n_i, d] arrays (bottom-k by a
  seeded random key per frame): memory stays bounded however much audio goes through, and the subset
  depends only on the seed and the order of the inputs."""

  def __init__(self, limit: int, seed: int = 0):
    if limit < 1:
      raise ValueError(f"max_frames must be >= 1, got {limit}")
    self.limit = int(limit)
    self._rng = np.random.default_rng(seed)
    self._keys = np.zeros((0,), np.float64)
    self._frames: Optional[np.ndarray] = None
    self.seen = 0

  def add(self, frames: np.ndarray) -> None:
    frames = np.asarray(frames, np.float32)
    keys = self._rng.random(frames.shape[0])
    self.seen += frames.shape[0]
    if self._frames is None:
      self._frames = frames[:0]
    all_keys = np.concatenate([self._keys, keys])
    all_frames = np.concatenate([self._frames, frames])
    if all_keys.shape[0] > self.limit:
      keep = np.sort(np.argpartition(all_keys, self.limit - 1)[:self.limit])
      all_keys, all_frames = all_keys[keep], all_frames[keep]
    self._keys, self._frames = all_keys, all_frames

  def extend(self, arrays: Iterable[np.ndarray]) -> "FrameSample":
    for a in arrays:
      self.add(a)
    return self

  @property
  def frames(self) -> np.ndarray:
    if self._frames is None:
      raise ValueError("no frames were collected (no audio)")
    return self._frames

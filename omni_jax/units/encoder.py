"""A frozen copy of the first layers of the Thinker's audio tower: log-mel features -> 50 Hz activations.

The copy holds conv1, conv2 and the first `layer` transformer layers in an AudioEncoder whose config is the
Thinker's with encoder_layers=layer (its pooler, ln_post and proj are never read: zero-filled, 1-wide). The
weights are host numpy copies taken once, so the units never drift while the Thinker's tower trains.

Long audio is encoded in pieces of PIECE_CHUNKS encoder chunks (2 s each). Chunks are independent in the
encoder (per-chunk convs, positions and attention), so a piece boundary on a chunk boundary changes nothing;
the piece sizes are powers of two, so a corpus of any lengths compiles at most log2(PIECE_CHUNKS) + 1 programs.
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni_jax.config import Runtime
from omni_jax.models.audio import AudioConfig, AudioEncoder

FROZEN_PARTS = ("conv1", "conv2", "layers")  # the modules the 50 Hz stream after `layer` layers depends on
PIECE_CHUNKS = 16  # encoder chunks per call (32 s of audio): bounds memory for any audio length
RUNTIME = Runtime()  # float32 compute, whatever the Thinker trains in: the ids must not depend on it


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for name, value in flat.items():
    *parents, leaf = name.split(".")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def _pure(tower: Any) -> dict:
  """An AudioEncoder module, its nnx.State or a pure dict -> a pure dict of arrays."""
  if isinstance(tower, nnx.Module):
    tower = nnx.state(tower)
  if isinstance(tower, nnx.State):
    tower = nnx.to_pure_dict(tower)
  return tower


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(graphdef, head: Callable, state, features, lengths, *head_args):
  x, row_tokens, _ = nnx.merge(graphdef, state).frames(features, lengths)
  return head(x.astype(jnp.float32), *head_args), row_tokens


def _identity(x):
  return x


class FrozenEncoder:
  """conv1 + conv2 + the first `layer` layers of an audio tower, frozen: features -> [frames, d_model]."""

  def __init__(self, audio: AudioConfig, layer: int, weights: Mapping[str, np.ndarray]):
    if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or not 1 <= layer <= audio.encoder_layers:
      raise ValueError(f"layer must be an integer in 1..{audio.encoder_layers} (the audio tower's "
                       f"encoder_layers), got {layer!r}")
    self.audio, self.layer = audio, int(layer)
    self.config = dataclasses.replace(audio, encoder_layers=self.layer, output_dim=1, freeze=True)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: AudioEncoder(self.config, RUNTIME, rngs=nnx.Rngs(0))))
    expected = _flatten(nnx.to_pure_dict(abstract))
    frozen = {n: s for n, s in expected.items() if n.split(".")[0] in FROZEN_PARTS}
    missing = sorted(set(frozen) - set(weights))
    unknown = sorted(set(weights) - set(frozen))
    if missing or unknown:
      raise ValueError(f"encoder weights do not fit layer={layer} of this audio config: missing {missing}, "
                       f"unexpected {unknown}")
    filled = {}
    for name, spec in expected.items():
      if name in frozen:
        value = np.asarray(weights[name], np.float32)
        if value.shape != tuple(spec.shape):
          raise ValueError(f"encoder weight {name} has shape {value.shape}, expected {tuple(spec.shape)}")
        filled[name] = value
      else:
        filled[name] = np.zeros(spec.shape, np.float32)  # pooler side: never read by frames()
    self.weights = {n: filled[n] for n in sorted(frozen)}
    nnx.replace_by_pure_dict(abstract, _unflatten(filled))
    self._graphdef, self._state = graphdef, abstract

  @classmethod
  def from_tower(cls, audio: AudioConfig, tower: Any, layer: int) -> "FrozenEncoder":
    """Copy the frozen parts out of a Thinker audio tower (module, nnx.State or pure dict, any dtype or
    sharding): later changes to the tower do not reach the copy."""
    flat = _flatten(_pure(tower))
    weights = {}
    for name, value in flat.items():
      if name.split(".")[0] not in FROZEN_PARTS:
        continue
      value = np.array(jax.device_get(value), dtype=np.float32, copy=True)
      weights[name] = value[:layer] if name.startswith("layers.") else value
    return cls(audio, layer, weights)

  @property
  def dim(self) -> int:
    return self.config.d_model

  def apply(self, features: np.ndarray, head: Callable = _identity, *head_args) -> np.ndarray:
    """[mels, T] log-mel features -> head(activations) per 50 Hz frame, frames concatenated in time order.

    head: a jittable module-level function of (x [rows, n_window, d] float32, *head_args) that keeps the two
    leading axes (e.g. nearest-centroid ids); the default returns the activations [frames, d].
    """
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or features.shape[0] != self.config.num_mel_bins:
      raise ValueError(f"features must be [{self.config.num_mel_bins}, frames], got shape {features.shape}")
    if features.shape[1] == 0:
      raise ValueError("features have no frames (empty audio)")
    chunk = self.config.chunk_frames
    span = PIECE_CHUNKS * chunk
    out = []
    for start in range(0, features.shape[1], span):
      piece = features[:, start:start + span]
      n = piece.shape[1]
      chunks = -(-n // chunk)
      rows = min(PIECE_CHUNKS, 1 << (chunks - 1).bit_length())  # pad to a power of two: few compiles
      buf = np.zeros((1, features.shape[0], rows * chunk), np.float32)
      buf[0, :, :n] = piece
      y, row_tokens = _apply(self._graphdef, head, self._state, buf, np.array([n], np.int32), *head_args)
      y, row_tokens = np.asarray(y), np.asarray(row_tokens)
      out += [y[r, :row_tokens[r]] for r in range(chunks)]
    return np.concatenate(out, axis=0)

  def frames(self, features: np.ndarray) -> np.ndarray:
    """[mels, T] -> [(T + 1) // 2, d_model] float32 activations after `layer` layers."""
    return self.apply(features)

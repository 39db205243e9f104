"""Token2Wav: speech codes -> mel (the flow-matching DiT, omni_jax.models.dit, and its samplers) -> waveform
(BigVGAN). docs/token2wav.md describes what is built and checked.

The samplers and the weight mapping load on first use: the data workers import this package's numpy-only
modules (mel, targets) and must not import jax."""

import importlib

_LAZY = {"SamplerConfig": "sampling", "guided_velocity": "sampling", "integrate": "sampling", "sample": "sampling",
         "time_grid": "sampling", "from_torch_state_dict": "state_dict", "StreamingConfig": "streaming",
         "StreamingSynthesizer": "streaming", "synthesize_chunked": "streaming"}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"omni_jax.token2wav.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'omni_jax.token2wav' has no attribute {name!r}")

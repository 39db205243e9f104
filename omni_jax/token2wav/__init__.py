"""Token2Wav: speech codes -> mel (the flow-matching DiT, omni_jax.models.dit, and its samplers) -> waveform
(BigVGAN). docs/token2wav.md describes what is built and checked."""

from omni_jax.token2wav.sampling import SamplerConfig, guided_velocity, integrate, sample, time_grid
from omni_jax.token2wav.state_dict import from_torch_state_dict

__all__ = ["SamplerConfig", "from_torch_state_dict", "guided_velocity", "integrate", "sample", "time_grid"]

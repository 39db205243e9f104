"""omni_jax: Qwen2.5-Omni Thinker-Talker models in JAX / Flax NNX."""

__version__ = "0.1.0"

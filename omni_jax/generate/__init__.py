"""Running a model: Thinker text generation with a KV cache (decode), sampling rules, prompts, the Python API.

    from omni_jax import generate
    model = generate.load("workdirs/tiny_demo")          # a workdir, step dir, converter output or HF dir
    print(model.chat("What is in the picture?", image="photo.jpg"))
"""

from omni_jax.generate import prompts
from omni_jax.generate.api import OmniChat, load, restore
from omni_jax.generate.decode import Generator, Output
from omni_jax.generate.sampling import SamplingParams

__all__ = ["Generator", "OmniChat", "Output", "SamplingParams", "load", "prompts", "restore"]

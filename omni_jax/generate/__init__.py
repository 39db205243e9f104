"""Running a model: the conversation engine (engine), the model handle (model), the Talker's settings (talker),
sampling rules, prompts, the Python API.

    from omni_jax import generate
    model = generate.load("workdirs/tiny_demo")          # a workdir, step dir, converter output or HF dir
    print(model.chat("What is in the picture?", image="photo.jpg"))
    speech = model.speak("Say hello.")                   # a model with a Talker: speech.text, speech.codes
"""

from omni_jax.generate import prompts
from omni_jax.generate.api import OmniChat, Speech, load
from omni_jax.generate.model import Generator
from omni_jax.generate.sampling import SamplingParams

__all__ = ["Generator", "OmniChat", "SamplingParams", "Speech", "load", "prompts"]

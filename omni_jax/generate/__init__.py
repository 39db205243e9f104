"""Running a model: Thinker text generation with a KV cache (decode), the Talker's speech codes (talker),
sampling rules, prompts, the Python API.

    from omni_jax import generate
    model = generate.load("workdirs/tiny_demo")          # a workdir, step dir, converter output or HF dir
    print(model.chat("What is in the picture?", image="photo.jpg"))
    speech = model.speak("Say hello.")                   # a model with a Talker: speech.text, speech.codes
"""

from omni_jax.generate import prompts
from omni_jax.generate.api import OmniChat, Speech, load, restore
from omni_jax.generate.decode import Generator, Output
from omni_jax.generate.sampling import SamplingParams
from omni_jax.generate.talker import SpeechGenerator, SpeechOutput

__all__ = ["Generator", "OmniChat", "Output", "SamplingParams", "Speech", "SpeechGenerator", "SpeechOutput", "load",
           "prompts", "restore"]

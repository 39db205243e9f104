"""Open speech units: discrete 50 Hz ids of speech for the Talker (its targets, in place of the unreleased
Qwen2.5-Omni codec encoder). docs/speech_units.md describes the design, the CLI and the codes format.

    from omni_jax import units
    u = units.load("units/tiny")                  # the SpeechUnits subclass units.json names
    ids = u.encode(wave, 16000)                   # or u.encode_file("clip.wav"); int32, ~50 per second
    index = units.CodeIndex.load("corpus/codes.json")
    units.check_same_units(u.version, index.version, "corpus/codes.json")   # UnitsMismatch if not
    ids = index.lookup("clip.wav")                # by the file's content (sha1), or None
"""

from omni_jax.units.artifact import load, register
from omni_jax.units.base import FRAME_RATE, SAMPLE_RATES, SpeechUnits, UnitsError
from omni_jax.units.codes import CodeIndex, UnitsMismatch, check_same_units, file_sha1
from omni_jax.units.encoder import FrozenEncoder
from omni_jax.units.kmeans import KMeansUnits

__all__ = ["FRAME_RATE", "SAMPLE_RATES", "SpeechUnits", "UnitsError", "load", "register", "CodeIndex",
           "UnitsMismatch", "check_same_units", "file_sha1", "FrozenEncoder", "KMeansUnits"]

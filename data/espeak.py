"""Offline text-to-speech with eSpeak NG, for demo-corpus speech (ASR pairs, spoken questions and replies).

Uses the libespeak-ng shared library and voice data bundled in the `espeakng-loader` wheel through ctypes,
else the `espeak-ng` program (Debian package). Output is mono int16 at the engine's rate (22,050 Hz); the
pipeline's audio loader resamples to 16 kHz.
"""

import ctypes
import os
import shutil
import subprocess
import tempfile

import numpy as np

_SYNCHRONOUS = 0x02  # espeak_AUDIO_OUTPUT: AUDIO_OUTPUT_SYNCHRONOUS
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_RATE, _PITCH = 1, 3  # espeak_PARAMETER


class SpeechError(RuntimeError):
  """No eSpeak NG available, or a synthesis call failed."""


class _Library:
  """The libespeak-ng API, initialised once per process (the library keeps global state)."""

  _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

  def __init__(self):
    import espeakng_loader  # pylint: disable=import-outside-toplevel

    self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
    data_parent = os.path.dirname(espeakng_loader.get_data_path())
    self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    self.rate = self.lib.espeak_Initialize(_SYNCHRONOUS, 0, data_parent.encode(), 0)
    if self.rate <= 0:
      raise SpeechError(f"espeak_Initialize failed ({self.rate}) with data in {data_parent}")
    self.chunks: list[np.ndarray] = []

    def collect(wav, n, events):
      del events
      if n > 0:
        self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
      return 0

    self._callback = self._CALLBACK(collect)  # keep a reference: the library calls it later
    self.lib.espeak_SetSynthCallback(self._callback)
    self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                      ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]

  def say(self, text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
      raise SpeechError(f"eSpeak NG has no voice {voice!r}")
    self.lib.espeak_SetParameter(_RATE, int(speed), 0)
    self.lib.espeak_SetParameter(_PITCH, int(pitch), 0)
    self.chunks = []
    # The library's callback is process-global: set ours again, in case other code in this process (a test
    # driving libespeak-ng directly) installed its own since, which may be freed by now.
    self.lib.espeak_SetSynthCallback(self._callback)
    data = text.encode("utf-8") + b"\0"
    if self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None) != 0:
      raise SpeechError(f"espeak_Synth failed for {text!r}")
    self.lib.espeak_Synchronize()
    return np.concatenate(self.chunks) if self.chunks else np.zeros((0,), np.int16)


_LIB = None


def _program(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
  import soundfile  # pylint: disable=import-outside-toplevel

  exe = shutil.which("espeak-ng")
  if exe is None:
    raise SpeechError("no eSpeak NG: `pip install espeakng-loader` (preferred) or `apt-get install espeak-ng`")
  with tempfile.NamedTemporaryFile(suffix=".wav") as f:
    subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", f.name, text], check=True,
                   capture_output=True)
    wave, rate = soundfile.read(f.name, dtype="int16")
  return wave, rate


def synthesize(text: str, voice: str = "en", speed: int = 165, pitch: int = 50) -> tuple[np.ndarray, int]:
  """(int16 samples, sample rate) of `text` spoken by an eSpeak NG voice (e.g. "en", "fr", "de", "es")."""
  global _LIB
  try:
    if _LIB is None:
      _LIB = _Library()
  except (ImportError, OSError):
    return _program(text, voice, speed, pitch)
  return _LIB.say(text, voice, speed, pitch), _LIB.rate

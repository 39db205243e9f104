"""Server-side turn detection: where the user's speech starts and where the turn ends, on 16 kHz audio.

    detector = TurnDetector(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500)
    for kind, ms in detector.push(samples_16k):      # any chunk size
      ...                                            # ("start", audio_start_ms) / ("stop", audio_end_ms)

Each 30 ms frame is voiced when WebRTC's voice-activity detector (webrtcvad: a GMM over sub-band energies) says
so and the frame is louder than a floor (the detector alone fires on quiet hiss). Speech starts after
`min_speech_ms` of voiced frames among the last few (a click or a cough is not a turn); the turn ends after
`silence_duration_ms` without a voiced frame (the hangover). Times are milliseconds of audio from the
detector's first sample, as the Realtime API's audio_start_ms / audio_end_ms are.
"""

import collections
import warnings
from typing import Optional

import numpy as np

SAMPLE_RATE = 16000
FRAME_MS = 30
FRAME = SAMPLE_RATE * FRAME_MS // 1000


class TurnDetector:
  """Voice activity with onset and hangover over a stream of 16 kHz float samples (see the module doc).

  threshold in [0, 1] (the Realtime API's): higher needs clearer speech; it picks webrtcvad's aggressiveness
  (0-3) and the loudness floor (-60 dBFS at 0 to -35 dBFS at 1)."""

  def __init__(self, threshold: float = 0.5, prefix_padding_ms: int = 300, silence_duration_ms: int = 500,
               min_speech_ms: int = 90):
    with warnings.catch_warnings():  # its module imports the deprecated pkg_resources
      warnings.simplefilter("ignore")
      import webrtcvad  # noqa: PLC0415 - the serve extra

    if not 0.0 <= float(threshold) <= 1.0:
      raise ValueError(f"turn_detection.threshold must be in [0, 1], got {threshold}")
    if silence_duration_ms < FRAME_MS or prefix_padding_ms < 0:
      raise ValueError(f"turn_detection: silence_duration_ms >= {FRAME_MS} and prefix_padding_ms >= 0, got "
                       f"{silence_duration_ms} and {prefix_padding_ms}")
    self.vad = webrtcvad.Vad(min(3, int(round(float(threshold) * 3))))
    self.floor = 10 ** ((-60.0 + 25.0 * float(threshold)) / 20)  # RMS of a full-scale-1 signal
    self.prefix_padding_ms, self.silence_duration_ms = int(prefix_padding_ms), int(silence_duration_ms)
    self.onset = max(1, -(-int(min_speech_ms) // FRAME_MS))  # voiced frames in the window that start speech
    self.window = collections.deque(maxlen=self.onset + 2)
    self.rest = np.zeros(0, np.float32)
    self.frames = 0  # frames judged
    self.speaking = False
    self.last_voiced: Optional[int] = None  # frame index

  def _voiced(self, frame: np.ndarray) -> bool:
    if float(np.sqrt(np.mean(frame.astype(np.float64) ** 2))) < self.floor:
      return False
    pcm = (np.clip(frame, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
    return bool(self.vad.is_speech(pcm, SAMPLE_RATE))

  def push(self, samples: np.ndarray) -> list[tuple[str, int]]:
    """Judge the new samples' whole frames: the ("start", ms) / ("stop", ms) decisions they bring."""
    x = np.concatenate([self.rest, np.asarray(samples, np.float32).reshape(-1)])
    n = x.shape[0] // FRAME
    self.rest = x[n * FRAME:]
    out = []
    for i in range(n):
      voiced = self._voiced(x[i * FRAME:(i + 1) * FRAME])
      f = self.frames
      self.frames += 1
      self.window.append((f, voiced))
      if voiced:
        self.last_voiced = f
      if not self.speaking:
        run = [g for g, v in self.window if v]
        if len(run) >= self.onset:
          self.speaking = True
          out.append(("start", max(0, run[0] * FRAME_MS - self.prefix_padding_ms)))
      elif (f - self.last_voiced) * FRAME_MS >= self.silence_duration_ms:
        self.speaking = False
        self.window.clear()
        out.append(("stop", (self.last_voiced + 1) * FRAME_MS))
    return out

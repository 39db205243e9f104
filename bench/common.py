"""What the benchmarks share: a transformers reference Thinker of a given text size, and interleaved timing."""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import numpy as np  # noqa: E402


def reference_thinker(spec: dict):
  """(transformers thinker with perturbed random weights, our config, its saved directory) for a text spec:
  Qwen2_5OmniTextConfig fields plus `mrope` (the three rotary sections)."""
  # Imported here: torch and transformers cost seconds at start-up, and a run with --no-reference needs neither.
  import hf_reference as ref  # noqa: PLC0415
  from omni_jax.convert import hf  # noqa: PLC0415
  spec = dict(spec)
  section = spec.pop("mrope")
  ref.TEXT_VARIANTS["bench"] = dict(spec, rope_parameters={"mrope_section": section, "rope_type": "default",
                                                           "rope_theta": 1e6})
  model = ref.build_thinker("bench")
  directory = tempfile.mkdtemp()
  model.save_pretrained(directory)
  return model, hf.config_from_hf(hf.read_config(directory)), directory


def time_alternating(fns, iters):
  """Median seconds per call of each fn, calls interleaved (after one warm-up / compile call each), so that
  a shared machine's load hits every side alike."""
  return [float(np.median(ts)) for ts in timings_alternating(fns, iters)]


def timings_alternating(fns, iters):
  """Each fn's seconds per round ([fn][round]), calls interleaved as in time_alternating."""
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(iters):
    for fn, ts in zip(fns, times):
      t = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - t)
  return times


def median_difference(longer, shorter) -> float:
  """The median over rounds of longer[i] - shorter[i]: timings of one round, taken back to back, share the
  machine's load of the moment, which a difference of the two medians would not cancel."""
  return float(np.median(np.asarray(longer) - np.asarray(shorter)))


def left_padded_prompts(rows: int, length: int, low: int, high: int) -> dict:
  """input_ids / segment_ids of `rows` random prompts (ids in [low, high)), left-padded to different lengths."""
  rng = np.random.default_rng(0)
  ids = rng.integers(low, high, size=(rows, length)).astype(np.int32)
  seg = np.ones_like(ids)
  for r in range(1, rows):
    seg[r, :r * length // (4 * rows)] = 0
  ids[seg == 0] = 0
  return {"input_ids": ids, "segment_ids": seg}

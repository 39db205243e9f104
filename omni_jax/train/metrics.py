"""What a run reports: a tqdm progress bar, TensorBoard events, a JSONL log, and the FLOPs behind MFU.

The FLOPs formulas are the towers' (omni_jax.towers); docs/training.md ("MFU") documents them: keep both in sync.
"""

import json
import os
import time
from typing import Any, Mapping, Optional

import jax
import ml_collections
import numpy as np

from omni_jax import batch as batch_lib
from omni_jax import datasheets
from omni_jax import towers

KIND_NAMES = {v: k for k, v in batch_lib.KINDS.items()}


def peak_flops(config: ml_collections.ConfigDict, device: Optional[jax.Device] = None) -> Optional[float]:
  """Per-device peak FLOP/s: config.train.peak_flops_per_device, else the table, else None."""
  peak = config.train.get("peak_flops_per_device", None)
  if peak:
    return float(peak)
  device = device or jax.devices()[0]
  return datasheets.PEAK_FLOPS.get(device.device_kind)


class FlopCounter:
  """Model FLOPs of one train step, from the host batch: the sum of the built towers' formulas
  (omni_jax.towers; the Thinker's: omni_jax.thinker.flops.ThinkerFlops, docs/training.md "MFU")."""

  def __init__(self, config: ml_collections.ConfigDict, frozen: frozenset = frozenset(),
               param_paths: tuple = ()):
    """frozen / param_paths: parameter paths (tuples) frozen by config.train.freeze, and all of them."""
    self.towers = {t.name: t.flops(config, frozen, param_paths) for t in towers.built(config) if t.flops}

  def step_flops(self, batch: Mapping[str, Any]) -> float:
    return float(sum(counter.step_flops(batch) for counter in self.towers.values()))


def _objective_summary(sums: Mapping[str, np.ndarray], prefix: str) -> dict:
  """loss (+ ppl, accuracy) overall, and per modality when the sums are per-kind arrays."""
  loss_sum, count = np.asarray(sums["loss_sum"], np.float64), np.asarray(sums["count"], np.float64)
  correct = np.asarray(sums["correct"], np.float64) if "correct" in sums else None
  total = max(count.sum(), 1.0)
  out = {f"{prefix}/loss": loss_sum.sum() / total, f"{prefix}/label_tokens": count.sum()}
  if correct is not None:
    out[f"{prefix}/ppl"] = float(np.exp(min(out[f"{prefix}/loss"], 50.0)))
    out[f"{prefix}/accuracy"] = correct.sum() / total
  if count.shape != (len(KIND_NAMES),):
    return out
  for k, name in KIND_NAMES.items():
    if count[k] > 0:
      out[f"{prefix}/loss_{name}"] = loss_sum[k] / count[k]
      out[f"{prefix}/label_tokens_{name}"] = count[k]
      if correct is not None:
        out[f"{prefix}/ppl_{name}"] = float(np.exp(min(loss_sum[k] / count[k], 50.0)))
        out[f"{prefix}/accuracy_{name}"] = correct[k] / count[k]
  return out


def summarize(sums: Mapping[str, Mapping[str, np.ndarray]], prefix: str) -> dict:
  """Scalars from per-objective sums {objective: {loss_sum, count[, correct]}} (a step's
  metrics["objectives"], or the eval step's output): each objective under its metric prefix (the
  thinker_text objective's is empty: {prefix}/loss, {prefix}/loss_text, {prefix}/ppl, ...), by its own
  summary where it has one (the DPO objectives: rewards, margin, accuracy)."""
  out = {}
  for name, s in sums.items():
    objective = towers.objective(name)
    sub = objective.metric_prefix
    out.update((objective.summary or _objective_summary)(s, f"{prefix}/{sub}" if sub else prefix))
  return {k: float(v) for k, v in out.items()}


class Throughput:
  """Tokens/s, step time, TFLOP/s and MFU over the steps since the last report, excluding paused time
  (evaluation, checkpoint saves) and the first step (compilation)."""

  def __init__(self, devices: int, peak: Optional[float]):
    self.devices, self.peak = devices, peak
    self.start = None

  def _reset(self, now: float):
    self.start, self.steps, self.tokens, self.flops, self.paused = now, 0, 0.0, 0.0, 0.0

  def step_done(self, tokens: float, flops: float) -> None:
    now = time.perf_counter()
    if self.start is None:
      self._reset(now)
      return
    self.steps += 1
    self.tokens += tokens
    self.flops += flops

  def pause(self, seconds: float) -> None:
    if self.start is not None:
      self.paused += seconds

  def report(self) -> dict:
    if self.start is None or not self.steps:
      return {}
    now = time.perf_counter()
    elapsed = max(now - self.start - self.paused, 1e-9)
    out = {"perf/step_time": elapsed / self.steps, "perf/tokens_per_s": self.tokens / elapsed,
           "perf/tflops_per_device": self.flops / elapsed / self.devices / 1e12}
    if self.peak:
      out["perf/mfu"] = self.flops / elapsed / self.devices / self.peak
    self._reset(now)
    return out


class Writer:
  """TensorBoard events (WORKDIR/tensorboard) + JSONL (WORKDIR/metrics.jsonl); only the primary process
  writes."""

  def __init__(self, workdir: str, enabled: bool = True, jsonl_name: str = "metrics.jsonl",
               tb_subdir: str = "tensorboard"):
    self.enabled = enabled
    self.tb = self.jsonl = None
    if enabled:
      import tensorboardX  # local: only the writing process needs it

      os.makedirs(workdir, exist_ok=True)
      self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, tb_subdir))
      self.jsonl = open(os.path.join(workdir, jsonl_name), "a")

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({"step": int(step), "time": time.time(), **{k: float(v) for k, v in scalars.items()}})
                     + "\n")
    self.jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self.tb.close()
      self.jsonl.close()


class Progress:
  """tqdm bar with step, loss, tokens/s and step time (primary process only)."""

  def __init__(self, total: int, initial: int, enabled: bool = True):
    from tqdm import tqdm  # local: only the primary process shows one

    self.bar = tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step",
                    mininterval=1.0)

  def update(self, step: int, loss: float, tokens_per_s: float, step_time: float,
             skipped: Optional[Mapping[str, float]] = None) -> None:
    """skipped: {reason: samples skipped so far}, shown as skipped=N (reason:n,...) when any were."""
    self.bar.n = step
    postfix = dict(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", step_s=f"{step_time:.3f}")
    if skipped and sum(skipped.values()):
      postfix["skipped"] = (f"{sum(skipped.values()):.0f} ("
                            + ",".join(f"{r}:{n:.0f}" for r, n in sorted(skipped.items()) if n) + ")")
    self.bar.set_postfix(postfix, refresh=False)
    self.bar.refresh()

  def write(self, msg: str) -> None:
    self.bar.write(msg)

  def close(self) -> None:
    self.bar.close()

"""What a run reports: a tqdm progress bar, TensorBoard events, a JSONL log, and the FLOPs behind MFU.

The FLOPs formula is documented in docs/training.md ("MFU"); keep the two in sync.
"""

import json
import os
import time
from typing import Any, Mapping, Optional

import jax
import ml_collections
import numpy as np

from omni_jax import batch as batch_lib
from omni_jax import config as config_lib
from omni_jax.models.audio import thinker_audio
from omni_jax.models.vision import thinker_vision

# Dense bfloat16 peak FLOP/s per device, by jax's device_kind (vendor datasheets). CPUs have no entry:
# set config.train.peak_flops_per_device to get an MFU there.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU7x": 2307e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA B200": 2250e12,
}

KIND_NAMES = {v: k for k, v in batch_lib.KINDS.items()}


def peak_flops(config: ml_collections.ConfigDict, device: Optional[jax.Device] = None) -> Optional[float]:
  """Per-device peak FLOP/s: config.train.peak_flops_per_device, else the table, else None."""
  peak = config.train.get("peak_flops_per_device", None)
  if peak:
    return float(peak)
  device = device or jax.devices()[0]
  return PEAK_FLOPS.get(device.device_kind)


def _linear_params(d_in: int, d_out: int) -> int:
  return d_in * d_out


class FlopCounter:
  """Model FLOPs of one train step, from the host batch (docs/training.md, "MFU").

  Per matmul weight: 2 FLOPs per token forward, 2 for the gradient of its input, 2 for the gradient of the
  weight: 6 when it trains, 4 when it is frozen but something before it trains (the text decoder in stage 1),
  2 when nothing before it needs a gradient (a frozen encoder). Attention adds the score and value matmuls.
  """

  def __init__(self, config: ml_collections.ConfigDict, frozen: frozenset = frozenset(),
               param_paths: tuple = ()):
    """frozen / param_paths: parameter paths (tuples) frozen by config.train.freeze, and all of them."""
    self.text = config_lib.thinker_text(config)
    self.vision, self.audio = thinker_vision(config), thinker_audio(config)
    t = self.text
    per_layer = (_linear_params(t.hidden_size, t.num_attention_heads * t.head_dim) * 2  # q, o
                 + _linear_params(t.hidden_size, t.num_key_value_heads * t.head_dim) * 2  # k, v
                 + _linear_params(t.hidden_size, t.intermediate_size) * 3)  # gate, up, down
    self.text_matmul_params = t.num_hidden_layers * per_layer + t.hidden_size * t.vocab_size  # + lm_head

    def all_frozen(*prefixes):
      under = [p for p in param_paths if p[:2] in [tuple(x.split(".")) for x in prefixes]]
      return bool(under) and all(p in frozen for p in under)

    self.text_factor = 4 if all_frozen("thinker.model", "thinker.lm_head") else 6
    self.vision_factor = 2 if self.vision and (self.vision.freeze or all_frozen("thinker.visual")) else 6
    self.audio_factor = 2 if self.audio and (self.audio.freeze or all_frozen("thinker.audio_tower")) else 6

  def text_flops(self, rows: int, seq_len: int) -> float:
    t = self.text
    tokens = rows * seq_len
    # Causal attention: QK^T and AV each cost 2 * L * heads * head_dim per token forward, halved by the mask.
    attn_fwd = 2 * 2 * seq_len * t.num_attention_heads * t.head_dim / 2
    return tokens * (self.text_factor * self.text_matmul_params + 3 * t.num_hidden_layers * attn_fwd)

  def vision_flops(self, grids: np.ndarray) -> float:
    v = self.vision
    if v is None or grids is None:
      return 0.0
    grids = np.asarray(grids).reshape(-1, 3)
    patches_per_item = np.prod(grids, axis=1).astype(np.float64)
    patches = patches_per_item.sum()
    if patches == 0:
      return 0.0
    block = (_linear_params(v.hidden_size, v.hidden_size) * 4 + _linear_params(v.hidden_size, v.intermediate_size) * 3)
    merger_in = v.hidden_size * v.merge_unit
    merger = _linear_params(merger_in, merger_in) + _linear_params(merger_in, v.out_hidden_size)
    matmul = patches * (v.depth * block + v.patch_dim * v.hidden_size) + patches / v.merge_unit * merger
    window = (v.window_size // v.patch_size) ** 2  # patches per attention window
    full = len(v.fullatt_block_indexes)
    per_patch_attn = 4 * v.hidden_size  # QK^T + AV per key, forward (bidirectional: no halving)
    attn = (v.depth - full) * patches * window * per_patch_attn + full * (patches_per_item ** 2).sum() * per_patch_attn
    return self.vision_factor * matmul + 3 * attn * (self.vision_factor / 6)

  def audio_flops(self, lengths: np.ndarray) -> float:
    a = self.audio
    if a is None or lengths is None:
      return 0.0
    frames = np.asarray(lengths, np.float64).reshape(-1)
    frames = frames[frames > 0]
    if frames.size == 0:
      return 0.0
    tokens = ((frames - 1) // 2 + 1).sum()  # after the stride-2 conv
    d = a.d_model
    layer = _linear_params(d, d) * 4 + _linear_params(d, a.encoder_ffn_dim) * 2
    conv = frames.sum() * 3 * a.num_mel_bins * d + tokens * 3 * d * d
    matmul = tokens * a.encoder_layers * layer + conv + tokens / 2 * d * a.output_dim
    attn = a.encoder_layers * tokens * a.n_window * 4 * d  # block-diagonal per chunk of n_window tokens
    return self.audio_factor * matmul + 3 * attn * (self.audio_factor / 6)

  def step_flops(self, batch: Mapping[str, Any]) -> float:
    rows, seq_len = np.shape(batch["input_ids"])
    total = self.text_flops(rows, seq_len)
    for key in ("image_grid_thw", "video_grid_thw"):
      if key in batch:
        total += self.vision_flops(batch[key])
    if "audio_lengths" in batch:
      total += self.audio_flops(batch["audio_lengths"])
    return float(total)


def summarize(sums: Mapping[str, np.ndarray], prefix: str) -> dict:
  """Scalars from per-modality sums: loss (+ ppl, accuracy) overall and per kind with tokens."""
  loss_sum, count = np.asarray(sums["loss_sum"], np.float64), np.asarray(sums["count"], np.float64)
  total = max(count.sum(), 1.0)
  out = {f"{prefix}/loss": loss_sum.sum() / total, f"{prefix}/label_tokens": count.sum()}
  if "correct" in sums:
    correct = np.asarray(sums["correct"], np.float64)
    out[f"{prefix}/ppl"] = float(np.exp(min(out[f"{prefix}/loss"], 50.0)))
    out[f"{prefix}/accuracy"] = correct.sum() / total
  for k, name in KIND_NAMES.items():
    if count[k] > 0:
      out[f"{prefix}/loss_{name}"] = loss_sum[k] / count[k]
      out[f"{prefix}/label_tokens_{name}"] = count[k]
      if "correct" in sums:
        out[f"{prefix}/ppl_{name}"] = float(np.exp(min(loss_sum[k] / count[k], 50.0)))
        out[f"{prefix}/accuracy_{name}"] = correct[k] / count[k]
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

  def update(self, step: int, loss: float, tokens_per_s: float, step_time: float) -> None:
    self.bar.n = step
    self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", step_s=f"{step_time:.3f}", refresh=False)
    self.bar.refresh()

  def write(self, msg: str) -> None:
    self.bar.write(msg)

  def close(self) -> None:
    self.bar.close()

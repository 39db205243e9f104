"""Model FLOPs of one train step of the Thinker, for MFU (omni_jax.train.metrics.FlopCounter)."""

from typing import Any, Mapping

import ml_collections
import numpy as np

from omni_jax import config as config_lib
from omni_jax import sizes
from omni_jax.layers import lora
from omni_jax.models.audio import thinker_audio
from omni_jax.models.vision import thinker_vision


def _linear_params(d_in: int, d_out: int) -> int:
  return d_in * d_out


class ThinkerFlops:
  """Model FLOPs of one train step of the Thinker, from the host batch (docs/training.md, "MFU").

  Per matmul weight: 2 FLOPs per token forward, 2 for the gradient of its input, 2 for the gradient of the
  weight: 6 when it trains, 4 when it is frozen but something before it trains (the text decoder in stage 1, a
  LoRA run's frozen base: its adapters need the input gradients), 2 when nothing before it needs a gradient (a
  frozen encoder). Attention adds the score and value matmuls. LoRA adapters' own matmuls (rank r: about r /
  width of their weight's) are not counted.
  """

  def __init__(self, config: ml_collections.ConfigDict, frozen: frozenset = frozenset(), param_paths: tuple = ()):
    """frozen / param_paths: parameter paths (tuples) frozen by config.train.freeze, and all of them."""
    self.text = config_lib.thinker_text(config)
    self.vision, self.audio = thinker_vision(config), thinker_audio(config)
    t = self.text
    per_layer = (_linear_params(t.hidden_size, t.num_attention_heads * t.head_dim) * 2  # q, o
                 + _linear_params(t.hidden_size, t.num_key_value_heads * t.head_dim) * 2  # k, v
                 + _linear_params(t.hidden_size, t.intermediate_size) * 3)  # gate, up, down
    self.text_matmul_params = t.num_hidden_layers * per_layer + t.hidden_size * t.vocab_size  # + lm_head

    def all_frozen(*prefixes):  # every base weight under the prefixes (LoRA adapters are not base weights)
      under = [p for p in param_paths if p[:2] in [tuple(x.split(".")) for x in prefixes] and not lora.is_adapter(p)]
      return bool(under) and all(p in frozen for p in under)

    self.text_factor = 4 if all_frozen("thinker.model", "thinker.lm_head") else 6
    self.vision_factor = 2 if self.vision and (self.vision.freeze or all_frozen("thinker.visual")) else 6
    self.audio_factor = 2 if self.audio and (self.audio.freeze or all_frozen("thinker.audio_tower")) else 6

  def text_flops(self, rows: int, seq_len: int) -> float:
    t = self.text
    attention = sizes.causal_attention_flops(rows, seq_len, t.num_hidden_layers, t.num_attention_heads, t.head_dim)
    return rows * seq_len * self.text_factor * self.text_matmul_params + 3 * attention

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
    tokens = sizes.audio_conv_frames(frames).sum()  # after the stride-2 conv
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


"""Token2Wav's registry entry (omni_jax.towers): codes -> mel (the flow-matching DiT) -> 24 kHz speech (BigVGAN).

config.model.token2wav = {dit: DiTConfig fields, bigvgan: BigVGANConfig fields, dtype: "float32"}: float32 by
default whatever config.model.dtype says, as transformers always runs it ("bfloat16" selectable). Attribute
names follow the checkpoint (token2wav.code2wav_dit_model.*, token2wav.code2wav_bigvgan_model.*), so the
converter maps the DiT with its generic rules and the vocoder with its transposed-conv / SnakeBeta rules.

Objective `token2wav_flow` (objective.py): flow matching of the DiT on the batch's DiT rows (the data hook,
data.py); its settings are config.train.token2wav (targets.FlowConfig), kept on the module (`Token2Wav.flow`,
static) so that the objective reads them inside the step.
"""

import dataclasses
from typing import Any, Mapping

import ml_collections
import numpy as np
from flax import nnx

from omni_jax import config as config_lib
from omni_jax import towers
from omni_jax.errors import ConfigError
from omni_jax.models.bigvgan import BigVGAN, BigVGANConfig
from omni_jax.models.dit import DiT, DiTConfig
from omni_jax.token2wav import bigvgan_weights, data, objective
from omni_jax.token2wav import targets as flow_targets


@dataclasses.dataclass(frozen=True)
class Token2WavView:
  dit: DiTConfig
  bigvgan: BigVGANConfig
  runtime: config_lib.Runtime
  flow: flow_targets.FlowConfig = flow_targets.FlowConfig()


def view(config: ml_collections.ConfigDict) -> Token2WavView:
  section = config.model.token2wav
  for part in ("dit", "bigvgan"):
    if section.get(part, None) is None:
      raise ConfigError(f"config.model.token2wav.{part}: is missing")
  unknown = set(section.keys()) - {"dit", "bigvgan", "dtype"}
  if unknown:
    raise ConfigError(f"config.model.token2wav: unknown keys {sorted(unknown)}; known: ['bigvgan', 'dit', 'dtype']")
  dtype = config_lib.dtype_of(section.get("dtype", "float32"), "model.token2wav.dtype")
  base = config_lib.Runtime.from_config(config.model)
  dit = DiTConfig.from_config(section.dit)
  bigvgan = BigVGANConfig.from_config(section.bigvgan, "model.token2wav.bigvgan")
  if dit.mel_dim != bigvgan.mel_dim:
    raise ConfigError(f"config.model.token2wav.bigvgan.mel_dim: {bigvgan.mel_dim} differs from the DiT's mel_dim "
                      f"{dit.mel_dim}")
  flow = _flow_view(config, dit)
  return Token2WavView(dit, bigvgan, dataclasses.replace(base, dtype=dtype, param_dtype=dtype), flow)


def _flow_view(config: ml_collections.ConfigDict, dit: DiTConfig) -> flow_targets.FlowConfig:
  """config.train.token2wav, checked against the DiT (its data, config.data.speech_codes, is checked when the
  pipeline starts: omni_jax.token2wav.targets.from_config)."""
  flow = flow_targets.FlowConfig.from_config(config)
  if "train" not in config:
    return flow
  # ECAPA's first convolution reflect-pads (kernel - 1) / 2 frames each side, which needs more frames than that.
  flow.check_model(dit.repeats, min_ref=max(dit.enc_kernel_sizes) // 2 + 1)
  return flow


class Token2Wav(nnx.Module):
  def __init__(self, v: Token2WavView, *, rngs: nnx.Rngs):
    self.code2wav_dit_model = DiT(v.dit, v.runtime, rngs=rngs)
    self.code2wav_bigvgan_model = BigVGAN(v.bigvgan, v.runtime, rngs=rngs)
    self.flow = v.flow  # training settings (static): read by the token2wav_flow objective


def build(config: ml_collections.ConfigDict, rt: config_lib.Runtime, rngs) -> Token2Wav:
  del rt  # Token2Wav keeps its own dtype (float32 unless config.model.token2wav.dtype says otherwise)
  return Token2Wav(view(config), rngs=rngs)


class DiTFlops:
  """Model FLOPs of the DiT's flow objective per train step: 6 per block weight and mel frame when it trains
  (2 when frozen), plus the block attention (3 blocks of keys per query); ECAPA and the embeddings are left
  out (small). BigVGAN does not train."""

  def __init__(self, config: ml_collections.ConfigDict, frozen: frozenset = frozenset(), param_paths: tuple = ()):
    cfg = view(config).dit
    inner = cfg.num_attention_heads * cfg.head_dim
    per_layer = 4 * cfg.hidden_size * inner + 2 * cfg.hidden_size ** 2 * cfg.ff_mult  # AdaLN is per row, not frame
    self.cfg = cfg
    self.matmul_params = cfg.num_hidden_layers * per_layer + cfg.hidden_size * cfg.mel_dim
    under = [p for p in param_paths if p[:2] == ("token2wav", "code2wav_dit_model")]
    self.factor = 2 if under and all(p in frozen for p in under) else 6

  def step_flops(self, batch: Mapping[str, Any]) -> float:
    if "token2wav_mel" not in batch:
      return 0.0
    rows, frames = np.shape(batch["token2wav_mel"])[:2]
    c = self.cfg
    attn_fwd = 2 * 2 * 3 * c.block_size * c.num_attention_heads * c.head_dim
    return float(rows * frames * (self.factor * self.matmul_params + 3 * c.num_hidden_layers * attn_fwd))


TOWER = towers.Tower(
    name="token2wav", section="model.token2wav", view=view, build=build,
    stacked=("token2wav.code2wav_dit_model.transformer_blocks",),
    rules=tuple(bigvgan_weights.rules("token2wav.code2wav_bigvgan_model.", "token2wav.code2wav_bigvgan_model.")),
    flops=DiTFlops, objectives=(towers.Objective(flow_targets.OBJECTIVE, objective.flow_loss, objective.num_frames),),
    data=data.DATA)

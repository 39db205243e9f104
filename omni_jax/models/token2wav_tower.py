"""Token2Wav's registry entry (omni_jax.towers): codes -> mel (the flow-matching DiT) -> 24 kHz speech (BigVGAN).

config.model.token2wav = {dit: DiTConfig fields, bigvgan: BigVGANConfig fields, dtype: "float32"}: float32 by
default whatever config.model.dtype says, as transformers always runs it ("bfloat16" selectable). Attribute
names follow the checkpoint (token2wav.code2wav_dit_model.*, token2wav.code2wav_bigvgan_model.*), so the
converter maps the DiT with its generic rules and the vocoder with its transposed-conv / SnakeBeta rules.
No objective yet: training the DiT on the open units is the next step (docs/token2wav.md).
"""

import dataclasses

import ml_collections
from flax import nnx

from omni_jax import config as config_lib
from omni_jax import towers
from omni_jax.config import ConfigError
from omni_jax.models.bigvgan import BigVGAN, BigVGANConfig
from omni_jax.models.dit import DiT, DiTConfig
from omni_jax.token2wav import bigvgan_weights


@dataclasses.dataclass(frozen=True)
class Token2WavView:
  dit: DiTConfig
  bigvgan: BigVGANConfig
  runtime: config_lib.Runtime


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
  return Token2WavView(dit, bigvgan, dataclasses.replace(base, dtype=dtype, param_dtype=dtype))


class Token2Wav(nnx.Module):
  def __init__(self, v: Token2WavView, *, rngs: nnx.Rngs):
    self.code2wav_dit_model = DiT(v.dit, v.runtime, rngs=rngs)
    self.code2wav_bigvgan_model = BigVGAN(v.bigvgan, v.runtime, rngs=rngs)


def build(config: ml_collections.ConfigDict, rt: config_lib.Runtime, rngs) -> Token2Wav:
  del rt  # Token2Wav keeps its own dtype (float32 unless config.model.token2wav.dtype says otherwise)
  return Token2Wav(view(config), rngs=rngs)


TOWER = towers.Tower(
    name="token2wav", section="model.token2wav", view=view, build=build,
    stacked=("token2wav.code2wav_dit_model.transformer_blocks",),
    rules=tuple(bigvgan_weights.rules("token2wav.code2wav_bigvgan_model.", "token2wav.code2wav_bigvgan_model.")))

"""Typed views of the ml_collections config, validated at startup.

The ConfigDict mirrors transformers' config names (config.model.thinker.text.hidden_size, ...), so HF
conversion is a table and not a translation layer. Modules receive the frozen dataclasses below (hashable,
so they live in the NNX graphdef as static data). Every check names the offending config key.
"""

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp
import ml_collections


class ConfigError(ValueError):
  """A configuration value is missing or inconsistent; the message names the key."""


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_attention_out")


def _require(cond: bool, key: str, msg: str):
  if not cond:
    raise ConfigError(f"config.{key}: {msg}")


def dtype_of(name: str, key: str):
  _require(name in _DTYPES, key, f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
  return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """A Qwen2.5 decoder (the Thinker LM; the Talker reuses it with its own sizes)."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  mrope_section: tuple[int, ...] = (16, 24, 24)
  max_position_embeddings: int = 32768
  tie_word_embeddings: bool = False

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, key: str) -> "TextConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in cfg.items() if k in fields}
    unknown = set(cfg.keys()) - fields
    _require(not unknown, key, f"unknown keys {sorted(unknown)}")
    if values.get("head_dim") is None:
      _require("hidden_size" in values and "num_attention_heads" in values, key,
               "needs hidden_size and num_attention_heads")
      values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.name not in values]
    _require(not missing, key, f"missing keys {missing}")
    values["mrope_section"] = tuple(int(s) for s in values.get("mrope_section", cls.mrope_section))
    out = cls(**values)
    out.validate(key)
    return out

  def validate(self, key: str):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim"):
      _require(getattr(self, name) > 0, f"{key}.{name}", f"must be positive, got {getattr(self, name)}")
    _require(self.num_attention_heads % self.num_key_value_heads == 0, f"{key}.num_key_value_heads",
             f"num_attention_heads={self.num_attention_heads} is not divisible by "
             f"num_key_value_heads={self.num_key_value_heads}")
    _require(self.head_dim % 2 == 0, f"{key}.head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
    _require(sum(self.mrope_section) == self.head_dim // 2, f"{key}.mrope_section",
             f"{list(self.mrope_section)} sums to {sum(self.mrope_section)}, must equal head_dim/2 = "
             f"{self.head_dim // 2}")
    _require(len(self.mrope_section) == 3, f"{key}.mrope_section", "needs 3 sections (time, height, width)")


@dataclasses.dataclass(frozen=True)
class TokenIds:
  """Special token ids the Thinker (and the position ids) need (spec §1.4, §1.8)."""
  audio_token_id: int = 151646
  image_token_id: int = 151655
  video_token_id: int = 151656
  audio_start_token_id: int = 151647
  audio_end_token_id: int = 151648
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  position_id_per_seconds: int = 25
  seconds_per_chunk: int = 2
  spatial_merge_size: int = 2

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "TokenIds":
    return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg})


@dataclasses.dataclass(frozen=True)
class Runtime:
  """How a model computes: dtypes, layer scan, rematerialisation, attention kernel."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: Optional[str] = None

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "Runtime":
    _require(cfg.get("remat_policy", "none") in REMAT_POLICIES, "model.remat_policy",
             f"unknown policy {cfg.get('remat_policy')!r}; choose one of {REMAT_POLICIES}")
    impl = cfg.get("attention_impl", None)
    _require(impl in (None, "xla", "cudnn"), "model.attention_impl", f"must be None, 'xla' or 'cudnn', got {impl!r}")
    return cls(dtype=dtype_of(cfg.get("dtype", "float32"), "model.dtype"),
               param_dtype=dtype_of(cfg.get("param_dtype", "float32"), "model.param_dtype"),
               scan_layers=bool(cfg.get("scan_layers", True)), remat_policy=cfg.get("remat_policy", "none"),
               attention_impl=impl)


def thinker_text(config: ml_collections.ConfigDict) -> TextConfig:
  _require("model" in config and "thinker" in config.model and "text" in config.model.thinker,
           "model.thinker.text", "is missing")
  return TextConfig.from_config(config.model.thinker.text, "model.thinker.text")


def validate(config: ml_collections.ConfigDict) -> None:
  """Fail fast on an inconsistent config (called by train.py / eval.py at startup)."""
  thinker_text(config)
  Runtime.from_config(config.model)
  from omni_jax import sharding  # local: keep config importable without jax device state

  if "mesh" in config:
    unknown = set(config.mesh.keys()) - set(sharding.MESH_AXES)
    _require(not unknown, "mesh", f"unknown axes {sorted(unknown)}; known {sharding.MESH_AXES}")
  if "sharding_rules" in config:
    try:
      sharding._rule_table(config.sharding_rules)
    except ValueError as e:
      raise ConfigError(str(e)) from None

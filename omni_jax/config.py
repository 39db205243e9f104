"""Typed views of the ml_collections config, validated at startup.

The ConfigDict mirrors transformers' config names (config.model.thinker.text.hidden_size, ...), so HF
conversion is a table and not a translation layer. Modules receive the frozen dataclasses below (hashable,
so they live in the NNX graphdef as static data). Every check names the offending config key.
"""

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp
import ml_collections
import numpy as np

from omni_jax import special_tokens
from omni_jax.errors import ConfigError


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_attention_out", "dots_and_attention")


def _require(cond: bool, key: str, msg: str):
  if not cond:
    raise ConfigError(f"config.{key}: {msg}")


def from_config_dict(cls, cfg: ml_collections.ConfigDict, key: str, **derived):
  """A frozen tower dataclass from its ConfigDict: unknown and missing keys are errors naming `key`;
  sequences become tuples (hashable, so the dataclass can live in an NNX graphdef). `derived` fills fields
  whose value depends on others when the config leaves them unset (None)."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = set(cfg.keys()) - set(fields)
  _require(not unknown, key, f"unknown keys {sorted(unknown)}; known: {sorted(fields)}")
  values = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.items()}
  for name, fill in derived.items():
    if values.get(name) is None:
      values[name] = fill(values)
  missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in values]
  _require(not missing, key, f"missing keys {missing}")
  out = cls(**values)
  out.validate(key)
  return out


def require_positive_ints(obj, names, key: str) -> None:
  for name in names:
    value = getattr(obj, name)
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0
    _require(ok, f"{key}.{name}", f"must be a positive integer, got {value!r}")


def dtype_of(name: str, key: str):
  _require(name in _DTYPES, key, f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
  return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """A Qwen2.5 decoder (the Thinker's language model)."""
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
    def head_dim(v):
      _require("hidden_size" in v and "num_attention_heads" in v, key, "needs hidden_size and num_attention_heads")
      return v["hidden_size"] // v["num_attention_heads"]

    return from_config_dict(cls, cfg, key, head_dim=head_dim)

  def validate(self, key: str):
    require_positive_ints(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "num_key_value_heads", "head_dim"), key)
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
  """Special token ids the Thinker (and the position ids) need: the released checkpoint's ids."""
  audio_token_id: int = special_tokens.THINKER["audio_token_id"]
  image_token_id: int = special_tokens.THINKER["image_token_id"]
  video_token_id: int = special_tokens.THINKER["video_token_id"]
  audio_start_token_id: int = special_tokens.THINKER["audio_start_token_id"]
  audio_end_token_id: int = special_tokens.THINKER["audio_end_token_id"]
  vision_start_token_id: int = special_tokens.THINKER["vision_start_token_id"]
  vision_end_token_id: int = special_tokens.THINKER["vision_end_token_id"]
  pad_token_id: int = special_tokens.PAD  # <|endoftext|>: left padding of batched prompts, filler after a row stops
  user_token_id: int = special_tokens.USER  # "user" (transformers' config field; unused by the model code)
  eos_token_ids: tuple[int, ...] = special_tokens.EOS  # <|im_end|>, <|endoftext|>: generation stops on either
  position_id_per_seconds: int = 25
  seconds_per_chunk: int = 2
  spatial_merge_size: int = 2

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "TokenIds":
    values = {f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg}
    if "eos_token_ids" in values:
      values["eos_token_ids"] = tuple(int(i) for i in values["eos_token_ids"])
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class Runtime:
  """How a model computes: dtypes, layer scan, rematerialisation, attention kernel."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: Optional[str] = "auto"

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "Runtime":
    _require(cfg.get("remat_policy", "none") in REMAT_POLICIES, "model.remat_policy",
             f"unknown policy {cfg.get('remat_policy')!r}; choose one of {REMAT_POLICIES}")
    # attention_impl is checked by omni_jax.layers.attention, which knows the implementations (towers.validate).
    return cls(dtype=dtype_of(cfg.get("dtype", "float32"), "model.dtype"),
               param_dtype=dtype_of(cfg.get("param_dtype", "float32"), "model.param_dtype"),
               scan_layers=bool(cfg.get("scan_layers", True)), remat_policy=cfg.get("remat_policy", "none"),
               attention_impl=cfg.get("attention_impl", "auto"))


def thinker_text(config: ml_collections.ConfigDict) -> TextConfig:
  _require("model" in config and "thinker" in config.model and "text" in config.model.thinker,
           "model.thinker.text", "is missing")
  return TextConfig.from_config(config.model.thinker.text, "model.thinker.text")


def validate_common(config: ml_collections.ConfigDict) -> None:
  """The keys every model shares that this module knows (runtime, trainer). The whole config is checked by
  omni_jax.towers.validate, which adds the attention implementation, the mesh and sharding rules, and each
  built tower's section (train.py / eval.py call that one)."""
  Runtime.from_config(config.model)
  if "train" in config:
    validate_train(config)


def _positive_int(config, key: str, allow_zero: bool = False):
  value = config
  for part in key.split("."):
    _require(part in value, key, "is missing")
    value = value[part]
  ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
  _require(ok, key, f"must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")
  return value


def validate_train(config: ml_collections.ConfigDict) -> None:
  """The trainer's keys (config.train / data / eval): types, ranges and how they fit together."""
  import re  # local: only the trainer needs it

  t = config.train
  for key in ("steps", "batch_size", "seq_len", "grad_accum_steps", "log_every"):
    _positive_int(config, f"train.{key}")
  for key in ("warmup_steps", "checkpoint_every", "keep_checkpoints", "keep_every", "eval_every"):
    _positive_int(config, f"train.{key}", allow_zero=True)
  for key in ("loss_chunk_size", "label_budget"):  # optional (configs stored before they existed)
    if key in t:
      _positive_int(config, f"train.{key}", allow_zero=True)
  if "fused_head_loss" in t:
    _require(isinstance(t.fused_head_loss, bool), "train.fused_head_loss",
             f"must be True or False, got {t.fused_head_loss!r}")
  _require(t.batch_size % t.grad_accum_steps == 0, "train.grad_accum_steps",
           f"train.batch_size={t.batch_size} is not divisible into {t.grad_accum_steps} micro-batches")
  for key in ("lr", "weight_decay", "grad_clip_norm", "eps"):
    _require(isinstance(t[key], (int, float)) and t[key] >= 0, f"train.{key}", f"must be >= 0, got {t[key]!r}")
  for key in ("b1", "b2", "end_lr_factor"):
    _require(isinstance(t[key], (int, float)) and 0 <= t[key] <= 1, f"train.{key}",
             f"must be in [0, 1], got {t[key]!r}")
  _require(isinstance(t.freeze, (tuple, list)) and all(isinstance(f, str) for f in t.freeze), "train.freeze",
           f"must be a tuple of parameter-path regexes, got {t.freeze!r}")
  for pattern in t.freeze:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"config.train.freeze: {pattern!r} is not a valid regex ({e})") from None
  peak = t.get("peak_flops_per_device", None)
  _require(peak is None or (isinstance(peak, (int, float)) and peak > 0), "train.peak_flops_per_device",
           f"must be None or a positive number, got {peak!r}")
  max_pos = config.model.get("thinker", {}).get("text", {}).get("max_position_embeddings", None)
  _require(max_pos is None or t.seq_len <= max_pos, "train.seq_len",
           f"{t.seq_len} exceeds model.thinker.text.max_position_embeddings={max_pos}")
  if "data" in config:
    _require(isinstance(config.data.get("source"), str), "data.source", "must name a data source")
    for key in ("max_records_without_batch", "skip_ratio_min_records"):
      if key in config.data:
        _positive_int(config, f"data.{key}")
    lag, limit = config.data.get("max_lag", 512), config.data.get("max_records_without_batch", 10000)
    _require(not isinstance(lag, int) or limit > lag, "data.max_records_without_batch",
             f"{limit} must exceed config.data.max_lag={lag} (a bucket may wait max_lag records for its batch)")
    ratio = config.data.get("max_skip_ratio", 0.5)
    _require(isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio <= 1,
             "data.max_skip_ratio", f"must be in (0, 1] (1: never stop for skips), got {ratio!r}")
  if "eval" in config:
    _positive_int(config, "eval.steps")
    _positive_int(config, "eval.batch_size")
  init_from = config.get("init_from", None)
  _require(init_from is None or isinstance(init_from, str), "init_from",
           f"must be None or a checkpoint path, got {init_from!r}")
  _require(init_from or not config.get("require_init_from", False), "init_from",
           "this recipe fine-tunes a checkpoint: pass --config.init_from=DIR (a `python -m omni_jax.convert` "
           "output or a training workdir)")

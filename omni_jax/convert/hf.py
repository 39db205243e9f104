"""Read and write Qwen2.5-Omni checkpoints as transformers stores them (config.json + safetensors shards).

Our module attribute names mirror the on-disk key names, so the mapping is a small table. This
module is the converter core; the per-tower tables are registered with omni_jax.towers:
  * stacked (per tower): module paths whose children are a stack of layers; on disk each layer has an index.
  * LEAF_RULES (here): how a leaf of ours becomes a tensor on disk (kernel -> weight transposed, ...).
  * rules (per tower): exceptions (regex on our dotted path -> on-disk name and transform), tried first.
  * parts (per tower): on-disk prefixes of towers or encoders, so a checkpoint with parts the config does not
    build reports what it leaves out instead of failing on "unknown" keys.
"""

import dataclasses
import glob
import json
import logging
import os
import re
from typing import Iterable, Optional

import ml_collections
import numpy as np
from flax import nnx
from safetensors import numpy as st_numpy
from safetensors import safe_open

from omni_jax import defaults, towers
from omni_jax.convert.rules import CheckpointMismatch, Rule, transpose

log = logging.getLogger(__name__)

# Leaf renames that hold everywhere unless a tower's rules say otherwise.
LEAF_RULES = [
    Rule(r"(.*)\.kernel", r"\1.weight", transpose, transpose),  # 2-D dense kernels are [in, out]
    Rule(r"(.*)\.embedding", r"\1.weight"),
    Rule(r"(.*)\.scale", r"\1.weight"),
    Rule(r"(.*)\.bias", r"\1.bias"),
]


def _stacked() -> list[str]:
  return [p for t in towers.registered() for p in t.stacked]


def _special() -> list[Rule]:
  return [r for t in towers.registered() for r in t.rules]


def _parts(built: frozenset = frozenset()) -> dict[str, str]:
  """On-disk prefix -> description of the checkpoint parts a model may leave out: registered towers the config
  does not build (`built`: names of those it builds), and their optional parts."""
  out = {}
  for t in towers.registered():
    if t.name not in built:
      out[t.name + "."] = t.name
    out.update(t.parts)
  return out


# --------------------------------------------------------------------------------------- config.json


def _rope(text: dict) -> tuple[float, tuple[int, ...]]:
  rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
  theta = rope.get("rope_theta", text.get("rope_theta", 1e6))
  section = rope.get("mrope_section", [16, 24, 24])
  return float(theta), tuple(int(s) for s in section)


def _thinker_json(hf: dict) -> dict:
  if hf.get("model_type") == "qwen2_5_omni_thinker":
    return hf
  if "thinker_config" not in hf:
    raise CheckpointMismatch(f"config.json has model_type={hf.get('model_type')!r} and no thinker_config; "
                             "expected a Qwen2.5-Omni (qwen2_5_omni or qwen2_5_omni_thinker) checkpoint")
  return hf["thinker_config"]


def config_from_hf(hf: dict, base: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
  """Our config for a transformers config.json dict (model part; runtime/mesh from `base`)."""
  c = ml_collections.ConfigDict(base.to_dict()) if base is not None else defaults.base_config()
  th = _thinker_json(hf)
  text = th["text_config"]
  theta, section = _rope(text)
  t = ml_collections.ConfigDict()
  defaults.thinker_token_ids(t)
  for key in ("audio_token_index", "image_token_index", "video_token_index"):
    if key in th:
      t[key.replace("_index", "_id")] = int(th[key])
  for key in ("audio_start_token_id", "audio_end_token_id", "vision_start_token_id", "vision_end_token_id",
              "position_id_per_seconds", "seconds_per_chunk"):
    if key in th:
      t[key] = int(th[key])
  if "vision_config" in th:
    t.spatial_merge_size = int(th["vision_config"].get("spatial_merge_size", 2))
  _generation_ids_from_hf(t, th, text)
  t.text = ml_collections.ConfigDict(dict(
      vocab_size=int(text["vocab_size"]), hidden_size=int(text["hidden_size"]),
      intermediate_size=int(text["intermediate_size"]), num_hidden_layers=int(text["num_hidden_layers"]),
      num_attention_heads=int(text["num_attention_heads"]), num_key_value_heads=int(text["num_key_value_heads"]),
      head_dim=int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]),
      hidden_act=text.get("hidden_act", "silu"), rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
      rope_theta=theta, mrope_section=section,
      max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
      # The thinker-level flag decides tying; the text_config flag is ignored by transformers.
      tie_word_embeddings=bool(th.get("tie_word_embeddings", False))))
  if "audio_config" in th:
    t.audio = _audio_from_hf(th["audio_config"], base)
  if "vision_config" in th:
    t.vision = _vision_from_hf(th["vision_config"], base)
  c.model.thinker = t
  if hf.get("talker_config") is not None and hf.get("enable_audio_output", True):
    _talker_from_hf(c, hf["talker_config"], base)
  elif "talker" in c.model:  # the checkpoint has no Talker: neither has the model (nor its objective)
    c = towers.without(c, "talker")
  if hf.get("token2wav_config") is not None and hf.get("enable_audio_output", True):
    c.model.token2wav = _token2wav_from_hf(hf["token2wav_config"], base)
  elif "token2wav" in c.model:
    c = towers.without(c, "token2wav")
  return c


def _token2wav_from_hf(tw: dict, base: Optional[ml_collections.ConfigDict]) -> ml_collections.ConfigDict:
  """config.model.token2wav from a token2wav_config dict (dit_config, bigvgan_config); the dtype (a runtime
  choice, float32 as transformers runs it) from the base config."""
  from omni_jax.models.bigvgan import BigVGANConfig  # pylint: disable=import-outside-toplevel
  from omni_jax.models.dit import DiTConfig  # pylint: disable=import-outside-toplevel

  def plain(cfg):
    return {k: [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(cfg).items()}

  dtype = "float32"
  if base is not None and base.model.get("token2wav") is not None:
    dtype = base.model.token2wav.get("dtype", "float32")
  return ml_collections.ConfigDict(dict(dit=plain(DiTConfig.from_hf(tw.get("dit_config") or {})),
                                        bigvgan=plain(BigVGANConfig.from_hf(tw.get("bigvgan_config") or {})),
                                        dtype=dtype))


def _token2wav_to_hf(config: ml_collections.ConfigDict, carried: Optional[dict]) -> dict:
  """token2wav_config for our config.model.token2wav, over the source's (its other keys kept)."""
  tw = config.model.token2wav
  out = json.loads(json.dumps(carried or {}))
  dit = {k: list(v) if isinstance(v, tuple) else v for k, v in tw.dit.to_dict().items() if k != "rope_theta"}
  dit["rope_parameters"] = {"rope_type": "default", "rope_theta": float(tw.dit.rope_theta)}
  out.setdefault("dit_config", {}).update(dit)
  out.setdefault("bigvgan_config", {}).update(
      {k: [list(x) if isinstance(x, (list, tuple)) else x for x in v] if isinstance(v, (list, tuple)) else v
       for k, v in tw.bigvgan.to_dict().items()})
  return out


# Talker config keys (transformers' Qwen2_5OmniTalkerConfig) held in config.model.talker under the same name.
_TALKER_IDS = ("tts_codec_start_token_id", "tts_codec_end_token_id", "tts_codec_pad_token_id",
               "tts_codec_mask_token_id", "tts_text_start_token_id", "tts_text_end_token_id", "tts_text_pad_token_id")
# What config.json cannot say (transformers has no such keys): written as extra talker_config keys, which
# transformers keeps and ignores, so a round trip restores them.
_TALKER_EXTRAS = ("num_codes", "units_version")
RELEASED_NUM_CODES = 8192


def _talker_from_hf(c: ml_collections.ConfigDict, tk: dict, base: Optional[ml_collections.ConfigDict]) -> None:
  """config.model.talker from a talker_config dict. num_codes (not an HF key): the file's extra key, else the
  release's 8192 speech codes, capped below the lowest special codec id. Training switches
  (thinker_gradient) and the speaker table come from `base` (speakers: from spk_dict.pt, see
  omni_jax.convert.speakers)."""
  theta, section = _rope(tk)
  defaults.talker(
      c, int(tk["embedding_size"]), vocab_size=int(tk["vocab_size"]), hidden_size=int(tk["hidden_size"]),
      intermediate_size=int(tk["intermediate_size"]), num_hidden_layers=int(tk["num_hidden_layers"]),
      num_attention_heads=int(tk["num_attention_heads"]), num_key_value_heads=int(tk["num_key_value_heads"]),
      head_dim=int(tk.get("head_dim") or tk["hidden_size"] // tk["num_attention_heads"]),
      hidden_act=tk.get("hidden_act", "silu"), rms_norm_eps=float(tk.get("rms_norm_eps", 1e-6)), rope_theta=theta,
      mrope_section=section, max_position_embeddings=int(tk.get("max_position_embeddings", 32768)),
      tie_word_embeddings=False)
  t = c.model.talker
  for key in _TALKER_IDS:
    if tk.get(key) is not None:
      t[key] = int(tk[key])
  specials = min(int(t[k]) for k in _TALKER_IDS[:4])
  t.num_codes = int(tk["num_codes"]) if tk.get("num_codes") is not None else min(RELEASED_NUM_CODES, specials)
  if tk.get("units_version") is not None:
    t.units_version = str(tk["units_version"])
  try:  # a training choice, not part of the checkpoint: keep the base config's
    t.thinker_gradient = bool(base.model.talker.thinker_gradient)
    t.speakers = ml_collections.ConfigDict(dict(base.model.talker.speakers))
    t.default_speaker = str(base.model.talker.default_speaker)
  except (AttributeError, KeyError, TypeError):
    pass


def _generation_ids_from_hf(t: ml_collections.ConfigDict, th: dict, text: dict) -> None:
  """pad / eos / user ids: the checkpoint's where it states them; else the released ids that fit its vocabulary
  (a tiny random checkpoint without them gets pad 0 and no eos, so generation runs to max_new_tokens)."""
  t.update(defaults.generation_ids_within(int(text["vocab_size"])))
  if th.get("user_token_id") is not None:
    t.user_token_id = int(th["user_token_id"])
  pad = text.get("pad_token_id", th.get("pad_token_id"))
  if pad is not None:
    t.pad_token_id = int(pad)
  eos = text.get("eos_token_id", th.get("eos_token_id"))
  if eos is not None:
    t.eos_token_ids = tuple(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))


_AUDIO_KEYS = ("num_mel_bins", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "d_model",
               "activation_function", "max_source_positions", "n_window", "output_dim")


_VISION_KEYS = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                "temporal_patch_size", "spatial_merge_size", "window_size", "out_hidden_size", "fullatt_block_indexes",
                "hidden_act")


def _vision_from_hf(vision: dict, base: Optional[ml_collections.ConfigDict]) -> ml_collections.ConfigDict:
  """model.thinker.vision from a vision_config dict (missing keys: transformers' class defaults, including
  its hidden_size 3584, which no checkpoint uses: saved config.json files always carry the key)."""
  from omni_jax.models.vision import VisionConfig  # local: keep this module importable without the towers

  default = VisionConfig()
  values = {}
  for k in _VISION_KEYS:
    v = vision.get(k, getattr(default, k) if k != "hidden_size" else 3584)
    values[k] = tuple(int(i) for i in v) if k == "fullatt_block_indexes" else type(getattr(default, k))(v)
  rope = vision.get("rope_parameters") or {}
  values["rope_theta"] = float(rope.get("rope_theta", vision.get("rope_theta", default.rope_theta)))
  try:  # a training choice, not part of the checkpoint: keep the base config's
    values["freeze"] = bool(base.model.thinker.vision.freeze)
  except (AttributeError, KeyError):
    values["freeze"] = False
  return ml_collections.ConfigDict(values)


def _audio_from_hf(audio: dict, base: Optional[ml_collections.ConfigDict]) -> ml_collections.ConfigDict:
  """model.thinker.audio from an audio_config dict (missing keys: the transformers class defaults)."""
  from omni_jax.models.audio import AudioConfig  # local: keep this module importable without the towers

  default = AudioConfig()
  values = {k: type(getattr(default, k))(audio.get(k, getattr(default, k))) for k in _AUDIO_KEYS}
  try:  # a training choice, not part of the checkpoint: keep the base config's
    values["freeze"] = bool(base.model.thinker.audio.freeze)
  except (AttributeError, KeyError):
    values["freeze"] = False
  return ml_collections.ConfigDict(values)


def config_to_hf(config: ml_collections.ConfigDict, torch_dtype: str = "float32",
                 token2wav: Optional[dict] = None) -> dict:
  """config.json for our config; inverse of config_from_hf. Without a Talker: a thinker checkpoint
  (qwen2_5_omni_thinker). With one: the full model (qwen2_5_omni: thinker_config + talker_config, audio output
  on) that Qwen2_5OmniForConditionalGeneration loads; `token2wav`: the source's token2wav_config (we build
  no Token2Wav; without it transformers builds its class defaults, randomly initialised)."""
  thinker = _thinker_to_hf(config, torch_dtype)
  if config.model.get("talker") is None:
    return thinker
  thinker.pop("architectures")
  out = {"model_type": "qwen2_5_omni", "architectures": ["Qwen2_5OmniForConditionalGeneration"],
         "dtype": torch_dtype, "enable_audio_output": True, "thinker_config": thinker,
         "talker_config": _talker_to_hf(config)}
  if config.model.get("token2wav") is not None:
    out["token2wav_config"] = _token2wav_to_hf(config, token2wav)
  elif token2wav is not None:
    out["token2wav_config"] = token2wav
  return out


def _talker_to_hf(config: ml_collections.ConfigDict) -> dict:
  t, th = config.model.talker, config.model.thinker
  x = t.text
  out = {
      "model_type": "qwen2_5_omni_talker", "vocab_size": x.vocab_size, "embedding_size": t.embedding_size,
      "hidden_size": x.hidden_size, "intermediate_size": x.intermediate_size,
      "num_hidden_layers": x.num_hidden_layers, "num_attention_heads": x.num_attention_heads,
      "num_key_value_heads": x.num_key_value_heads, "head_dim": x.head_dim, "hidden_act": x.hidden_act,
      "rms_norm_eps": x.rms_norm_eps, "max_position_embeddings": x.max_position_embeddings,
      "tie_word_embeddings": False,
      "rope_parameters": {"rope_type": "default", "rope_theta": x.rope_theta, "mrope_section": list(x.mrope_section)},
      # The Talker's own get_rope_index reads the Thinker's media ids and position constants.
      "audio_token_index": th.audio_token_id, "image_token_index": th.image_token_id,
      "video_token_index": th.video_token_id, "audio_start_token_id": th.audio_start_token_id,
      "audio_end_token_id": th.audio_end_token_id, "vision_start_token_id": th.vision_start_token_id,
      "vision_end_token_id": th.vision_end_token_id, "position_id_per_seconds": th.position_id_per_seconds,
      "seconds_per_chunk": th.seconds_per_chunk, "spatial_merge_size": th.spatial_merge_size,
  }
  out.update({k: int(t[k]) for k in _TALKER_IDS})
  out["num_codes"] = int(t.num_codes)
  if t.get("units_version") is not None:
    out["units_version"] = str(t.units_version)
  return out


def _thinker_to_hf(config: ml_collections.ConfigDict, torch_dtype: str) -> dict:
  t = config.model.thinker
  x = t.text
  out = {
      "model_type": "qwen2_5_omni_thinker",
      "architectures": ["Qwen2_5OmniThinkerForConditionalGeneration"],
      "dtype": torch_dtype,
      "tie_word_embeddings": bool(x.tie_word_embeddings),
      "audio_token_index": t.audio_token_id, "image_token_index": t.image_token_id,
      "video_token_index": t.video_token_id, "audio_start_token_id": t.audio_start_token_id,
      "audio_end_token_id": t.audio_end_token_id, "vision_start_token_id": t.vision_start_token_id,
      "vision_end_token_id": t.vision_end_token_id, "position_id_per_seconds": t.position_id_per_seconds,
      "seconds_per_chunk": t.seconds_per_chunk, "user_token_id": t.user_token_id,
      "pad_token_id": t.pad_token_id, "eos_token_id": list(t.eos_token_ids),
      "text_config": {
          "model_type": "qwen2_5_omni_text", "vocab_size": x.vocab_size, "hidden_size": x.hidden_size,
          "intermediate_size": x.intermediate_size, "num_hidden_layers": x.num_hidden_layers,
          "num_attention_heads": x.num_attention_heads, "num_key_value_heads": x.num_key_value_heads,
          "head_dim": x.head_dim, "hidden_act": x.hidden_act, "rms_norm_eps": x.rms_norm_eps,
          "max_position_embeddings": x.max_position_embeddings, "tie_word_embeddings": bool(x.tie_word_embeddings),
          "rope_parameters": {"rope_type": "default", "rope_theta": x.rope_theta,
                              "mrope_section": list(x.mrope_section)},
          "pad_token_id": t.pad_token_id, "eos_token_id": list(t.eos_token_ids),
      },
  }
  if t.get("audio") is not None:
    out["audio_config"] = dict({k: t.audio[k] for k in _AUDIO_KEYS}, model_type="qwen2_5_omni_audio_encoder")
  if t.get("vision") is not None:
    v = t.vision
    out["vision_config"] = dict({k: v[k] for k in _VISION_KEYS}, model_type="qwen2_5_omni_vision_encoder",
                                fullatt_block_indexes=[int(i) for i in v.fullatt_block_indexes],
                                rope_parameters={"rope_type": "axial", "rope_theta": float(v.rope_theta)})
  return out


# --------------------------------------------------------------------------------------- key mapping


def _split_stacked(path: str) -> tuple[Optional[str], str]:
  for prefix in _stacked():
    if path.startswith(prefix + "."):
      return prefix, path[len(prefix) + 1:]
  return None, path


def _leaf_rule(path: str) -> tuple[str, Rule]:
  for rule in _special() + LEAF_RULES:
    if re.fullmatch(rule.ours, path):
      return re.sub(rule.ours, rule.disk, path), rule
  raise CheckpointMismatch(f"no mapping rule for parameter {path!r}")


def disk_keys(path: str, num_layers: int) -> tuple[list[str], Rule]:
  """On-disk key(s) of one of our leaves (one per layer for stacked leaves) and its rule."""
  prefix, rest = _split_stacked(path)
  if prefix is None:
    key, rule = _leaf_rule(path)
    return [key], rule
  key, rule = _leaf_rule(prefix + "." + rest)
  tail = key[len(prefix) + 1:]
  return [f"{prefix}.{i}.{tail}" for i in range(num_layers)], rule


def _flat(state) -> Iterable[tuple[str, nnx.Variable]]:
  for path, var in nnx.to_flat_state(state):
    yield ".".join(str(p) for p in path), var


# --------------------------------------------------------------------------------------- tensors


class _Shards:
  """Lazy access to the tensors of a safetensors checkpoint directory (single file or index + shards)."""

  def __init__(self, hf_dir: str):
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
      raise FileNotFoundError(f"{hf_dir}: no *.safetensors files (expected a transformers checkpoint directory)")
    self.where = {}
    for f in files:
      try:
        with safe_open(f, framework="numpy") as h:
          for k in h.keys():
            self.where[k] = f
      except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
        raise CheckpointMismatch(f"{f}: not a readable safetensors file ({e}); a truncated download? "
                                 f"Fetch that shard again") from None

  def get(self, key: str) -> np.ndarray:
    with safe_open(self.where[key], framework="numpy") as h:
      return h.get_tensor(key)


def read_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: missing (expected a transformers checkpoint directory)")
  with open(path) as f:
    return json.load(f)


def load_state(hf_dir: str, abstract_state, *, hf_config: Optional[dict] = None):
  """Fill `abstract_state` (nnx.State of ShapeDtypeStructs) with the checkpoint's tensors, as numpy arrays.

  Raises CheckpointMismatch listing missing keys, unknown keys and shape mismatches. Tensors of towers the
  model does not build (e.g. the talker for a thinker-only config) are left out with one warning per tower.
  """
  hf_config = read_config(hf_dir) if hf_config is None else hf_config
  shards = _Shards(hf_dir)
  # A thinker-only checkpoint stores keys without the "thinker." prefix.
  prefix = "thinker." if hf_config.get("model_type") == "qwen2_5_omni_thinker" else ""
  available = {prefix + k: k for k in shards.where}
  used, missing, bad_shape = set(), [], []
  state = nnx.to_flat_state(abstract_state)
  out = []
  for path, var in _flat(abstract_state):
    shape, dtype = var.get_value().shape, var.get_value().dtype
    stacked = _split_stacked(path)[0] is not None
    keys, rule = disk_keys(path, shape[0] if stacked else 0)
    absent = [k for k in keys if k not in available]
    if absent:
      missing.extend(absent)
      out.append(None)
      continue
    tensors = [rule.from_disk(shards.get(available[k])) for k in keys]
    used.update(keys)
    value = np.stack(tensors) if stacked else tensors[0]
    if value.shape != tuple(shape):
      bad_shape.append(f"{keys[0]}{'...' if stacked else ''}: checkpoint {value.shape} vs model {tuple(shape)}")
    out.append(value.astype(dtype))
  unused = sorted(set(available) - used)
  dropped = {}
  unknown = []
  parts = _parts(frozenset(str(path[0]) for path, _ in state))
  for k in unused:
    tower = next((name for p, name in parts.items() if k.startswith(p)), None)
    if tower:
      dropped[tower] = dropped.get(tower, 0) + 1
    else:
      unknown.append(k)
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
  if unknown:
    problems.append(f"{len(unknown)} unknown: {unknown[:20]}{' ...' if len(unknown) > 20 else ''}")
  if bad_shape:
    problems.append(f"{len(bad_shape)} with other shapes: {bad_shape[:20]}")
  if problems:
    raise CheckpointMismatch(f"{hf_dir}: checkpoint does not match the model config; " + "; ".join(problems))
  for tower, n in dropped.items():
    log.warning("%s: %d tensors of the %s are not converted (the config does not build it)", hf_dir, n, tower)
  return nnx.from_flat_state([(p, var.replace(value)) for (p, var), value in zip(state, out)])


def state_to_tensors(state, dtype=None, config: Optional[ml_collections.ConfigDict] = None) -> dict[str, np.ndarray]:
  """Our state -> {on-disk key: array} (numpy; `dtype` converts, e.g. ml_dtypes.bfloat16).

  `config` (ours) gives the on-disk shapes our layout does not carry (the vision Conv3d patch embedding).
  """
  tensors = {}
  for path, var in _flat(state):
    value = np.asarray(var.get_value())
    stacked = _split_stacked(path)[0] is not None
    keys, rule = disk_keys(path, value.shape[0] if stacked else 0)
    for i, key in enumerate(keys):
      t = rule.to_disk(value[i] if stacked else value)
      if rule.disk_shape is not None:
        t = t.reshape(rule.disk_shape(config, t.shape))
      tensors[key] = np.ascontiguousarray(t.astype(dtype) if dtype is not None else t)
  return tensors


def save(out_dir: str, config: ml_collections.ConfigDict, state, *, dtype=None, torch_dtype: str = "float32",
         max_shard_bytes: int = 5 << 30, generation: Optional[dict] = None, token2wav: Optional[dict] = None) -> None:
  """Write a checkpoint that transformers loads and generates with: config.json (with the eos / pad / user
  ids), generation_config.json (export.generation_config: `generation`, the source's file if any, with the
  config's ids and config.generate written over it) and sharded safetensors with an index.

  Without a Talker: the thinker-only layout (keys without "thinker.", Qwen2_5OmniThinkerForConditionalGeneration).
  With one: the full-model layout (thinker.* and talker.* keys, Qwen2_5OmniForConditionalGeneration; its
  from_pretrained also needs spk_dict.pt, written by omni_jax.convert.speakers); `token2wav`: see config_to_hf.
  """
  from omni_jax.convert import export  # local import: export builds on this module, not the other way

  config = export.fit_token_ids(export.complete_token_ids(config))
  os.makedirs(out_dir, exist_ok=True)
  tensors = state_to_tensors(state, dtype, config)
  if config.model.get("talker") is None:
    tensors = {k[len("thinker."):]: v for k, v in tensors.items()}  # thinker-only layout
  shards, current, size = [], {}, 0
  for k in sorted(tensors):
    if current and size + tensors[k].nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[k] = tensors[k]
    size += tensors[k].nbytes
  shards.append(current)
  weight_map = {}
  for i, shard in enumerate(shards):
    name = ("model.safetensors" if len(shards) == 1 else
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
    st_numpy.save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in shard})
  if len(shards) > 1:
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map},
                f, indent=2)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config_to_hf(config, torch_dtype, token2wav), f, indent=2)
  with open(os.path.join(out_dir, export.GENERATION_FILE), "w") as f:
    json.dump(export.generation_config(config, generation), f, indent=2)

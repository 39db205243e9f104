"""PEFT adapter directories <-> our LoRA adapters (omni_jax.layers.lora): what `peft.PeftModel.from_pretrained`
loads onto transformers' Qwen2.5-Omni, and what `PeftModel.save_pretrained` writes.

A directory holds adapter_config.json (peft_type LORA, r, lora_alpha, lora_dropout, use_rslora, target_modules)
and adapter_model.safetensors with one pair per adapted module and layer:
  base_model.model.<module>.lora_A.weight  [r, in]   = a.T   (our a: [..., in, r])
  base_model.model.<module>.lora_B.weight  [out, r]  = b.T   (our b: [..., r, out])
Both sides scale by alpha / r (alpha / sqrt(r) with rsLoRA); a stacked Linear gives one module per layer.

Layouts (`layout`), one per transformers class:
  "thinker"  Qwen2_5OmniThinkerForConditionalGeneration: <module> relative to the Thinker;
  "talker"   Qwen2_5OmniTalkerForConditionalGeneration: relative to the Talker;
  "full"     Qwen2_5OmniForConditionalGeneration: thinker.<module>, talker.<module>, token2wav.<module>.
The default follows omni_jax.convert.hf.save: a model without a Talker exports (and is exported as) a Thinker,
one with a Talker as the full model. A tower layout of a model with more towers writes that tower's adapters only.

<module> is the name of the module in transformers 5 (what PEFT writes under transformers 5, and the only names
it loads onto the full model): the checkpoint key of the Linear's weight (hf.disk_keys, our one name table)
without ".weight", with transformers 5's renames of the Thinker's submodules (_RENAMES). Imports accept both
these names and the checkpoint names that PEFT writes under transformers 4 (model.layers.N..., audio_tower...).

target_modules: PEFT's short names ("q_proj") when they select exactly the adapted modules of the model, else
one regular expression over the module names (e.g. when "q_proj" would also hit the audio encoder's, or when
transformers builds parts we do not: a default audio / vision encoder, Token2Wav in the full model). Imports
go by the weights' keys, not by target_modules, and give config.lora.targets that select exactly those modules.
"""

import json
import logging
import math
import os
import re
from typing import Mapping, Optional

import jax
import ml_collections
import numpy as np
from flax import nnx, traverse_util
from safetensors import numpy as st_numpy
from safetensors import safe_open

from omni_jax.convert import hf
from omni_jax.convert.rules import CheckpointMismatch, transpose

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix of every key: PeftModel.base_model (LoraModel).model
LAYOUTS = ("thinker", "talker", "full")
TOWERS = ("thinker", "talker", "token2wav")

# transformers 5 builds the Thinker's decoder, audio and vision encoders under `model.` (checkpoint key ->
# module name; its conversion_mapping for qwen2_5_omni_thinker). Other towers keep their checkpoint names.
_RENAMES = {"thinker": (("model.", "model.language_model."), ("audio_tower.", "model.audio_tower."),
                        ("visual.", "model.visual."))}


class PeftError(CheckpointMismatch):
  """A PEFT adapter directory that we cannot read or write; the message names the file and key."""


# --------------------------------------------------------------------------------------- names


def _module_name(tower: str, disk: str) -> str:
  """transformers 5's module name of a checkpoint module name (both relative to `tower`)."""
  for old, new in _RENAMES.get(tower, ()):
    if disk.startswith(old):
      return new + disk[len(old):]
  return disk


def _disk_name(tower: str, module: str) -> str:
  """The checkpoint module name of a transformers 5 module name, or of one already in checkpoint form."""
  for old, new in _RENAMES.get(tower, ()):
    if module.startswith(new):
      return old + module[len(new):]
  return module


def _hf_modules(path: str, layers: int) -> list[str]:
  """Checkpoint module names (with the tower prefix) of our Linear at dotted `path`, one per layer if stacked;
  PeftError when its counterpart in transformers is no plain Linear (e.g. the vision Conv3d patch embedding)."""
  try:
    keys, rule = hf.disk_keys(path + ".kernel", layers)
  except CheckpointMismatch as e:
    raise PeftError(f"{path}: no transformers counterpart ({e})") from None
  if rule.to_disk is not transpose or rule.disk_shape is not None or not all(k.endswith(".weight") for k in keys):
    raise PeftError(f"{path}: its transformers counterpart {keys[0]} is not a Linear; PEFT LoRA on it is not "
                    f"supported here (leave it out of config.lora.targets)")
  return [k[:-len(".weight")] for k in keys]


def _layout_name(layout: str, disk: str) -> str:
  """PEFT's module name (no prefix) in `layout` of a checkpoint module name with its tower prefix."""
  tower, rel = disk.split(".", 1)
  name = _module_name(tower, rel)
  return name if layout == tower else f"{tower}.{name}"


def default_layout(config: ml_collections.ConfigDict) -> str:
  """The layout of the HF export of this model (hf.save): "thinker" without a Talker, else "full"."""
  return "thinker" if config.model.get("talker") is None else "full"


class _Model:
  """What the name mapping needs of our model: its Linears (dotted path -> kernel shape) and the checkpoint
  module names of all its parameters, built from the config without memory (nnx.eval_shape). A tower layout
  builds that tower (and the Thinker, whose config the others read) only: Token2Wav's is slow to trace."""

  def __init__(self, config: ml_collections.ConfigDict, layout: str = "full"):
    from omni_jax import adapters, towers  # pylint: disable=import-outside-toplevel
    from omni_jax.layers.linear import Linear  # pylint: disable=import-outside-toplevel
    from omni_jax.models import omni  # pylint: disable=import-outside-toplevel

    base = adapters.without_lora(config) if adapters.is_lora(config) else config
    for tower in towers.built(base) if layout != "full" else ():
      if tower.name not in (layout, "thinker"):
        base = towers.without(base, tower.name)
    model = nnx.eval_shape(lambda: omni.OmniModel(base, rngs=nnx.Rngs(0)))
    self.linears = {".".join(str(p) for p in path): tuple(node.kernel.shape)
                    for path, node in nnx.iter_graph(model) if isinstance(node, Linear)}
    self.modules = set()  # every checkpoint module name (tower prefix kept): what a short name may also hit
    for path, var in nnx.to_flat_state(nnx.state(model)):
      dotted = ".".join(str(p) for p in path)
      stacked = hf._split_stacked(dotted)[0] is not None  # pylint: disable=protected-access
      keys, _ = hf.disk_keys(dotted, var.get_value().shape[0] if stacked else 0)
      self.modules.update(k.rsplit(".", 1)[0] for k in keys)

  def layers(self, path: str) -> int:
    """Layers of a stacked Linear, 0 for a single one."""
    return self.linears[path][0] if hf._split_stacked(path)[0] is not None else 0  # pylint: disable=protected-access


# --------------------------------------------------------------------------------------- export


def _lora_settings(out_dir: str, config: ml_collections.ConfigDict):
  from omni_jax.layers import lora  # pylint: disable=import-outside-toplevel

  cfg = lora.LoraConfig.from_config(config)
  if cfg is None:
    raise PeftError(f"{out_dir}: the config has no `lora` section: there are no adapters to export")
  return cfg


def _complete(config: ml_collections.ConfigDict, layout: str) -> bool:
  """Whether our model builds every part of the transformers class of `layout`: transformers builds a default
  audio and vision encoder (and Token2Wav in the full model) when the config has none, whose modules a short
  target name could also hit."""
  thinker = config.model.thinker
  encoders = thinker.get("audio") is not None and thinker.get("vision") is not None
  if layout == "talker":
    return True
  if layout == "thinker":
    return encoders
  return encoders and config.model.get("talker") is not None and config.model.get("token2wav") is not None


def _either(options) -> str:
  options = sorted(set(options))
  return options[0] if len(options) == 1 else "(" + "|".join(options) + ")"


def _target_modules(chosen: set[str], universe: Optional[set[str]], layout: str,
                    stacked: Mapping[str, tuple[str, str]]):
  """PEFT target_modules selecting exactly `chosen` (checkpoint module names): the short names when they select
  nothing else in `universe` (all module names of the model, None: not all known), else one regular expression,
  e.g. model\\.language_model\\.layers\\.\\d+\\.(mlp\\.up_proj|self_attn\\.q_proj)|lm_head (`stacked`: module of
  a stack -> (its stack's module name, its name inside a layer))."""
  short = {m.rsplit(".", 1)[-1] for m in chosen}
  hits = None if universe is None else {m for m in universe if m.rsplit(".", 1)[-1] in short}
  if hits == chosen and all(s.isidentifier() for s in short):
    return sorted(short)
  stacks: dict[str, set[str]] = {}
  for m in chosen:
    if m in stacked:
      stacks.setdefault(stacked[m][0], set()).add(re.escape(stacked[m][1]))
  single = [re.escape(_layout_name(layout, m)) for m in chosen if m not in stacked]
  return _either([re.escape(head) + r"\.\d+\." + _either(tails) for head, tails in stacks.items()] + single)


def export_adapter(out_dir: str, params: Mapping, config: ml_collections.ConfigDict, *,
                   layout: Optional[str] = None, base_model: Optional[str] = None, dtype=np.float32) -> dict:
  """Write the adapters in `params` (a nested dict holding <Linear path>.lora.a / .b, e.g. a LoRA checkpoint's
  adapters or the whole adapted model) as a PEFT adapter directory; returns its adapter_config.

  config: the LoRA run's config (config.lora: rank, alpha, dropout, rslora). layout: see the module docstring
  (default: default_layout). base_model: adapter_config's base_model_name_or_path (an HF model id or directory).
  """
  cfg = _lora_settings(out_dir, config)
  layout = layout or default_layout(config)
  if layout not in LAYOUTS:
    raise ValueError(f"layout {layout!r}: choose one of {LAYOUTS}")
  flat = {".".join(map(str, k)): v for k, v in traverse_util.flatten_dict(dict(params)).items()}
  paths = sorted(k[:-len(".lora.a")] for k in flat if k.endswith(".lora.a"))
  adapted = sorted({p.split(".", 1)[0] for p in paths})
  if layout != "full":
    left = [t for t in adapted if t != layout]
    if left:
      log.warning("%s: the %s layout holds the %s's adapters only; those of the %s are not written", out_dir,
                  layout, layout, ", ".join(left))
    paths = [p for p in paths if p.split(".", 1)[0] == layout]
  if not paths:
    raise PeftError(f"{out_dir}: no adapters to write for the {layout} layout (adapted towers: {adapted or 'none'})")
  model = _Model(config, layout)
  tensors, chosen, stacked = {}, set(), {}
  for path in paths:
    a, b = np.asarray(flat[path + ".lora.a"], np.float32), np.asarray(flat[path + ".lora.b"], np.float32)
    if a.shape[-1] != cfg.rank or b.shape[-2] != cfg.rank:
      raise PeftError(f"{path}.lora: rank {a.shape[-1]} (a {a.shape}, b {b.shape}) but config.lora.rank is "
                      f"{cfg.rank}")
    prefix, _ = hf._split_stacked(path)  # pylint: disable=protected-access
    modules = _hf_modules(path, a.shape[0] if prefix is not None else 0)
    for i, m in enumerate(modules):
      name = PREFIX + _layout_name(layout, m)
      tensors[name + ".lora_A.weight"] = np.ascontiguousarray((a if prefix is None else a[i]).T.astype(dtype))
      tensors[name + ".lora_B.weight"] = np.ascontiguousarray((b if prefix is None else b[i]).T.astype(dtype))
      chosen.add(m)
    if prefix is not None:  # (the stack's module name, the module's name inside a layer), for target_modules
      head = _layout_name(layout, prefix + ".0")[:-len(".0")]
      stacked.update({m: (head, modules[0][len(prefix) + len(".0."):]) for m in modules})
  universe = ({m for m in model.modules if layout == "full" or m.split(".", 1)[0] == layout}
              if _complete(config, layout) else None)
  adapter_config = {
      "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "revision": None,
      "inference_mode": True, "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
      "use_rslora": bool(cfg.rslora), "target_modules": _target_modules(chosen, universe, layout, stacked),
      "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
      "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
      "use_dora": False, "lora_bias": False,
  }
  os.makedirs(out_dir, exist_ok=True)
  st_numpy.save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(adapter_config, f, indent=2)
  return adapter_config


# --------------------------------------------------------------------------------------- import

# adapter_config keys whose non-empty / true values change what the weights mean: we refuse them.
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)", "lora_bias": "LoRA biases", "fan_in_fan_out": "Conv1D layout",
    "modules_to_save": "fully trained module copies", "target_parameters": "adapters on bare parameters",
    "layer_replication": "layer replication", "trainable_token_indices": "trainable tokens",
    "use_qalora": "QA-LoRA", "alora_invocation_tokens": "activated LoRA", "megatron_config": "Megatron layers",
}
# init_lora_weights values that also rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ): such an adapter
# only fits its own modified base unless PEFT converted it when saving (which resets this to true).
_BASE_CHANGING = ("pissa", "olora", "corda", "loftq")


def read_config(peft_dir: str) -> dict:
  path = os.path.join(peft_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing (expected a PEFT adapter directory)")
  try:
    with open(path) as f:
      out = json.load(f)
  except ValueError as e:
    raise PeftError(f"{path}: not JSON ({e})") from None
  if not isinstance(out, dict):
    raise PeftError(f"{path}: not a JSON object")
  return out


def _check_config(path: str, c: dict) -> None:
  if c.get("peft_type") != "LORA":
    raise PeftError(f"{path}: peft_type is {c.get('peft_type')!r}; only LORA adapters import")
  for key, what in _UNSUPPORTED.items():
    if c.get(key):
      raise PeftError(f"{path}: {key}={c[key]!r} ({what}) is not supported")
  if c.get("bias", "none") != "none":
    raise PeftError(f"{path}: bias={c['bias']!r} (the adapter trains and stores biases) is not supported; "
                    f"only bias='none'")
  init = c.get("init_lora_weights", True)
  if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING):
    raise PeftError(f"{path}: init_lora_weights={init!r} also changed the base weights; save the adapter with "
                    f"PEFT's path_initial_model_for_weight_conversion to get a plain LoRA adapter")
  for key in ("r", "lora_alpha"):
    if not isinstance(c.get(key), (int, float)) or c[key] <= 0:
      raise PeftError(f"{path}: {key}={c.get(key)!r}; expected a number > 0")


def _read_weights(peft_dir: str) -> dict[str, np.ndarray]:
  path = os.path.join(peft_dir, WEIGHTS_FILE)
  if not os.path.isfile(path):
    other = [n for n in ("adapter_model.bin", "adapter_model.pt") if os.path.isfile(os.path.join(peft_dir, n))]
    if other:
      raise PeftError(f"{os.path.join(peft_dir, other[0])}: a pickled adapter; only {WEIGHTS_FILE} is read (save "
                      f"it again with PEFT's save_pretrained(safe_serialization=True))")
    raise FileNotFoundError(f"{path}: missing (expected a PEFT adapter directory)")
  try:
    with safe_open(path, framework="numpy") as h:
      return {k: h.get_tensor(k) for k in h.keys()}
  except Exception as e:  # noqa: BLE001 - safetensors raises its own error types (also for bf16: numpy has none)
    try:
      return _read_raw(path)
    except Exception:  # noqa: BLE001 - the first error says more
      raise PeftError(f"{path}: not a readable safetensors file ({e})") from None


def _read_raw(path: str) -> dict[str, np.ndarray]:
  """The float tensors of a safetensors file, bfloat16 included (read by the header's offsets), as float32."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel

  kinds = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
    data = f.read()
  out = {}
  for k, v in header.items():
    if k != "__metadata__":
      start, end = v["data_offsets"]
      out[k] = np.frombuffer(data[start:end], kinds[v["dtype"]]).reshape(v["shape"]).astype(np.float32)
  return out


def _pattern_value(patterns: Mapping, module: str, default):
  """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key that matches
  the end of the module name at a dot boundary."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def _layout_of(keys: list[str], layout: Optional[str], path: str) -> str:
  full = [k for k in keys if k.split(".", 1)[0] in TOWERS]
  if layout is None:
    layout = "full" if full and len(full) == len(keys) else "thinker"
  if layout not in LAYOUTS:
    raise ValueError(f"layout {layout!r}: choose one of {LAYOUTS}")
  if layout != "full" and full and len(full) == len(keys):
    raise PeftError(f"{path}: its modules are named after the full model ({full[0]}); import it with "
                    f"layout='full'")
  return layout


def _short_or_full(chosen: set[str], linears: list[str]) -> list[str]:
  """Patterns (config.lora.targets, relative to the tower) selecting exactly `chosen` among the tower's
  Linears: a module's last name where all Linears of that name are chosen, else its escaped dotted path."""
  out = set()
  for path in chosen:
    last = path.rsplit(".", 1)[-1]
    same = {p for p in linears if p.rsplit(".", 1)[-1] == last}
    out.add(last if same <= chosen and last.isidentifier() else re.escape(path))
  return sorted(out)


def import_adapter(peft_dir: str, config: ml_collections.ConfigDict, *,
                   layout: Optional[str] = None) -> tuple[dict, ml_collections.ConfigDict]:
  """(adapter parameters, config.lora) of a PEFT LoRA adapter directory for the model `config` describes.

  The parameters are a nested dict of float32 arrays, <Linear path>.lora.a / .b as the adapted model holds them.
  config.lora: targets (per tower, matching exactly the adapted Linears), rank, alpha, dropout, rslora; set it on
  the config (with its base_dtype) to build the adapted model. layout: "thinker" (default unless every module
  is named thinker./talker./token2wav.: then "full"), "talker" or "full".

  Modules of a stack that the adapter leaves out (PEFT's layers_to_transform) get zero adapters. Per-module
  ranks and alphas (rank_pattern / alpha_pattern) become one rank (the largest, smaller ones padded with zeros)
  and one alpha, each module's own scale folded into its b. A module our model does not have, or a key that is
  no plain LoRA pair (DoRA magnitudes, embedding adapters, biases), is a PeftError naming the file and key.
  """
  config_path, weights_path = os.path.join(peft_dir, CONFIG_FILE), os.path.join(peft_dir, WEIGHTS_FILE)
  c = read_config(peft_dir)
  _check_config(config_path, c)
  weights = _read_weights(peft_dir)
  pairs: dict[str, dict[str, np.ndarray]] = {}
  for key, value in weights.items():
    if not key.startswith(PREFIX):
      raise PeftError(f"{weights_path}: key {key!r} does not start with {PREFIX!r} (not a LoRA adapter of a "
                      f"transformers model)")
    name = key[len(PREFIX):]
    m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", name)
    if m is None:
      if name.endswith("base_layer.weight"):  # PEFT's save_embedding_layers: a copy of a base weight
        log.warning("%s: %s is a copy of a base weight (PEFT saves embedding layers it adapted); ignored, the "
                    "base checkpoint's is used", weights_path, key)
        continue
      what = ("a DoRA magnitude" if "lora_magnitude_vector" in name else
              "an embedding adapter" if "lora_embedding_" in name else "no LoRA weight pair")
      raise PeftError(f"{weights_path}: {key!r} is {what}; only lora_A / lora_B weights of Linear modules import")
    if np.ndim(value) != 2:
      raise PeftError(f"{weights_path}: {key!r} has shape {np.shape(value)}; a Linear's LoRA weight is 2-D")
    pairs.setdefault(m.group(1), {})[m.group(2)] = value
  if not pairs:
    raise PeftError(f"{weights_path}: no lora_A / lora_B weights")
  layout = _layout_of(sorted(pairs), layout, weights_path)
  model = _Model(config, layout)
  # checkpoint module name (tower prefix) -> (our Linear path, layer index or None)
  where = {}
  for path in model.linears:
    try:
      modules = _hf_modules(path, model.layers(path))
    except PeftError:
      continue  # not a plain Linear in transformers: no PEFT LoRA maps onto it
    for i, m in enumerate(modules):
      where[m] = (path, i if hf._split_stacked(path)[0] is not None else None)  # pylint: disable=protected-access
  found = {}
  for name, pair in pairs.items():
    if set(pair) != {"lora_A", "lora_B"}:
      raise PeftError(f"{weights_path}: {PREFIX}{name} has {sorted(pair)} but not both lora_A and lora_B")
    tower, rel = (name.split(".", 1) if layout == "full" else (layout, name))
    disk = f"{tower}.{_disk_name(tower, rel)}"
    if disk not in where:
      hint = " (a Talker adapter? import it with layout='talker')" if layout == "thinker" else ""
      raise PeftError(f"{weights_path}: {PREFIX}{name}.lora_A.weight: the {tower if tower in TOWERS else 'model'} "
                      f"of this config has no Linear module {rel!r} (checkpoint name {disk}){hint}")
    if where[disk] in found:
      raise PeftError(f"{weights_path}: {PREFIX}{name} and {PREFIX}{found[where[disk]][0]} name the same module")
    found[where[disk]] = (name, pair)
  ranks = {k: int(v[1]["lora_A"].shape[0]) for k, v in found.items()}
  rank = max(ranks.values())
  alpha, rslora = float(c["lora_alpha"]), bool(c.get("use_rslora", False))
  scale = lambda r, a: a / (math.sqrt(r) if rslora else r)  # noqa: E731 - PEFT's LoraLayer.scaling
  out = {}
  for (path, layer), (name, pair) in sorted(found.items(), key=lambda x: (x[0][0], x[0][1] or 0)):
    shape = model.linears[path]
    d_in, d_out = shape[-2], shape[-1]
    lora_a, lora_b = np.asarray(pair["lora_A"], np.float32), np.asarray(pair["lora_B"], np.float32)
    r = ranks[(path, layer)]
    if lora_a.shape != (r, d_in) or lora_b.shape != (d_out, r):
      raise PeftError(f"{weights_path}: {PREFIX}{name}: lora_A {lora_a.shape} / lora_B {lora_b.shape}, expected "
                      f"({r}, {d_in}) / ({d_out}, {r}) for our {path} (kernel {shape})")
    a = np.zeros((d_in, rank), np.float32)
    b = np.zeros((rank, d_out), np.float32)
    a[:, :r], b[:r] = lora_a.T, lora_b.T
    ratio = scale(r, float(_pattern_value(c.get("alpha_pattern"), name, alpha))) / scale(rank, alpha)
    if ratio != 1.0:  # this module's own scale, folded into b so that one scale serves all
      b *= ratio
    if layer is None:
      out[path] = (a, b)
      continue
    if path not in out:
      out[path] = (np.zeros(shape[:1] + a.shape, np.float32), np.zeros(shape[:1] + b.shape, np.float32))
    out[path][0][layer], out[path][1][layer] = a, b
  params = traverse_util.unflatten_dict({tuple(p.split(".")) + ("lora", ab): v for p, (a, b) in out.items()
                                         for ab, v in (("a", a), ("b", b))})
  missing = {p: model.layers(p) - sum(q == p for q, _ in found) for p in out if model.layers(p)}
  missing = {p: n for p, n in missing.items() if n}
  if missing:
    log.info("%s: layers without adapters (zeros): %s", weights_path,
             ", ".join(f"{p} ({n})" for p, n in sorted(missing.items())))
  targets = {}
  for tower in sorted({p.split(".", 1)[0] for p in out}):
    inside = [p.split(".", 1)[1] for p in model.linears if p.split(".", 1)[0] == tower]
    chosen = {p.split(".", 1)[1] for p in out if p.split(".", 1)[0] == tower}
    targets[tower] = _short_or_full(chosen, inside)
  lora_config = ml_collections.ConfigDict(dict(targets=targets, rank=rank, alpha=alpha,
                                               dropout=float(c.get("lora_dropout") or 0.0), rslora=rslora))
  return params, lora_config


def is_adapter_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(os.path.expanduser(path), CONFIG_FILE))


def merged(peft_dir: str, config: ml_collections.ConfigDict, base: dict) -> dict:
  """The parameters of the model `config` describes (`base`, a nested dict) with a PEFT adapter folded in."""
  from omni_jax.layers import lora  # pylint: disable=import-outside-toplevel

  params, lora_config = import_adapter(peft_dir, config)
  adapted = config.copy_and_resolve_references()
  with adapted.unlocked():
    adapted.lora = lora_config
  both = {**traverse_util.flatten_dict(base), **traverse_util.flatten_dict(params)}
  both = {k: np.asarray(v) for k, v in both.items()}
  log.info("%s: adapter merged into the model", peft_dir)
  return jax.tree.map(np.asarray, lora.merge(traverse_util.unflatten_dict(both), lora.LoraConfig.from_config(adapted)))

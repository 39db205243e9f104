"""The speaker table: transformers' spk_dict.pt <-> config.model.talker.speakers + speakers.safetensors.

spk_dict.pt maps a voice name to {"bos_token": Thinker-vocabulary id opening the Talker's text track, "cond":
the speaker vector Token2Wav conditions on, "ref_mel": its reference mel}. It is a torch pickle, read without
torch by omni_jax.convert.torch_pickle, a restricted unpickler that builds arrays and plain containers only and
runs no pickled code (as torch.load(weights_only=True), the call transformers makes): converting or loading a
released checkpoint needs no torch. Writing spk_dict.pt (export) imports torch, optionally: the export is for
transformers, which runs on torch.

In our checkpoint the bos ids live in the config (config.model.talker.speakers, what generation needs) and
the tensors in speakers.safetensors beside params/ (keys "<name>.cond", "<name>.ref_mel", dtypes kept), which
Token2Wav will read. Export writes spk_dict.pt back from both, so an HF -> orbax -> HF round trip is
bit-exact (same names, bos ids, tensor dtypes and values).
"""

import logging
import os
from typing import Optional

import ml_collections
import ml_dtypes
import numpy as np

from omni_jax.convert import torch_pickle

log = logging.getLogger(__name__)

SPK_FILE = "spk_dict.pt"
TENSORS_FILE = "speakers.safetensors"
_TENSORS = ("cond", "ref_mel")


class SpeakerTableError(ValueError):
  """spk_dict.pt / speakers.safetensors do not hold a speaker table; the message names the file and entry."""


def read_spk_dict(path: str) -> dict:
  """{name: {"bos_token": int, "cond": np.ndarray, "ref_mel": np.ndarray}} from a spk_dict.pt file (the
  tensors' dtypes kept: float32, bfloat16 as ml_dtypes.bfloat16, float16)."""
  try:
    table = torch_pickle.load(path)
  except Exception as e:  # noqa: BLE001 - the unpickler refuses code; a damaged file raises its own errors
    raise SpeakerTableError(f"{path}: not a loadable speaker table ({type(e).__name__}: {e})") from None
  if not isinstance(table, dict) or not table:
    raise SpeakerTableError(f"{path}: expected a non-empty {{name: {{bos_token, cond, ref_mel}}}} dict")
  out = {}
  for name, entry in table.items():
    if not isinstance(entry, dict) or "bos_token" not in entry:
      raise SpeakerTableError(f"{path}: speaker {name!r} has no bos_token")
    bos = entry["bos_token"]
    bos = int(bos.item()) if hasattr(bos, "item") else int(bos)
    tensors = {k: entry[k] for k in _TENSORS if k in entry}
    for k, v in tensors.items():
      if not isinstance(v, np.ndarray):
        raise SpeakerTableError(f"{path}: speaker {name!r}: {k} is a {type(v).__name__}, expected a tensor")
    out[str(name)] = dict(bos_token=bos, **tensors)
  return out


def write_spk_dict(path: str, table: dict) -> None:
  """A spk_dict.pt for transformers: the table's arrays as torch tensors of the same dtypes (torch needed)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise SpeakerTableError(f"writing {SPK_FILE} (a torch pickle, for transformers) needs torch: pip install "
                            "torch") from None

  def tensor(a: np.ndarray):
    if a.dtype == ml_dtypes.bfloat16:  # torch.from_numpy knows no bfloat16: through its bits
      return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))

  torch.save({name: {k: tensor(v) if isinstance(v, np.ndarray) else v for k, v in entry.items()}
              for name, entry in table.items()}, path)


def adopt(config: ml_collections.ConfigDict, table: dict) -> None:
  """config.model.talker.speakers (in place) from a table; the default speaker stays when the table has it
  (transformers' default is "Chelsie"), else the table's first name."""
  talker = config.model.talker
  talker.speakers = ml_collections.ConfigDict({name: int(e["bos_token"]) for name, e in table.items()})
  if talker.get("default_speaker") not in table:
    talker.default_speaker = sorted(table)[0]


def save_tensors(directory: str, table: dict) -> Optional[str]:
  """cond / ref_mel of each speaker into directory/speakers.safetensors (None when the table has none)."""
  from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel

  tensors = {f"{name}.{k}": np.ascontiguousarray(e[k]) for name, e in table.items() for k in _TENSORS if k in e}
  if not tensors:
    return None
  path = os.path.join(directory, TENSORS_FILE)
  st_numpy.save_file(tensors, path, metadata={"speakers": ",".join(sorted(table))})
  return path


def tensors_file(params_path: str) -> Optional[str]:
  """speakers.safetensors stored with a checkpoint (beside params/ or beside its config.json, or in the
  workdir of a training step: where `python -m omni_jax.token2wav.new_voice voices` writes it), if any."""
  from omni_jax import checkpoint  # pylint: disable=import-outside-toplevel

  places = [params_path, checkpoint.find_config(params_path)]
  if os.path.basename(os.path.dirname(params_path)) == "checkpoints":
    places.append(os.path.dirname(os.path.dirname(params_path)))
  for d in places:
    if d is not None and os.path.isfile(os.path.join(d, TENSORS_FILE)):
      return os.path.join(d, TENSORS_FILE)
  return None


def table_of(config: ml_collections.ConfigDict, tensors_path: Optional[str]) -> dict:
  """The speaker table of a checkpoint: bos ids from the config, cond / ref_mel from speakers.safetensors."""
  from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel

  tensors = st_numpy.load_file(tensors_path) if tensors_path else {}
  table = {}
  for name, bos in dict(config.model.talker.speakers).items():
    entry = {"bos_token": int(bos)}
    entry.update({k: tensors[f"{name}.{k}"] for k in _TENSORS if f"{name}.{k}" in tensors})
    table[name] = entry
  return table


def import_from(hf_dir: str, config: ml_collections.ConfigDict, out_dir: Optional[str] = None) -> Optional[dict]:
  """HF -> ours: read hf_dir/spk_dict.pt (if any) into the config, and its tensors into out_dir."""
  path = os.path.join(hf_dir, SPK_FILE)
  if config.model.get("talker") is None or not os.path.isfile(path):
    if config.model.get("talker") is not None:
      log.warning("%s: no %s; the Talker keeps the config's speakers %s", hf_dir, SPK_FILE,
                  dict(config.model.talker.speakers))
    return None
  table = read_spk_dict(path)
  adopt(config, table)
  if out_dir is not None:
    save_tensors(out_dir, table)
  log.info("%s: speakers %s", path, {n: e["bos_token"] for n, e in table.items()})
  return table


def export_to(out_dir: str, config: ml_collections.ConfigDict, tensors_path: Optional[str]) -> None:
  """ours -> HF: out_dir/spk_dict.pt, which transformers' Qwen2_5OmniForConditionalGeneration.from_pretrained
  requires. A speaker without cond / ref_mel (none were imported, e.g. a model trained from scratch) is
  written with its bos id only: transformers loads it and its Talker runs, but Token2Wav cannot voice it."""
  table = table_of(config, tensors_path)
  bare = [n for n, e in table.items() if not all(k in e for k in _TENSORS)]
  if bare:
    log.warning("speakers %s have no cond / ref_mel (%s): written to %s with their bos id only; transformers' "
                "Token2Wav cannot voice them", bare, tensors_path or f"no {TENSORS_FILE}", SPK_FILE)
  write_spk_dict(os.path.join(out_dir, SPK_FILE), table)

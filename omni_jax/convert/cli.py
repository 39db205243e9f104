"""Convert between a transformers Qwen2.5-Omni checkpoint directory and an omni_jax orbax checkpoint.

  # HF -> orbax (train.py --config.init_from=OUT and eval.py --checkpoint OUT restore it); the tokenizer,
  # processor and generation files of the source are carried along in OUT/hf_assets/
  python -m omni_jax.convert --hf_dir /path/to/Qwen2.5-Omni-7B --out_dir ckpt/omni7b
  # orbax -> HF (transformers' Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained reads it and its
  # generate stops at the eos ids; with a Talker: Qwen2_5OmniForConditionalGeneration, spk_dict.pt written);
  # --orbax_dir: a converter output, a training step directory (WORKDIR/checkpoints/N) or a training workdir
  python -m omni_jax.convert --orbax_dir ckpt/omni7b --out_dir hf/omni7b_thinker --dtype bfloat16
  # a LoRA run (config.lora): its adapters merged into its base (the checkpoint the run recorded, or --base),
  # exported as above; or the adapters alone as a PEFT adapter directory (omni_jax.convert.peft: loads with
  # peft.PeftModel.from_pretrained onto the HF export of the base; --peft_layout thinker|talker|full)
  python -m omni_jax.convert --orbax_dir workdirs/lora --out_dir hf/omni7b_lora_merged
  python -m omni_jax.convert --orbax_dir workdirs/lora --peft_out hf/omni7b_lora_adapter
"""

import argparse
import logging
import os
from typing import Optional

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from omni_jax import adapters
from omni_jax import checkpoint
from omni_jax import cli
from omni_jax.convert import export
from omni_jax.convert import hf
from omni_jax.convert import peft
from omni_jax.convert import speakers
from omni_jax.layers import lora
from omni_jax.models import omni

log = logging.getLogger(__name__)

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def hf_to_orbax(hf_dir: str, out_dir: str) -> None:
  hf_config = hf.read_config(hf_dir)
  config = hf.config_from_hf(hf_config)
  generation = export.read_generation(hf_dir)
  if generation is not None:
    export.adopt_generation(config, generation)
  os.makedirs(out_dir, exist_ok=True)
  speakers.import_from(hf_dir, config, out_dir)  # bos ids into the config, cond / ref_mel beside params/
  _, abstract = omni.abstract_model(config)
  state = hf.load_state(hf_dir, abstract, hf_config=hf_config)
  checkpoint.save_params(out_dir, state, config)
  export.store_assets(hf_dir, out_dir, hf_config)
  n = sum(np.size(v) for v in jax.tree.leaves(state))
  print(f"wrote {out_dir} ({n / 1e6:.1f} M parameters)")


def _checkpoint(orbax_dir: str):
  """(params path, its config) of a converter output, step directory or workdir (its latest step)."""
  path = checkpoint.params_dir(orbax_dir)
  where = checkpoint.find_config(path)
  if where is None:
    raise FileNotFoundError(f"{orbax_dir}: no config.json beside {path} or in its training workdir")
  if path != os.path.abspath(orbax_dir):
    log.info("%s: exporting the checkpoint %s", orbax_dir, path)
  return path, checkpoint.load_config(where)


def orbax_to_hf(orbax_dir: str, out_dir: str, dtype: str, base: Optional[str] = None) -> None:
  path, config = _checkpoint(orbax_dir)
  files = path  # where the tokenizer files and voices come from: the checkpoint, else a LoRA run's base
  if adapters.is_lora(config):  # adapters only: merged into their base (its fingerprint checked)
    base = base or lora.LoraConfig.from_config(config).base_path or config.get("init_from")
    config, merged = adapters.restore_merged(path, config, base=base)
    if base and export.assets_of(path) is None:
      files = checkpoint.params_dir(base)
    config = export.complete_token_ids(config)
    _, state = omni.abstract_model(config)
    nnx.replace_by_pure_dict(state, merged)
  else:
    config = export.complete_token_ids(config)
    _, abstract = omni.abstract_model(config)
    state = checkpoint.restore_params(path, abstract)
  assets = export.assets_of(files)
  talker = config.model.get("talker") is not None
  hf.save(out_dir, config, state, dtype=_DTYPES[dtype], torch_dtype=dtype,
          generation=export.read_generation(assets), token2wav=export.read_token2wav(assets) if talker else None)
  if talker:  # written from the config's bos ids and the stored tensors (the carried copy may be stale)
    speakers.export_to(out_dir, config, speakers.tensors_file(path) or speakers.tensors_file(files))
  skip = (export.GENERATION_FILE, speakers.SPK_FILE) if talker else (export.GENERATION_FILE,)
  copied = export.copy_assets(assets, out_dir, skip=skip) if assets else []
  if copied:
    log.info("copied %s from %s", ", ".join(copied), assets)
  else:
    log.warning("%s: no tokenizer or processor files came with this checkpoint (a training workdir keeps none); "
                "%s holds the weights, config.json and generation_config.json only: copy the tokenizer files "
                "of the source model into it", orbax_dir, out_dir)
  print(f"wrote {out_dir}")


def orbax_to_peft(orbax_dir: str, out_dir: str, dtype: str, layout: Optional[str] = None,
                  base_model: Optional[str] = None) -> None:
  """The adapters of a LoRA checkpoint as a PEFT adapter directory (omni_jax.convert.peft)."""
  path, config = _checkpoint(orbax_dir)
  if not adapters.is_lora(config):
    raise peft.PeftError(f"{orbax_dir}: not a LoRA checkpoint (its config has no `lora` section): no adapters "
                         f"to write; export the model with --out_dir")
  written = peft.export_adapter(out_dir, adapters.restore_adapters(path, config), config, layout=layout,
                                base_model=base_model, dtype=_DTYPES[dtype])
  print(f"wrote {out_dir} (rank {written['r']}, target_modules {written['target_modules']})")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--hf_dir", help="transformers checkpoint directory (config.json + *.safetensors)")
  src.add_argument("--orbax_dir", help="omni_jax checkpoint: a converter output, a training step directory "
                                       "(WORKDIR/checkpoints/N) or a training workdir (its latest step)")
  p.add_argument("--out_dir", help="where to write the converted checkpoint")
  p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="tensor dtype when writing HF")
  p.add_argument("--base", help="LoRA checkpoints: the base checkpoint to merge into (default: the one the run "
                                "recorded in config.lora.base_path)")
  p.add_argument("--peft_out", help="LoRA checkpoints: write the adapters as a PEFT adapter directory here "
                                    "instead of a merged checkpoint")
  p.add_argument("--peft_layout", choices=peft.LAYOUTS, help="with --peft_out: the transformers class the "
                 "adapter loads onto (thinker, talker, full; default: the HF export's: thinker without a Talker)")
  p.add_argument("--peft_base", help="with --peft_out: adapter_config.json's base_model_name_or_path (an HF "
                                     "model id or directory)")
  args = p.parse_args(argv)
  if (args.out_dir is None) == (args.peft_out is None) or (args.peft_out and args.hf_dir):
    p.error("give --out_dir, or --orbax_dir with --peft_out")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  with cli.user_errors():  # a missing, truncated or mismatched input: one line, exit status 2
    if args.hf_dir:
      hf_to_orbax(args.hf_dir, args.out_dir)
    elif args.peft_out:
      orbax_to_peft(args.orbax_dir, args.peft_out, args.dtype, args.peft_layout, args.peft_base)
    else:
      orbax_to_hf(args.orbax_dir, args.out_dir, args.dtype, args.base)

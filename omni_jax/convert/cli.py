"""Convert between a transformers Qwen2.5-Omni checkpoint directory and an omni_jax orbax checkpoint.

  # HF -> orbax (train.py --config.init_from=OUT and eval.py --checkpoint OUT restore it); the tokenizer,
  # processor and generation files of the source are carried along in OUT/hf_assets/
  python -m omni_jax.convert --hf_dir /path/to/Qwen2.5-Omni-7B --out_dir ckpt/omni7b
  # orbax -> HF (transformers' Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained reads it and its
  # generate stops at the eos ids; with a Talker: Qwen2_5OmniForConditionalGeneration, spk_dict.pt written);
  # --orbax_dir: a converter output, a training step directory (WORKDIR/checkpoints/N) or a training workdir
  python -m omni_jax.convert --orbax_dir ckpt/omni7b --out_dir hf/omni7b_thinker --dtype bfloat16
"""

import argparse
import logging
import os

import jax
import ml_dtypes
import numpy as np

from omni_jax import checkpoint
from omni_jax import cli
from omni_jax.convert import export
from omni_jax.convert import hf
from omni_jax.convert import speakers
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


def orbax_to_hf(orbax_dir: str, out_dir: str, dtype: str) -> None:
  path = checkpoint.params_dir(orbax_dir)  # a converter output, a step directory, or a workdir's latest step
  where = checkpoint.find_config(path)
  if where is None:
    raise FileNotFoundError(f"{orbax_dir}: no config.json beside {path} or in its training workdir")
  if path != os.path.abspath(orbax_dir):
    log.info("%s: exporting the checkpoint %s", orbax_dir, path)
  config = export.complete_token_ids(checkpoint.load_config(where))
  _, abstract = omni.abstract_model(config)
  state = checkpoint.restore_params(path, abstract)
  assets = export.assets_of(path)
  talker = config.model.get("talker") is not None
  hf.save(out_dir, config, state, dtype=_DTYPES[dtype], torch_dtype=dtype,
          generation=export.read_generation(assets), token2wav=export.read_token2wav(assets) if talker else None)
  if talker:  # written from the config's bos ids and the stored tensors (the carried copy may be stale)
    speakers.export_to(out_dir, config, speakers.tensors_file(path))
  skip = (export.GENERATION_FILE, speakers.SPK_FILE) if talker else (export.GENERATION_FILE,)
  copied = export.copy_assets(assets, out_dir, skip=skip) if assets else []
  if copied:
    log.info("copied %s from %s", ", ".join(copied), assets)
  else:
    log.warning("%s: no tokenizer or processor files came with this checkpoint (a training workdir keeps none); "
                "%s holds the weights, config.json and generation_config.json only: copy the tokenizer files "
                "of the source model into it", orbax_dir, out_dir)
  print(f"wrote {out_dir}")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--hf_dir", help="transformers checkpoint directory (config.json + *.safetensors)")
  src.add_argument("--orbax_dir", help="omni_jax checkpoint: a converter output, a training step directory "
                                       "(WORKDIR/checkpoints/N) or a training workdir (its latest step)")
  p.add_argument("--out_dir", required=True)
  p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="tensor dtype when writing HF")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  with cli.user_errors():  # a missing, truncated or mismatched input: one line, exit status 2
    if args.hf_dir:
      hf_to_orbax(args.hf_dir, args.out_dir)
    else:
      orbax_to_hf(args.orbax_dir, args.out_dir, args.dtype)

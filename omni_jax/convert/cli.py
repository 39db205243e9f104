"""Convert between a transformers Qwen2.5-Omni checkpoint directory and an omni_jax orbax checkpoint.

  # HF -> orbax (train.py --config.init_from=OUT and eval.py --checkpoint OUT restore it)
  python -m omni_jax.convert --hf_dir /path/to/Qwen2.5-Omni-7B --out_dir ckpt/omni7b
  # orbax -> HF (transformers' Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained reads it)
  python -m omni_jax.convert --orbax_dir ckpt/omni7b --out_dir hf/omni7b_thinker --dtype bfloat16
"""

import argparse
import logging
import sys

import ml_dtypes
import numpy as np

from omni_jax import checkpoint
from omni_jax.convert import hf
from omni_jax.models import omni

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def hf_to_orbax(hf_dir: str, out_dir: str) -> None:
  hf_config = hf.read_config(hf_dir)
  config = hf.config_from_hf(hf_config)
  _, abstract = omni.abstract_model(config)
  state = hf.load_state(hf_dir, abstract, hf_config=hf_config)
  checkpoint.save_params(out_dir, state, config)
  n = sum(np.size(v) for v in __import__("jax").tree.leaves(state))
  print(f"wrote {out_dir} ({n / 1e6:.1f} M parameters)")


def orbax_to_hf(orbax_dir: str, out_dir: str, dtype: str) -> None:
  config = checkpoint.load_config(orbax_dir)
  _, abstract = omni.abstract_model(config)
  state = checkpoint.restore_params(orbax_dir, abstract)
  hf.save(out_dir, config, state, dtype=_DTYPES[dtype], torch_dtype=dtype)
  print(f"wrote {out_dir}")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--hf_dir", help="transformers checkpoint directory (config.json + *.safetensors)")
  src.add_argument("--orbax_dir", help="omni_jax parameters checkpoint (written by this tool or train.py)")
  p.add_argument("--out_dir", required=True)
  p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="tensor dtype when writing HF")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    if args.hf_dir:
      hf_to_orbax(args.hf_dir, args.out_dir)
    else:
      orbax_to_hf(args.orbax_dir, args.out_dir, args.dtype)
  except (hf.CheckpointMismatch, FileNotFoundError) as e:
    sys.exit(f"error: {e}")

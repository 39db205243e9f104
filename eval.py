"""Evaluate a checkpoint: loss, perplexity and token accuracy per modality on an eval split.

  python eval.py --config configs/tiny.py --checkpoint workdirs/tiny            # a training workdir (latest step)
  python eval.py --config configs/tiny.py --checkpoint ckpt/omni3b              # a `python -m omni_jax.convert` output

Writes a JSON report (--output; default WORKDIR/eval/<split>_step<N>.json for a training checkpoint,
CHECKPOINT/eval/<split>.json for a converter output) and TensorBoard scalars beside it.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from omni_jax import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config()).", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Parameters checkpoint, step directory or training workdir.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON report path (default: beside the checkpoint).")
distributed.define_flags()
flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
  del argv
  distributed.start_process()  # before anything touches a device
  from omni_jax.config import ConfigError
  from omni_jax.evaluate import run

  try:
    report = run.run(_CONFIG.value, _CHECKPOINT.value, _OUTPUT.value)
  except (ConfigError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  for k, v in report["metrics"].items():
    print(f"{k}: {v:.6g}")


if __name__ == "__main__":
  app.run(main)

"""Evaluate a checkpoint with the evaluators of config.eval.tasks (loss, asr, mcq, open; docs/evaluation.md).

  python eval.py --config configs/tiny.py --checkpoint workdirs/tiny            # a training workdir (latest step)
  python eval.py --config configs/tiny.py --checkpoint ckpt/omni3b              # a `python -m omni_jax.convert` output
  python eval.py --config configs/demo.py --checkpoint workdirs/tiny_demo --config.eval.tasks=loss,asr,mcq

Writes a JSON report (--output; default WORKDIR/eval/<split>_step<N>.json for a training checkpoint,
CHECKPOINT/eval/<split>.json for a converter output) and TensorBoard scalars beside it, and prints a table
of the headline scores (beside the training run's first evaluation, when there is one) and one reply per
modality.
"""

from absl import flags
from ml_collections import config_flags

from omni_jax import cli
from omni_jax import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config()).", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Parameters checkpoint, step directory or training workdir.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON report path (default: beside the checkpoint).")
distributed.define_flags()
flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
  del argv
  distributed.start_process()  # before anything touches a device
  from data import demo_corpus  # noqa: F401 - registers config.data.source = "demo"
  from omni_jax.evaluate import run

  report = run.run(_CONFIG.value, _CHECKPOINT.value, _OUTPUT.value)  # a user error: one line, exit status 2
  from omni_jax.evaluate import summary

  workdir = run.workdir_of(report)
  print(summary.table(report, summary.first_evaluation(workdir, report["split"]) if workdir else None))
  for reply in summary.sample_replies(report):
    print(reply)


if __name__ == "__main__":
  cli.run(main)

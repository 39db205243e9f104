"""Train an omni_jax model.

  python train.py --config configs/tiny.py --workdir workdirs/tiny [--config.train.steps=100 ...]

Restarting with the same --workdir resumes from its latest checkpoint. Multi-process runs (one process per
host, or several on one machine) pass --coordinator_address/--num_processes/--process_id or set
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
"""

from absl import flags
from ml_collections import config_flags

from omni_jax import cli
from omni_jax import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  distributed.start_process()  # before anything touches a device
  from data import demo_corpus  # noqa: F401 - registers config.data.source = "demo"
  from omni_jax.evaluate import hook as eval_hook
  from omni_jax.talker import targets as talker_targets
  from omni_jax.train import loop

  hooks = [
      # One speech-unit set per run: the codes index, the config and the checkpoint resumed or started from agree.
      loop.Settle(talker_targets.settle_units),
      eval_hook.Evaluate(),  # config.eval.tasks every config.train.eval_every steps
  ]
  loop.run(_CONFIG.value, _WORKDIR.value, hooks)  # a user error: one line, exit status 2 (omni_jax.cli)


if __name__ == "__main__":
  cli.run(main)

"""The eval.py job: restore any parameters checkpoint on the devices present, evaluate, write a report.

Accepts what params_dir accepts: a converter output (params/ + config.json), a training step directory, or
a training workdir (its latest step). The model architecture stored with the checkpoint is used.
"""

import json
import logging
import os
from typing import Optional

import jax
import ml_collections

from omni_jax import checkpoint
from omni_jax import sharding, towers
from omni_jax.evaluate import loss as eval_lib
from omni_jax.models import omni
from omni_jax.train import data as data_lib
from omni_jax.train import metrics as metrics_lib

log = logging.getLogger(__name__)


def run(config: ml_collections.ConfigDict, checkpoint_path: str, output: Optional[str] = None) -> dict:
  """Evaluate config.eval.steps batches of config.eval.split; returns (and writes) the report."""
  path = checkpoint.params_dir(checkpoint_path)
  config = checkpoint.adopt_model_config(config, path)
  towers.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  rules = config.sharding_rules
  graphdef, abstract = omni.abstract_model(config)
  from flax import nnx  # local: only here to turn the abstract state into restore targets

  param_shardings = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh, rules))
  params = checkpoint.restore_pure(path, checkpoint.with_shardings(nnx.to_pure_dict(abstract), param_shardings))
  log.info("restored %s onto mesh %s", path, dict(mesh.shape))

  e = config.eval
  rows = data_lib.process_rows(mesh, rules, e.batch_size, config.train.seq_len)
  source = data_lib.make_source(config, e.split, e.batch_size, rows)
  step = eval_lib.jit_eval_step(graphdef, mesh, rules, param_shardings, list(towers.objective_weights(config)))
  batches = (data_lib.to_global(next(source), mesh, rules, e.batch_size) for _ in range(e.steps))
  scalars = eval_lib.evaluate(step, params, batches, prefix=e.split)  # "eval/loss", as in train.py

  name = os.path.basename(path)
  step = int(name) if name.isdigit() else None
  report = dict(checkpoint=path, split=e.split, batches=e.steps, batch_size=e.batch_size,
                seq_len=config.train.seq_len, data_source=config.data.source, devices=mesh.size, step=step,
                metrics=scalars)
  if jax.process_index() == 0:
    # Default: beside the checkpoint, never inside orbax's step directories: WORKDIR/eval/ for a training
    # step, CHECKPOINT/eval/ for a parameters checkpoint.
    home = os.path.dirname(os.path.dirname(path)) if step is not None else path
    output = output or os.path.join(home, "eval", f"{e.split}_step{step}.json" if step is not None
                                    else f"{e.split}.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
      json.dump(report, f, indent=2)
    writer = metrics_lib.Writer(os.path.dirname(os.path.abspath(output)), jsonl_name=f"eval_{e.split}.jsonl",
                                tb_subdir=f"tensorboard_{e.split}")
    writer.write(report["step"] or 0, scalars)
    writer.close()
    log.info("wrote %s", output)
  return report

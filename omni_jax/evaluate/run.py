"""The eval.py job: restore any checkpoint on the devices present, run the evaluators of config.eval.tasks,
write the report (JSON, TensorBoard, JSONL) and return it.

Accepts what omni_jax.loader.restore accepts: a training workdir (its latest step), a step directory, a
converter output (params/ + config.json) or a transformers directory. The model architecture stored with the
checkpoint is used; the config gives the data, the evaluators and the mesh.
"""

import json
import logging
import os
from typing import Optional

import jax
import ml_collections

from omni_jax import loader
from omni_jax.evaluate import context as context_lib
from omni_jax.evaluate import job as job_lib
from omni_jax.evaluate import registry
from omni_jax.talker import targets as talker_targets
from omni_jax.train import metrics as metrics_lib

log = logging.getLogger(__name__)


def run(config: ml_collections.ConfigDict, checkpoint_path: str, output: Optional[str] = None) -> dict:
  """Evaluate the checkpoint with config.eval.tasks; returns (and writes) the report."""
  names = registry.selected(config)  # a bad task name fails before anything loads
  path = loader.locate(checkpoint_path)
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked: restore adopts the checkpoint's model
  config, graphdef, params, shardings, mesh, tokenizer_dir = loader.restore(path, config)
  talker_targets.settle_units(config, None)  # the data's speech codes must come from the checkpoint's units
  log.info("restored %s onto mesh %s", path, dict(mesh.shape))
  ctx = context_lib.Context(config, mesh, graphdef, shardings, tokenizer_dir)
  evaluation = job_lib.Evaluation(ctx, names)
  try:
    scalars, sections = evaluation(params)
  finally:
    evaluation.close()

  e = config.eval
  name = os.path.basename(path)
  step = int(name) if name.isdigit() else None
  report = dict(checkpoint=path, step=step, split=e.split, tasks=names, data_source=config.data.source,
                devices=mesh.size, mesh=dict(mesh.shape), metrics=scalars, evaluators=sections)
  if "loss" in sections:  # the batches the loss evaluator really read
    loss = sections["loss"]
    report.update(batches=loss["batches"], batch_size=loss["batch_size"], seq_lens=loss["seq_lens"],
                  seq_len=max((int(k) for k in loss["seq_lens"]), default=None), datasets=loss["datasets"],
                  skipped=loss["skipped"])
  report["cost"] = {n: dict(seconds=s["seconds"], items=s["items"], items_per_s=s["items_per_s"])
                    for n, s in sections.items()}
  if jax.process_index() == 0:
    # Default: beside the checkpoint, never inside orbax's step directories: WORKDIR/eval/ for a training
    # step, CHECKPOINT/eval/ for a parameters checkpoint.
    home = os.path.dirname(os.path.dirname(path)) if step is not None else path
    output = output or os.path.join(home, "eval", f"{e.split}_step{step}.json" if step is not None
                                    else f"{e.split}.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
      json.dump(report, f, indent=2, ensure_ascii=False)
    writer = metrics_lib.Writer(os.path.dirname(os.path.abspath(output)), jsonl_name=f"eval_{e.split}.jsonl",
                                tb_subdir=f"tensorboard_{e.split}")
    writer.write(report["step"] or 0, scalars)
    writer.close()
    log.info("wrote %s", output)
  return report


def workdir_of(report: dict) -> Optional[str]:
  """The training workdir of a report's checkpoint (WORKDIR/checkpoints/<step>), if it is one."""
  if report.get("step") is None:
    return None
  return os.path.dirname(os.path.dirname(report["checkpoint"]))


def wants_loss(config) -> bool:
  """Whether train.py's evaluations include the loss."""
  return "loss" in registry.selected(config, in_training=True)


def in_loop(config, mesh, graphdef, param_shardings) -> Optional[job_lib.Evaluation]:
  """train.py's evaluators of config.eval.tasks other than loss (the loop runs the loss on its own eval
  source), or None when there are none."""
  names = [n for n in registry.selected(config, in_training=True) if n != "loss"]
  if not names:
    return None
  return job_lib.Evaluation(context_lib.Context(config, mesh, graphdef, param_shardings), names)

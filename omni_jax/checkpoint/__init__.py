"""Orbax checkpoints: model parameters alone, and a training run's full states with the data position beside.

  params.py         parameters checkpoints (the converter's format, every training step's params/ item)
  stored_config.py  the config.json stored with a checkpoint; transformers directories told apart
  integrity.py      whether a step can be restored (files.json, metadata), the newest intact step
  adopt.py          a config adopting the architecture stored with a checkpoint (and new Talker voices)
  handlers.py       a step's data-iterator and config items
  trainer.py        TrainCheckpointer: the run's CheckpointManager, resuming from the newest intact step
  arrays.py         how orbax writes replicated arrays (registered on import)

Loading a checkpoint of any kind for inference is omni_jax.loader's job; the workdir lock is train/workdir.py's.
"""

from omni_jax.checkpoint import arrays
from omni_jax.checkpoint.adopt import adopt_model_config
from omni_jax.checkpoint.integrity import CheckpointError, params_dir, step_problem, stored_tree
from omni_jax.checkpoint.params import restore_params, restore_pure, save_params
from omni_jax.checkpoint.stored_config import find_config, is_transformers_dir, load_config, save_config, tuples
from omni_jax.checkpoint.trainer import TrainCheckpointer

__all__ = ["CheckpointError", "TrainCheckpointer", "adopt_model_config", "find_config", "is_transformers_dir",
           "load_config", "params_dir", "restore_params", "restore_pure", "save_config", "save_params",
           "step_problem", "stored_tree", "tuples"]

arrays.register()

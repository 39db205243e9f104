"""One loader for every kind of checkpoint, used by generate, evaluate, units and serve.

    from omni_jax import loader
    loaded = loader.restore("workdirs/tiny_demo")   # workdir, step directory, converter output or HF directory
    loaded.config, loaded.graphdef, loaded.params, loaded.shardings, loaded.mesh, loaded.tokenizer_dir

The kinds, told apart by what the directory holds:
  transformers directory  config.json in transformers' format + *.safetensors (read through convert/hf.py)
  converter output        params/ + config.json (python -m omni_jax.convert)
  step directory          WORKDIR/checkpoints/<step>: params/, train/, data/, config/
  training workdir        its newest intact step (damaged steps are skipped with a warning)
The model architecture always comes from the checkpoint; the config given supplies the rest (mesh, data,
generation). A LoRA run's checkpoint loads with its base and its adapters merged in.
"""

import os
from typing import Any, NamedTuple, Optional

import jax
import ml_collections
from flax import nnx

from omni_jax import adapters
from omni_jax import checkpoint
from omni_jax import defaults
from omni_jax import sharding
from omni_jax import towers
from omni_jax.convert import export
from omni_jax.convert import hf
from omni_jax.convert import peft
from omni_jax.convert import speakers
from omni_jax.errors import ConfigError
from omni_jax.models import omni


class Loaded(NamedTuple):
  """A restored model: its parameters placed on the mesh, and the tokenizer directory carried with it (None
  when the checkpoint carries none)."""
  config: ml_collections.ConfigDict
  graphdef: Any
  params: Any
  shardings: Any
  mesh: jax.sharding.Mesh
  tokenizer_dir: Optional[str]


def locate(path: str) -> str:
  """The directory holding the parameters that `path` names: a transformers directory or a parameters
  checkpoint as is, a training workdir's newest intact step."""
  path = os.path.abspath(os.path.expanduser(path))
  return path if checkpoint.is_transformers_dir(path) else checkpoint.params_dir(path)


def has_tokenizer(directory: Optional[str]) -> bool:
  """Whether `directory` holds a BPE tokenizer (tokenizer.json, or vocab.json with merges.txt)."""
  if directory is None:
    return False
  if os.path.isfile(os.path.join(directory, "tokenizer.json")):
    return True
  return all(os.path.isfile(os.path.join(directory, f)) for f in ("vocab.json", "merges.txt"))


def restore(path: str, config: Optional[ml_collections.ConfigDict] = None, mesh_shape=None,
            adapter: Optional[str] = None) -> Loaded:
  """Any checkpoint, restored directly in its sharded layout on the mesh.

  config: runtime, mesh and generation settings (default: the config saved with a training run, else the
  defaults). mesh_shape: overrides config.mesh. adapter: LoRA adapters to merge into the model at `path`: a
  PEFT adapter directory (adapter_config.json) or a LoRA run of this project (its workdir or step; `path`
  then replaces the base it recorded).
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such checkpoint")
  transformers = checkpoint.is_transformers_dir(path)
  source = path if transformers else checkpoint.params_dir(path)
  peft_dir = adapter if adapter is not None and peft.is_adapter_dir(adapter) else None
  lora_run = adapter if peft_dir is None else None
  if transformers:
    config, merged = _transformers_config(path, config, lora_run), None
    tokenizer_dir = path
  else:
    config, merged = _stored_config(source, config, lora_run)
    tokenizer_dir = export.assets_of(source)
  if mesh_shape is not None:
    config.mesh = ml_collections.ConfigDict(dict(mesh_shape))
  towers.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  graphdef, abstract = omni.abstract_model(config)
  shardings = sharding.state_shardings(abstract, mesh, config.sharding_rules)
  if peft_dir is not None:
    base = hf.load_state(source, abstract) if transformers else checkpoint.restore_params(source, abstract)
    merged = peft.merged(peft_dir, config, jax.device_get(nnx.to_pure_dict(base)))
  if merged is not None:  # merged on the host: placed in one step
    params = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(params, merged)
    params = jax.device_put(params, shardings)
  elif transformers:
    params = jax.device_put(hf.load_state(source, abstract), shardings)
  else:
    params = checkpoint.restore_params(source, abstract, shardings)
  return Loaded(config, graphdef, params, shardings, mesh, tokenizer_dir if has_tokenizer(tokenizer_dir) else None)


def _transformers_config(path: str, config: Optional[ml_collections.ConfigDict],
                         lora_run: Optional[str]) -> ml_collections.ConfigDict:
  """The config of a transformers directory: its architecture, voices and generation_config.json over `config`."""
  if lora_run is not None:
    raise ConfigError(f"--adapter {lora_run}: a LoRA run of train.py merges into the orbax checkpoint it trained "
                      f"over (its own --checkpoint); over a transformers directory give its PEFT export "
                      f"(python -m omni_jax.convert --orbax_dir RUN --peft_out DIR)")
  config = hf.config_from_hf(hf.read_config(path), base=config)
  speakers.import_from(path, config)  # the voices' bos ids (spk_dict.pt) when the model has a Talker
  generation = export.read_generation(path)
  if generation is not None:
    export.adopt_generation(config, generation)
  return config


def _stored_config(params_path: str, config: Optional[ml_collections.ConfigDict],
                   lora_run: Optional[str]) -> tuple[ml_collections.ConfigDict, Optional[dict]]:
  """(config, merged parameters or None) of an orbax checkpoint: `config` (default: the one saved with it)
  with the stored architecture. A LoRA run's step holds adapters only (`params_path` itself, or `lora_run`
  over the base at `params_path`): then its base and adapters are merged on the host. The run's own config
  says whether it is one, whatever runtime config was given."""
  if config is None:
    config = _saved_config(params_path)
  run = checkpoint.params_dir(lora_run) if lora_run is not None else params_path
  run_saved = checkpoint.find_config(run)
  run_config = checkpoint.load_config(run_saved) if run_saved else None
  merged = None
  if run_config is not None and adapters.is_lora(run_config):
    _, merged = adapters.restore_merged(run, run_config, base=None if run == params_path else params_path)
    config = adapters.without_lora(config) if adapters.is_lora(config) else config
  elif run != params_path:
    raise ConfigError(f"--adapter {lora_run}: neither a PEFT adapter directory (adapter_config.json) nor a LoRA "
                      f"run (its config has no lora section)")
  return export.complete_token_ids(checkpoint.adopt_model_config(config, params_path)), merged


def _saved_config(params_path: str) -> ml_collections.ConfigDict:
  """The config saved with a checkpoint (else the defaults), completed with the sections it may lack; its
  mesh is the default one (the training mesh need not fit the devices present)."""
  saved = checkpoint.find_config(params_path)
  config = checkpoint.load_config(saved) if saved else defaults.base_config()
  config = ml_collections.ConfigDict(checkpoint.tuples(config.to_dict()))
  for key, fill in (("generate", defaults.generation), ("train", defaults.training)):
    if key not in config:
      fill(config)
  config.mesh = defaults.base_config().mesh
  return config

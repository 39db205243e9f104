"""omni_jax.loader restores every kind of checkpoint alike: a converter output, a training workdir, one of its
step directories and a transformers directory, each with the stored architecture, its parameters placed on the
mesh asked for, and the tokenizer carried with it."""

import os

import jax
import numpy as np
import pytest
from flax import nnx, traverse_util

import train_testlib as lib
from omni_jax import checkpoint, loader
from omni_jax.convert import export
from omni_jax.convert import hf
from omni_jax.models import omni

MESH = dict(data=1, fsdp=2, tensor=4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(the tiny model's parameters as host arrays, {kind: path}), the same parameters saved in each format."""
  root = tmp_path_factory.mktemp("kinds")
  c = lib.config()
  _, state, _ = omni.create_sharded(c, lib.mesh_of(dict(data=1)), seed=5)
  pure = jax.device_get(nnx.to_pure_dict(state))

  converted = str(root / "converted")
  checkpoint.save_params(converted, state, c)
  os.makedirs(os.path.join(converted, export.ASSETS_DIR))
  open(os.path.join(converted, export.ASSETS_DIR, "tokenizer.json"), "w").close()

  workdir = str(root / "work")
  ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, "checkpoints"), async_save=False, config=c)
  for step in (2, 4):
    ckpt.save(step, pure, {"step": np.int32(step)})
  ckpt.close()

  transformers = str(root / "hf")
  hf.save(transformers, c, state)
  open(os.path.join(transformers, "tokenizer.json"), "w").close()
  return pure, dict(converted=converted, workdir=workdir, step=os.path.join(workdir, "checkpoints", "4"),
                    transformers=transformers)


@pytest.mark.parametrize("kind", ["converted", "workdir", "step", "transformers"])
def test_every_kind_restores_the_same_model(saved, kind):
  pure, paths = saved
  loaded = loader.restore(paths[kind], mesh_shape=MESH)
  assert dict(loaded.mesh.shape)["tensor"] == 4
  assert loaded.config.model.thinker.text.vocab_size == 256  # the stored architecture, not the defaults'
  restored = traverse_util.flatten_dict(jax.device_get(nnx.to_pure_dict(loaded.params)))
  shardings = traverse_util.flatten_dict(nnx.to_pure_dict(loaded.shardings))
  want = traverse_util.flatten_dict(pure)
  assert restored.keys() == want.keys()
  for k, v in want.items():
    np.testing.assert_array_equal(restored[k], v, err_msg=str(k))
  for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(loaded.params)).items():
    assert v.sharding == shardings[k], k  # restored straight into the mesh's layout
  carried = {"converted": os.path.join(paths["converted"], export.ASSETS_DIR), "workdir": None, "step": None,
             "transformers": paths["transformers"]}
  assert loaded.tokenizer_dir == carried[kind]


def test_locate_names_the_parameters_directory(saved):
  _, paths = saved
  assert loader.locate(paths["workdir"]) == paths["step"]  # the newest step
  for kind in ("converted", "step", "transformers"):
    assert loader.locate(paths[kind]) == paths[kind]
  with pytest.raises(FileNotFoundError, match="no such checkpoint"):
    loader.restore(os.path.join(paths["workdir"], "nothing"))

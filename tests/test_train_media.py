"""Training with image and audio rows: the encoders run inside the step, stage 1 keeps the LLM frozen, and a
sharded mesh gives the one-device losses."""

import jax
import numpy as np
import pytest
from flax import traverse_util

import train_testlib as lib
from configs.recipes import stage1
from omni_jax import batch as batch_lib


def _config():
  c = stage1.get_config()  # LLM frozen; encoders and adapters train; image + audio rows
  base = lib.config(seq_len=64)
  c.model.thinker.text.vocab_size = 256
  c.model.thinker.update(lib.SMALL_IDS)
  c.data.synthetic.vocab_size = 256
  c.train.update({k: base.train[k] for k in ("steps", "batch_size", "seq_len", "log_every", "warmup_steps", "lr")})
  c.data.synthetic.kinds = ("text", "image", "audio")
  c.eval.update(base.eval.to_dict())
  return c


@pytest.mark.slow
def test_stage1_with_media_on_one_device_and_a_mesh():
  c = _config()
  losses, metrics, state, setup = lib.train_steps(c, lib.mesh_of(dict(data=1)), 2)
  count = metrics[0]["objectives"]["thinker_text"]["count"]
  assert all(count[batch_lib.KINDS[k]] > 0 for k in ("text", "image", "audio"))  # per-modality sums
  assert np.isfinite(losses).all()
  before = traverse_util.flatten_dict(jax.device_get(setup.init().params))
  after = traverse_util.flatten_dict(jax.device_get(state.params))
  for k, v in before.items():
    if k[1] in ("model", "lm_head"):
      assert np.array_equal(after[k], v), k  # the frozen LLM: bit-identical
    elif k[1] in ("visual", "audio_tower") and k[2] != "audio_bos_eos_token":  # (unused by the forward pass)
      assert not np.array_equal(after[k], v), k  # gradients reached both encoders through the frozen LLM
  sharded, _, _, _ = lib.train_steps(c, lib.mesh_of(dict(data=2, fsdp=2, tensor=2)), 2)
  np.testing.assert_allclose(sharded, losses, rtol=2e-5)

"""Context parallelism on 8 fake CPU devices: rows split over `context` (alone and with fsdp / tensor) train
with the one-device losses and gradient norms on packed text + image + audio batches; the stage-3 recipe
runs a step with context=8."""

import numpy as np
import pytest

import train_testlib as lib
from configs.recipes import stage3
from omni_jax.layers import context_parallel


def test_balanced_order_gives_every_device_the_same_causal_work():
  n, length = 4, 64
  order = context_parallel.balanced_order(length, n)
  assert sorted(order.tolist()) == list(range(length))
  # Causal work of a query = its index + 1 keys; device r holds order[r * 16:(r + 1) * 16].
  work = [(order[r * 16:(r + 1) * 16] + 1).sum() for r in range(n)]
  assert len(set(work)) == 1, work
  contiguous = [(np.arange(r * 16, (r + 1) * 16) + 1).sum() for r in range(n)]
  assert max(contiguous) > 5 * min(contiguous)  # what it avoids
  assert context_parallel.balanced_order(60, 4) is None  # 60 does not split into 8 chunks: contiguous chunks


@pytest.fixture
def counted(monkeypatch):
  calls = []
  original = context_parallel.attention

  def attention(q, *args, **kw):
    calls.append(q.shape)
    return original(q, *args, **kw)

  monkeypatch.setattr(context_parallel, "attention", attention)
  return calls


def _train(shape, impl=None):
  c = lib.config(seq_len=64, steps=2)
  c.data.synthetic.kinds = ("text", "image", "audio")
  c.model.attention_impl = impl
  losses, metrics, _, _ = lib.train_steps(c, lib.mesh_of(shape), 2)
  return np.asarray(losses), np.asarray([float(m["grad_norm"]) for m in metrics])


@pytest.fixture(scope="module")
def one_device():
  return _train(dict(data=1))


@pytest.mark.slow
@pytest.mark.parametrize("shape,impl", [
    (dict(data=1, context=8), "blocked"),
    (dict(data=1, fsdp=2, context=2, tensor=2), None),
], ids=["context8-blocked", "fsdp2-context2-tensor2-dense"])
def test_context_parallel_matches_one_device(shape, impl, one_device, counted):
  losses, grad_norms = _train(shape, impl)
  assert counted, "the text stack did not take the context-parallel attention path"
  np.testing.assert_allclose(losses, one_device[0], rtol=2e-6)
  np.testing.assert_allclose(grad_norms, one_device[1], rtol=2e-5)


@pytest.mark.slow
def test_stage3_recipe_runs_a_step_with_context_8(counted):
  c = stage3.get_config()  # tiny model, 512-token packed text + image + audio rows, attention_impl "auto"
  c.train.steps = 1
  losses, _, _, _ = lib.train_steps(c, lib.mesh_of(dict(data=1, context=8)), 1)
  assert np.isfinite(losses).all()
  assert 512 in {shape[1] for shape in counted}  # the text stack's rows went through the context-parallel path

"""Thinker text logits equal transformers' (float32) on three tiny configs, with padding and 3-D positions, and with
a tied head (logits and the fused loss's gradient of the table)."""

import numpy as np
import pytest
import torch

import hf_reference as ref
import jax.numpy as jnp
from flax import nnx

from omni_jax.convert import hf
from omni_jax.models import omni

pytestmark = pytest.mark.parity




def _prompt_with_image(rng, length, vocab, grid_hw):
  """Text, then <vision_bos> IMAGE*n <vision_eos> (placeholders only: positions become 3-D), then text."""
  n = grid_hw[0] * grid_hw[1] // 4
  head = rng.integers(10, vocab, size=3)
  tail = rng.integers(10, vocab, size=length - 3 - n - 2)
  return np.concatenate([head, [7], [2] * n, [8], tail])


@pytest.mark.parametrize("variant", list(ref.TEXT_VARIANTS))
def test_logits_match_transformers(variant, tmp_path):
  hf_model = ref.build_thinker(variant, seed=len(variant))
  ours, config = ref.ours(hf_model, tmp_path)
  vocab = config.model.thinker.text.vocab_size
  rng = np.random.default_rng(0)
  length = 24
  ids = np.stack([_prompt_with_image(rng, length, vocab, (4, 6)),
                  _prompt_with_image(rng, length, vocab, (2, 4)),
                  ref.text_ids(rng, 1, length, vocab)[0]])
  mask = np.ones_like(ids)
  mask[1, :5] = 0  # left padding
  mask[2, :2] = 0
  ids[mask == 0] = 0
  grids = torch.tensor([[1, 4, 6], [1, 2, 4]])
  positions, _ = hf_model.get_rope_index(torch.tensor(ids), image_grid_thw=grids, attention_mask=torch.tensor(mask))
  assert not torch.equal(positions[0], positions[1]), "the test must exercise 3-D positions"
  with torch.no_grad():
    expected = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        position_ids=positions).logits.numpy()
  got = np.asarray(ours.thinker(jnp.asarray(ids), jnp.asarray(positions.numpy()), jnp.asarray(mask)))
  real = mask.astype(bool)
  err = np.abs(got - expected)[real].max()
  assert err <= 1e-4, f"{variant}: max abs logit difference {err}"


def test_unscanned_and_remat_give_the_same_logits(tmp_path):
  hf_model = ref.build_thinker("gqa2")
  hf_model.save_pretrained(tmp_path)
  ids = jnp.asarray(ref.text_ids(np.random.default_rng(1), 2, 9, 200))
  pos = jnp.broadcast_to(jnp.arange(9), (3, 2, 9))
  seg = jnp.ones((2, 9), jnp.int32)
  outs = []
  for scan, remat in [(True, "none"), (False, "none"), (True, "full"), (False, "dots")]:
    config = hf.config_from_hf(hf.read_config(tmp_path))
    config.model.scan_layers, config.model.remat_policy = scan, remat
    graphdef, abstract = omni.abstract_model(config)
    model = nnx.merge(graphdef, hf.load_state(tmp_path, abstract))
    outs.append(np.asarray(model.thinker(ids, pos, seg)))
  for o in outs[1:]:
    np.testing.assert_allclose(o, outs[0], atol=1e-6)


def test_bfloat16_compute_stays_close(tmp_path):
  """bf16 compute (f32 master weights) tracks the f32 reference; a smoke check of the dtype plumbing."""
  hf_model = ref.build_thinker("gqa2")
  model, _ = ref.ours(hf_model, tmp_path, **{"model.dtype": "bfloat16"})
  ids = ref.text_ids(np.random.default_rng(2), 1, 12, 200)
  pos = np.broadcast_to(np.arange(12), (3, 1, 12))
  got = model.thinker(jnp.asarray(ids), jnp.asarray(pos), jnp.ones((1, 12), jnp.int32))
  assert got.dtype == jnp.bfloat16
  with torch.no_grad():
    expected = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.ones(1, 12, dtype=torch.long)).logits
  err = np.abs(np.asarray(got, np.float32) - expected.numpy()).max()
  assert err < 0.05, err


def test_tied_head_logits_and_fused_loss_gradient_match_transformers(tmp_path):
  """A Thinker whose LM head is its embedding table (tie_word_embeddings): the checkpoint has no lm_head; the
  logits, and the fused training loss's gradient of the table (the input embedding's and the head's parts
  together), equal transformers'."""
  import jax  # noqa: PLC0415

  from omni_jax.thinker import inputs as thinker_inputs  # noqa: PLC0415
  from omni_jax.thinker import objective  # noqa: PLC0415

  text = dict(ref.TEXT_VARIANTS["gqa2"], tie_word_embeddings=True, pad_token_id=0)
  hf_model = ref.build_thinker("gqa2", seed=3, text_config=text, tie_word_embeddings=True)
  assert hf_model.lm_head.weight is hf_model.get_input_embeddings().weight
  model, config = ref.ours(hf_model, tmp_path)
  assert model.thinker.lm_head is None
  ids = ref.text_ids(np.random.default_rng(1), 2, 16, config.model.thinker.text.vocab_size).astype(np.int32)

  logits = hf_model(input_ids=torch.tensor(ids)).logits
  loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           torch.tensor(ids[:, 1:]).reshape(-1).long(), reduction="sum")
  loss.backward()
  want_grad = hf_model.get_input_embeddings().weight.grad.numpy()
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), (3,) + ids.shape)  # text: three identical rows
  got = np.asarray(model.thinker(jnp.asarray(ids), positions, jnp.ones_like(jnp.asarray(ids))))
  np.testing.assert_allclose(got, logits.detach().numpy(), atol=1e-4)

  batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids), "segment_ids": jnp.ones_like(jnp.asarray(ids)),
           "kind": jnp.zeros_like(jnp.asarray(ids))}
  layout = objective.LossLayout(chunk=5, fused=True)
  graphdef, state = nnx.split(model)

  def loss_sum(state):
    m = nnx.merge(graphdef, state)
    hidden = thinker_inputs.outputs(m.thinker, batch)["hidden"]
    return jnp.sum(objective.hidden_token_stats(m.thinker, hidden, batch, layout)["loss_sum"])

  value, grads = jax.value_and_grad(loss_sum)(state)
  np.testing.assert_allclose(float(value), loss.item(), rtol=1e-5)
  got_grad = np.asarray(grads["thinker"]["model"]["embed_tokens"]["embedding"][...])
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-5)

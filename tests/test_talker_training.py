"""Training the Talker with the Thinker: the teacher-forced sequence equals transformers' inference construction
(inputs, positions, logits), the joint step lowers both losses on every mesh, the stop-gradient and freeze
switches, and spoken replies through the real pipeline (codes index, skips, one unit set per run)."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import soundfile
from flax import nnx, traverse_util

import train_testlib as lib
from omni_jax import batch as batch_lib
from omni_jax import towers
from omni_jax.input import packing
from omni_jax.input.preprocess import Sample
from omni_jax.talker import layout, objective, targets
from omni_jax.train import state as state_lib
from omni_jax.train import step as step_lib
from omni_jax.units import codes as codes_lib

MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=2, tensor=4)]


# --------------------------------------------------------------------------------------- vs transformers


def test_teacher_forced_talker_equals_transformers_inference_construction(tmp_path):
  import hf_reference as ref  # noqa: PLC0415  (torch: the test extra; a parity test never skips)
  import torch  # noqa: PLC0415

  model = ref.build_omni(seed=3)
  rng = np.random.default_rng(0)
  frames, n_audio = 80, 20  # 80 mel frames -> 20 audio tokens
  prompt = [10, 11, 4] + [1] * n_audio + [5] + list(rng.integers(12, 150, 6))
  reply = list(rng.integers(12, 150, 4)) + [9]  # content + the Thinker's stop token (N = 5)
  codes = rng.integers(0, 100, 9).astype(np.int32)  # M = 9 > N: the queue runs into eos, then pad
  big_l, n, m = len(prompt), len(reply), len(codes)
  feats = rng.standard_normal((1, 128, frames)).astype(np.float32)
  ids = torch.tensor([prompt + reply])
  talker = model.talker
  with torch.no_grad():
    out = model.thinker(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=torch.tensor(feats),
                        feature_attention_mask=torch.ones(1, frames, dtype=torch.long), output_hidden_states=True)
    hidden, embeds = out.hidden_states[-1], out.hidden_states[0].clone()
    embeds[ids == 1] = 0.0  # media rows of the embedding half are zeroed
    thinker_embed = model.thinker.get_input_embeddings()
    codec = talker.get_input_embeddings()
    one = lambda i: torch.tensor([[i]])  # noqa: E731
    rows = hidden + embeds
    queue = torch.cat([rows[:, big_l + 1:big_l + n - 1], thinker_embed(one(191)), thinker_embed(one(189))], dim=1)
    steps = [codec(torch.tensor([[int(c)]])) + queue[:, min(k, queue.shape[1] - 1):][:, :1]
             for k, c in enumerate(codes)]
    x = torch.cat([rows[:, :big_l], thinker_embed(one(150)) + codec(one(112)),
                   rows[:, big_l:big_l + 1] + codec(one(113))] + steps, dim=1)
    text_ids = torch.tensor([prompt + [150, reply[0]]])
    pos, delta = talker.get_rope_index(text_ids, None, None, torch.ones_like(text_ids), False,
                                       torch.tensor([frames]), None)
    tail = torch.arange(big_l + 2, big_l + 2 + m).view(1, 1, -1).expand(3, 1, -1) + delta.view(1, -1, 1)
    pos = torch.cat([pos, tail], dim=2)
    h = talker.model(inputs_embeds=talker.thinker_to_talker_proj(x), position_ids=pos,
                     attention_mask=torch.ones(1, x.shape[1], dtype=torch.long)).last_hidden_state
    want = talker.codec_head(h).float().numpy()

  config, graphdef, state = ref.converted(model, tmp_path / "hf")
  ours = nnx.merge(graphdef, state)
  labels = np.full(big_l + n, batch_lib.IGNORE, np.int32)
  labels[big_l:] = reply
  spoken = layout.SpokenReply(big_l, n, codes, 150, targets.codec_ids(config.model.talker))
  sample = Sample("hf", batch_lib.KIND_AUDIO, np.asarray(prompt + reply, np.int32), labels, [], [], [feats[0]],
                  targets={"talker": spoken})
  bucket = packing.Bucket(seq_len=48, batch_size=1, max_audios=1, max_audio_frames=200, sizes={"talker_seq_len": 64})
  batch = {k: jnp.asarray(v) for k, v in packing.assemble([[sample]], bucket, pad_id=0).items()}
  got_x, got_pos = objective.talker_inputs(ours, batch)
  got = ours.talker(got_x, got_pos, batch["talker_segment_ids"])
  t = big_l + 2 + m
  np.testing.assert_array_equal(np.asarray(got_pos)[:, :, :t], pos.numpy())
  np.testing.assert_allclose(np.asarray(got_x)[:, :t], x.numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(got)[:, :t], want, atol=1e-4, rtol=1e-4)
  # The targets: c_0 at the bos row, then each next code, the codec end id after the last code.
  np.testing.assert_array_equal(np.asarray(batch["talker_labels"])[0, big_l + 1:t], list(codes) + [114])


# --------------------------------------------------------------------------------------- joint training


def _talker_config(**train):
  c = lib.config(**train)
  c.train.objectives = ml_collections.ConfigDict({"thinker_text": 1.0, "talker_codes": 1.0})
  return c


def _batch(seed=0, rows=8):
  """rows Thinker rows of 32 tokens, one or two spoken replies each, with their Talker rows."""
  rng = np.random.default_rng(seed)
  ids = targets.codec_ids(lib.config().model.talker)

  def sample(i):
    big_l, n, m = int(rng.integers(6, 10)), int(rng.integers(3, 5)), int(rng.integers(8, 14))
    toks = rng.integers(10, 200, big_l + n).astype(np.int32)
    labels = np.full(big_l + n, batch_lib.IGNORE, np.int32)
    labels[big_l:] = toks[big_l:]
    codes = rng.integers(0, 8, m).astype(np.int32)  # few codes: learnable in a few steps
    return Sample(f"s{i}", batch_lib.KIND_TEXT, toks, labels, [], [], [], targets={"talker": layout.SpokenReply(
        big_l, n, codes, 253, ids)})

  b = packing.Bucket(seq_len=32, batch_size=rows, sizes={"talker_seq_len": 64})
  return packing.assemble([[sample(2 * r)] + ([sample(2 * r + 1)] if r % 2 else []) for r in range(rows)], b,
                          pad_id=0)


def _run(c, mesh, n, batch):
  setup = state_lib.Setup(c, mesh)
  state = setup.init()
  first = jax.device_get(state.params)
  step = step_lib.jit_train_step(setup)
  out = []
  for _ in range(n):
    state, m = step(state, batch)
    out.append(jax.device_get(m))
  return out, first, jax.device_get(state.params)


def _mean(m, name):
  o = m["objectives"][name]
  return float(np.sum(o["loss_sum"]) / np.sum(o["count"]))


@pytest.fixture(scope="module")
def joint():
  c = _talker_config(steps=8, warmup_steps=1)
  metrics, first, last = _run(c, lib.mesh_of(dict(data=1)), 8, _batch())
  return c, metrics, first, last


def test_joint_training_lowers_the_text_and_the_code_loss(joint):
  _, metrics, first, last = joint
  text = [_mean(m, "thinker_text") for m in metrics]
  code = [_mean(m, "talker_codes") for m in metrics]
  assert code[0] == pytest.approx(np.log(72), rel=0.05)  # uniform over the codec vocabulary at init
  assert text[-1] < text[0] - 0.5 and code[-1] < code[0] - 0.5, (text, code)
  assert not np.array_equal(first["talker"]["codec_head"]["kernel"], last["talker"]["codec_head"]["kernel"])
  assert float(np.sum(metrics[0]["objectives"]["talker_codes"]["count"])) == np.sum(_batch()["talker_labels"] >= 0)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(str(s[a]) for a in ("data", "fsdp", "tensor")))
def test_meshes_give_the_one_device_joint_losses(shape, joint):
  c, ref_metrics, _, _ = joint
  metrics, _, _ = _run(c, lib.mesh_of(shape), 3, _batch())
  for name in ("thinker_text", "talker_codes"):
    np.testing.assert_allclose([_mean(m, name) for m in metrics], [_mean(m, name) for m in ref_metrics[:3]],
                               rtol=2e-5)


def _code_grads(thinker_gradient):
  c = _talker_config()
  c.model.talker.thinker_gradient = thinker_gradient
  from omni_jax.models import omni  # noqa: PLC0415

  graphdef, state = nnx.split(omni.OmniModel(c, rngs=nnx.Rngs(0)))
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}

  def code_loss(state):
    return jnp.sum(objective.code_loss(nnx.merge(graphdef, state), batch, None)["loss_sum"])

  return traverse_util.flatten_dict(nnx.to_pure_dict(jax.grad(code_loss)(state)))


def test_stop_gradient_switch_keeps_the_code_loss_out_of_the_thinker():
  stopped, through = _code_grads(False), _code_grads(True)
  thinker = [k for k in stopped if k[0] == "thinker"]
  assert thinker and all(not np.any(np.asarray(stopped[k])) for k in thinker)  # exactly zero
  assert any(np.any(np.asarray(through[k])) for k in thinker)  # end to end: the Thinker learns to be voiced
  assert np.any(np.asarray(stopped[("talker", "codec_head", "kernel")]))


@pytest.mark.parametrize("frozen", ["talker", "thinker"])
def test_a_frozen_part_stays_bit_identical(frozen):
  c = _talker_config(freeze=(frozen,))
  metrics, first, last = _run(c, lib.mesh_of(dict(data=1)), 3, _batch())
  moving = "thinker" if frozen == "talker" else "talker"
  for k, v in traverse_util.flatten_dict(last[frozen]).items():
    np.testing.assert_array_equal(v, traverse_util.flatten_dict(first[frozen])[k], err_msg=str(k))
  assert any(not np.array_equal(v, traverse_util.flatten_dict(first[moving])[k])
             for k, v in traverse_util.flatten_dict(last[moving]).items())


# --------------------------------------------------------------------------------------- the real pipeline


def _spoken_corpus(tmp_path, n=6):
  """A JSONL of n typed questions with spoken answers (tones of different lengths) and a codes index."""
  media = tmp_path / "media"
  media.mkdir()
  index = codes_lib.CodeIndex("unitsA", 64)
  lines = []
  for i in range(n):
    seconds = 0.3 + 0.1 * i
    t = np.arange(int(16000 * seconds)) / 16000
    wav = media / f"a{i}.wav"
    soundfile.write(wav, (0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t)).astype(np.float32), 16000)
    if i != n - 1:  # the last reply is left out of the index: it must be skipped and counted
      index.add(wav, np.arange(int(50 * seconds)) % 64)
    lines.append(json.dumps({"id": f"q{i}", "messages": [
        {"role": "user", "content": f"question {i}"},
        {"role": "assistant", "content": f"answer number {i}", "speech": f"media/a{i}.wav", "speaker": "Ethan"}]}))
  (tmp_path / "spoken.jsonl").write_text("\n".join(lines) + "\n")
  index.save(tmp_path / "codes.json")
  return tmp_path / "spoken.jsonl", tmp_path / "codes.json", index


def _pipeline_config(tmp_path, jsonl, codes_path):
  from configs import tiny  # noqa: PLC0415

  c = tiny.get_config()
  c.data.source = "jsonl"
  c.data.datasets = ml_collections.ConfigDict({"spoken": str(jsonl)})
  c.data.mixture = ml_collections.ConfigDict({"spoken": 1.0})
  c.data.tfds_data_dir = str(tmp_path / "tfds")
  c.data.buckets = (dict(seq_len=128, max_images=0, max_image_patches=0, max_videos=0, max_video_patches=0,
                         max_audios=0, max_audio_frames=0, talker_seq_len=256),)
  c.data.speech_codes = str(codes_path)
  c.data.shuffle = False
  c.train.batch_size = 4
  return c


def test_spoken_replies_become_talker_rows_through_the_pipeline(tmp_path):
  from omni_jax.input import pipeline  # noqa: PLC0415

  jsonl, codes_path, index = _spoken_corpus(tmp_path)
  c = _pipeline_config(tmp_path, jsonl, codes_path)
  assert targets.settle_units(c) == "unitsA" and c.model.talker.units_version == "unitsA"
  it = iter(pipeline.build_dataset(c, split="train"))
  batch, info = next(it)
  towers.check_batch(batch)
  ethan = c.model.talker.speakers.Ethan
  seen = 0
  for r in range(batch["input_ids"].shape[0]):
    for seg in set(batch["talker_segment_ids"][r]) - {0}:
      sel = batch["talker_segment_ids"][r] == seg
      labels = batch["talker_labels"][r][sel]
      codes = labels[labels != batch_lib.IGNORE]
      assert codes[-1] == c.model.talker.tts_codec_end_token_id
      assert len(codes) - 1 in {int(50 * (0.3 + 0.1 * i)) for i in range(5)}
      assert ethan in batch["talker_text_id"][r][sel]  # the voice opens the text track
      # The prompt rows read the sample's own Thinker tokens: their segment is this one.
      src = batch["talker_text_src"][r][sel]
      assert np.all(batch["segment_ids"][r][src[src >= 0]] == seg)
      seen += 1
  assert seen >= 2
  skipped = [s for b, i in [(batch, info)] + [next(it) for _ in range(2)] for s in i["skipped"]]
  assert any(s[1] == targets.NO_CODES and "a5.wav" in s[2] for s in skipped)


def test_one_unit_set_per_run(tmp_path):
  jsonl, codes_path, _ = _spoken_corpus(tmp_path)
  c = _pipeline_config(tmp_path, jsonl, codes_path)
  c.model.talker.units_version = "unitsB"  # the Talker was trained on another unit set
  with pytest.raises(codes_lib.UnitsMismatch, match="unitsA"):
    targets.settle_units(c)


def test_a_checkpoint_trained_on_one_unit_set_refuses_data_of_another(tmp_path):
  jsonl, codes_path, _ = _spoken_corpus(tmp_path)
  c = _pipeline_config(tmp_path, jsonl, codes_path)
  c.train.update(dict(steps=1, checkpoint_every=1, eval_every=0, log_every=1, async_checkpointing=False))
  from omni_jax.train import loop  # noqa: PLC0415

  workdir = str(tmp_path / "run")
  loop.run(c, workdir, lib.hooks(), devices=lib.one_device())
  # Re-encoded with another unit set: same files, other version.
  other = codes_lib.CodeIndex.load(codes_path)
  other.units_version = "unitsB"
  other.save(tmp_path / "codes_b.json")
  again = _pipeline_config(tmp_path, jsonl, tmp_path / "codes_b.json")
  again.train.update(dict(steps=2, checkpoint_every=1, async_checkpointing=False))
  with pytest.raises(codes_lib.UnitsMismatch, match="unitsA"):
    loop.run(again, workdir, lib.hooks(), devices=lib.one_device())


# --------------------------------------------------------------------------------------- adoption, FLOPs


def test_a_thinker_only_checkpoint_gets_a_fresh_talker_or_none(tmp_path):
  from omni_jax import checkpoint, towers  # noqa: PLC0415

  thinker_only = towers.without(lib.config(), "talker")
  assert "talker" not in thinker_only.model and "talker_codes" not in thinker_only.train.objectives
  checkpoint.save_config(str(tmp_path), thinker_only)
  # The config's Talker fits the stored Thinker (same width): it is kept, to start from scratch.
  kept = checkpoint.adopt_model_config(_talker_config(), str(tmp_path))
  assert "talker" in kept.model and [t.name for t in towers.built(kept)] == ["thinker", "talker"]
  # A Talker sized for another Thinker cannot ride on this one: left out with its objective, and valid.
  other = _talker_config()
  other.model.talker.embedding_size = 48
  dropped = checkpoint.adopt_model_config(other, str(tmp_path))
  assert "talker" not in dropped.model and "talker_codes" not in dropped.train.objectives
  towers.validate(dropped)


def test_mfu_counts_the_talker_rows():
  from omni_jax.train import metrics as metrics_lib  # noqa: PLC0415

  c = _talker_config()
  batch = _batch()
  counter = metrics_lib.FlopCounter(c)
  with_talker = counter.towers["talker"].step_flops(batch)
  t = c.model.talker.text
  per_token = 6 * (t.num_hidden_layers * (t.hidden_size * t.num_attention_heads * t.head_dim * 2
                                          + t.hidden_size * t.num_key_value_heads * t.head_dim * 2
                                          + 3 * t.hidden_size * t.intermediate_size)
                   + c.model.talker.embedding_size * t.hidden_size + t.hidden_size * t.vocab_size)
  rows, length = batch["talker_segment_ids"].shape
  assert with_talker >= rows * length * per_token
  no_talker = {k: v for k, v in batch.items() if not k.startswith("talker_")}
  assert counter.towers["talker"].step_flops(no_talker) == 0.0


def test_init_from_a_thinker_only_checkpoint_restores_the_thinker_and_starts_the_talker(tmp_path):
  from omni_jax import checkpoint, towers  # noqa: PLC0415
  from omni_jax.models import omni  # noqa: PLC0415
  from omni_jax.train import loop  # noqa: PLC0415

  thinker_only = towers.without(lib.config(), "talker")
  state = nnx.state(omni.OmniModel(thinker_only, rngs=nnx.Rngs(7)))
  checkpoint.save_params(str(tmp_path / "thinker"), state, thinker_only)
  c = _talker_config(steps=1, checkpoint_every=1, async_checkpointing=False, lr=0.0, warmup_steps=0)
  c.init_from = str(tmp_path / "thinker")
  loop.run(c, str(tmp_path / "run"), lib.hooks(), devices=lib.one_device())
  after = traverse_util.flatten_dict(checkpoint.restore_pure(str(tmp_path / "run" / "checkpoints" / "1"), None))
  before = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  for k, v in before.items():  # lr 0: the Thinker is exactly the checkpoint's
    np.testing.assert_array_equal(np.asarray(after[k]), np.asarray(v), err_msg=str(k))
  # ... and the Talker is the one a run from scratch starts with (the whole model's seeded initialisation).
  _, fresh, _ = omni.create_sharded(c, lib.mesh_of(dict(data=1)))
  fresh = {k: v for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(fresh)).items() if k[0] == "talker"}
  assert fresh
  for k, v in fresh.items():
    np.testing.assert_array_equal(np.asarray(after[k]), np.asarray(v), err_msg=str(k))

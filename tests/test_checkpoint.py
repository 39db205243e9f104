"""Train-state checkpoints: resharding on restore, preservation policy, the data-iterator item, paths."""

import os

import jax
import numpy as np
import pytest
from flax import traverse_util

import train_testlib as lib
from omni_jax import checkpoint
from omni_jax.input.synthetic import SyntheticSource
from omni_jax.train import state as state_lib


def _save(ckpt, step, state, data=None):
  ckpt.save(step, state.params, dict(step=state.step, opt_state=state.opt_state, rng=state.rng), data)


def _restore(ckpt, step, setup, data=None):
  target = setup.abstract_with_shardings()
  params, train = ckpt.restore(step, target.params, dict(step=target.step, opt_state=target.opt_state,
                                                         rng=target.rng), data)
  return state_lib.TrainState(params=params, **train)


def test_save_on_fsdp8_restore_on_fsdp4_tensor2(tmp_path):
  c = lib.config()
  fsdp8 = lib.mesh_of(dict(data=1, fsdp=8))
  _, _, state, setup8 = lib.train_steps(c, fsdp8, 2)
  source = SyntheticSource(batch_size=8, seq_len=32, vocab_size=256)
  source.set_state({"next_batch": 2})
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path / "ckpt"))
  _save(ckpt, 2, state, source)
  ckpt.wait()
  saved = jax.device_get(state)
  next_loss8 = lib.train_steps(c, fsdp8, 1, state=state)[0]

  mesh = lib.mesh_of(dict(data=1, fsdp=4, tensor=2))
  setup = state_lib.Setup(c, mesh)
  fresh = SyntheticSource(batch_size=8, seq_len=32, vocab_size=256)
  restored = _restore(ckpt, 2, setup, fresh)
  ckpt.close()
  assert fresh.get_state() == {"next_batch": 2}
  assert int(restored.step) == 2
  np.testing.assert_array_equal(np.asarray(restored.rng), saved.rng)
  flat = traverse_util.flatten_dict(restored.params)
  ref = traverse_util.flatten_dict(saved.params)
  shardings = traverse_util.flatten_dict(setup.param_shardings)
  for k, v in flat.items():
    assert np.array_equal(np.asarray(v), ref[k]), k
    assert v.sharding == shardings[k], k  # landed in the new mesh's layout
  for a, b in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(saved.opt_state)):
    assert np.array_equal(np.asarray(a), b)
  next_loss = lib.train_steps(c, mesh, 1, state=restored)[0]
  np.testing.assert_allclose(next_loss, next_loss8, rtol=1e-5)
  # ... and onto a single device (another device count).
  one = state_lib.Setup(c, lib.mesh_of(dict(data=1)))
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path / "ckpt"))
  single = _restore(ckpt, 2, one)
  ckpt.close()
  for k, v in traverse_util.flatten_dict(single.params).items():
    assert np.array_equal(np.asarray(v), ref[k]) and len(v.sharding.device_set) == 1, k


def test_keeps_the_latest_n_plus_every_kth(tmp_path):
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path), keep=2, keep_every=4, async_save=False)
  for step in range(1, 11):
    ckpt.save(step, {"w": np.full(3, step, np.float32)}, {"step": np.int32(step)})
  ckpt.close()
  assert sorted(checkpoint.TrainCheckpointer(str(tmp_path)).all_steps()) == [4, 8, 9, 10]


def test_iterator_state_is_saved_per_process(tmp_path):
  source = SyntheticSource(batch_size=4, seq_len=16, vocab_size=64)
  for _ in range(3):
    next(source)
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path), async_save=False)
  ckpt.save(3, {"w": np.zeros(2, np.float32)}, {"step": np.int32(3)}, source)
  ckpt.close()
  assert os.path.exists(tmp_path / "3" / "data" / "process_0-of-1.json")
  again = SyntheticSource(batch_size=4, seq_len=16, vocab_size=64)
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path))
  ckpt.restore(3, {"w": jax.ShapeDtypeStruct((2,), np.float32)}, {"step": jax.ShapeDtypeStruct((), np.int32)},
               again)
  ckpt.close()
  np.testing.assert_array_equal(next(again)["input_ids"], next(source)["input_ids"])


def test_params_dir_accepts_converter_outputs_step_dirs_and_workdirs(tmp_path):
  state = {"thinker": {"w": np.arange(4, dtype=np.float32)}}
  checkpoint.save_params(str(tmp_path / "converted"), state)
  assert checkpoint.params_dir(str(tmp_path / "converted")) == str(tmp_path / "converted")
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path / "work" / "checkpoints"), async_save=False)
  for step in (5, 7):
    ckpt.save(step, state, {"step": np.int32(step)})
  ckpt.close()
  latest = str(tmp_path / "work" / "checkpoints" / "7")
  assert checkpoint.params_dir(str(tmp_path / "work")) == latest
  assert checkpoint.params_dir(str(tmp_path / "work" / "checkpoints")) == latest
  assert checkpoint.params_dir(latest) == latest
  out = checkpoint.restore_pure(latest, {"thinker": {"w": jax.ShapeDtypeStruct((4,), np.float32)}})
  np.testing.assert_array_equal(out["thinker"]["w"], state["thinker"]["w"])
  with pytest.raises(FileNotFoundError, match="no parameters checkpoint"):
    checkpoint.params_dir(str(tmp_path / "nothing"))


def test_synthetic_source_is_deterministic_and_row_addressable():
  full = SyntheticSource(batch_size=8, seq_len=32, vocab_size=256).batch(3)
  half = SyntheticSource(batch_size=8, seq_len=32, vocab_size=256, rows=(4, 8)).batch(3)
  for k in full:
    np.testing.assert_array_equal(full[k][4:], half[k])
  from omni_jax import batch as batch_lib
  batch_lib.check(full)
  assert (full["segment_ids"].max(axis=1) >= 2).all()  # packed: several documents per row
  other = SyntheticSource(batch_size=8, seq_len=32, vocab_size=256, split="eval").batch(3)
  assert not np.array_equal(full["input_ids"], other["input_ids"])


def test_the_array_handler_is_registered_without_a_warning(caplog):
  """Importing omni_jax.checkpoint registers the array handler without orbax's override warning (it led every
  run's log); a later registration by other code is left alone, and orbax still warns of that one."""
  import logging  # noqa: PLC0415

  import orbax.checkpoint as ocp  # noqa: PLC0415

  from omni_jax.checkpoint import arrays  # noqa: PLC0415

  threshold = lambda h: h._min_slice_bytes_for_replica_parallel  # noqa: E731  pylint: disable=protected-access
  ours = ocp.type_handlers.get_type_handler(jax.Array)
  assert threshold(ours) == arrays.REPLICA_PARALLEL_MIN_BYTES
  caplog.set_level(logging.WARNING)
  try:
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(), override=True)
    assert any("overriding" in r.getMessage() for r in caplog.records)  # orbax's warning, where it is not ours
    caplog.clear()
    level = logging.getLogger("absl").level
    arrays.register()
    assert not [r.getMessage() for r in caplog.records if "overriding" in r.getMessage()]
    assert threshold(ocp.type_handlers.get_type_handler(jax.Array)) == arrays.REPLICA_PARALLEL_MIN_BYTES
    assert logging.getLogger("absl").level == level  # given back
  finally:
    ocp.type_handlers.register_type_handler(jax.Array, ours, override=True)


def test_small_replicated_arrays_are_written_whole_and_large_ones_by_every_replica(tmp_path, caplog):
  """Replicated over the data axis, an array under arrays.REPLICA_PARALLEL_MIN_BYTES per replica is written
  by one replica, with no slicing program of its own to compile (orbax's default compiled one per shape); a
  larger one is still split among the replicas. Both restore bit-exact."""
  import logging  # noqa: PLC0415

  from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415

  from omni_jax.checkpoint import arrays  # noqa: PLC0415

  mesh = lib.mesh_of(dict(data=8))
  replicated = NamedSharding(mesh, PartitionSpec())
  # Shapes orbax can split 8 ways (a dimension a multiple of 8), each its own slicing program by default.
  tree = {f"small{i}": jax.device_put(np.arange(16 * (i + 1), dtype=np.float32).reshape(16, i + 1), replicated)
          for i in range(6)}
  rows = 8 * arrays.REPLICA_PARALLEL_MIN_BYTES // (4 * 1024)  # 8 replicas' slices of exactly the threshold
  tree["large"] = jax.device_put(np.arange(rows * 1024, dtype=np.float32).reshape(rows, 1024), replicated)
  caplog.set_level(logging.WARNING)
  with jax.log_compiles():
    checkpoint.save_params(str(tmp_path / "ckpt"), tree)
  slicing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling jit(slice)")]
  assert slicing and all(f"float32[{rows},1024]" in m for m in slicing), slicing
  target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated) for k, v in tree.items()}
  restored = checkpoint.restore_pure(str(tmp_path / "ckpt"), target)
  for k, v in tree.items():
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(v))

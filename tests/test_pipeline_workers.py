"""The pipeline with grain worker processes: same guarantees as in process (restore continues exactly)."""

import json

from test_pipeline import assert_same, config, take

from omni_jax.input import pipeline


def test_restore_with_two_workers_continues_exactly(demo_dir):
  """Workers decode and pack in parallel; the state (every worker's packer, waiting samples included) goes to
  JSON and back, and a new pair of workers continues with exactly the batches of the uninterrupted run."""
  cfg = config(demo_dir, worker_count=2, worker_buffer=1, max_lag=16,
               mixture=dict(asr=3.0, image=2.0, text=2.0))
  run = pipeline.make_iterator(cfg)
  head = take(run, 3)
  state = json.loads(json.dumps(run.get_state()))
  expected = take(run, 3)
  run.close()
  resumed = pipeline.make_iterator(cfg)
  resumed.set_state(state)
  assert_same(take(resumed, 3), expected)
  resumed.close()
  assert len(head) == 3

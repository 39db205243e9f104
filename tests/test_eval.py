"""eval.py on a converter-written checkpoint (loss equal to transformers') and on a training workdir."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import hf_reference as ref
import train_testlib as lib
from omni_jax.convert import cli
from omni_jax.evaluate import run as eval_run
from omni_jax.input.synthetic import SyntheticSource
from omni_jax.train import loop


def _hf_loss(model, batch):
  """Label-token loss and accuracy of a transformers model over the packed rows, one segment at a time."""
  nll, correct, count = 0.0, 0, 0
  for row in range(len(batch["input_ids"])):
    seg = batch["segment_ids"][row]
    for s in range(1, seg.max() + 1):
      ids = torch.tensor(batch["input_ids"][row][seg == s])[None]
      labels = batch["labels"][row][seg == s]
      with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double().numpy()
      logp = logits[:-1] - np.log(np.exp(logits[:-1]).sum(-1, keepdims=True))
      nll -= logp[np.arange(len(labels) - 1), labels[1:]].sum()
      correct += int((logits[:-1].argmax(-1) == labels[1:]).sum())
      count += len(labels) - 1
  return nll / count, correct / count


def test_eval_on_a_converted_checkpoint_matches_transformers(tmp_path):
  hf_model = ref.build_thinker("gqa4", seed=3)
  hf_model.save_pretrained(tmp_path / "hf")
  cli.main(["--hf_dir", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "orbax")])
  c = lib.config()  # a different model (vocab 256): eval uses the architecture stored with the checkpoint
  c.eval.batch_size = 4
  report = eval_run.run(c, str(tmp_path / "orbax"), str(tmp_path / "report.json"))
  assert json.load(open(tmp_path / "report.json")) == report
  m = report["metrics"]
  batch = SyntheticSource(batch_size=4, seq_len=32, vocab_size=160, split="eval").batch(0)
  loss, accuracy = _hf_loss(hf_model, batch)
  np.testing.assert_allclose(m["eval/loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(m["eval/accuracy"], accuracy)
  np.testing.assert_allclose(m["eval/ppl"], np.exp(loss), rtol=1e-5)
  assert m["eval/loss_text"] == m["eval/loss"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard_eval"))


@pytest.mark.slow
def test_eval_py_on_a_training_workdir(tmp_path):
  workdir = tmp_path / "work"
  loop.run(lib.config(steps=3, eval_every=3), str(workdir), lib.hooks())
  cmd = [sys.executable, os.path.join(lib.ROOT, "eval.py"), "--checkpoint", str(workdir), *lib.flags()]
  out = subprocess.run(cmd, cwd=lib.ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.load(open(workdir / "eval" / "eval_step3.json"))
  assert report["step"] == 3 and report["devices"] == 8
  # The standalone job and the in-loop evaluation at step 3 see the same data and parameters.
  in_loop = [json.loads(l) for l in open(workdir / "metrics.jsonl") if "eval/loss" in l][-1]
  np.testing.assert_allclose(report["metrics"]["eval/loss"], in_loop["eval/loss"], rtol=1e-6)
  np.testing.assert_allclose(report["metrics"]["eval/accuracy"], in_loop["eval/accuracy"])
  assert "eval/ppl " in out.stdout  # a row of the summary table

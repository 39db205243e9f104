"""bench/fit_table.py: a grid recompiled in part replaces its own rows of the docs table and keeps the others."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import fit_table  # noqa: E402  (standard library only)


def _report(step_s, mfu, total_gib=10.0):
  return dict(mesh={"fsdp": 64}, batch={"input_ids": [64, 8192]}, error=None, fits=True,
              memory=dict(total=total_gib * 2 ** 30, capacity=95 * 2 ** 30),
              roofline=dict(step_s=step_s, mfu=mfu, bound="compute"))


def _row(model, remat, step_s, mfu, extra=""):
  return dict(model=model, seq=8192, remat=remat, topology="v5p:4x4x4", talker=False, extra=extra,
              status="ok", report=_report(step_s, mfu), seconds=60.0)


def test_write_docs_replaces_the_rows_it_recompiled_and_keeps_the_others(tmp_path):
  old = fit_table.render([_row("3b", "full", 1.0, 0.40), _row("3b", "dots", 2.0, 0.20), _row("7b", "full", 3.0, 0.30)])
  doc = tmp_path / "performance.md"
  doc.write_text(f"intro\n\n{fit_table.BEGIN}\n{old}\n{fit_table.END}\n\nafter\n")
  recompiled = [_row("3b", "full", 0.9, 0.45),  # the same configuration: replaced in its place
                _row("7b", "full", 2.5, 0.50, extra="--config.model.attention_impl=auto")]  # a new one: appended
  fit_table.write_docs(fit_table.render(recompiled), str(doc))
  text = doc.read_text()
  assert text.startswith("intro\n\n") and text.endswith(f"{fit_table.END}\n\nafter\n")
  rows = [line for line in text.splitlines() if line.startswith("| 3B") or line.startswith("| 7B")]
  assert [fit_table._row_id(r)[:4] for r in rows] == [
      ("3B Thinker", "8192", "dots", "dense"), ("3B Thinker", "8192", "full", "dense"),
      ("7B Thinker", "8192", "full", "dense"), ("7B Thinker", "8192", "full", "auto")]
  assert "| 2.00 | 20% |" in rows[0] and "| 0.90 | 45% |" in rows[1] and "| 3.00 | 30% |" in rows[2]
  assert "| 2.50 | 50% |" in rows[3]
  assert text.count("| model | seq |") == 1  # one header

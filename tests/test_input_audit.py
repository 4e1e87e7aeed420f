"""The bad-input audit (tools/input_audit.py): every case that needs no training run gives a one-line
error or a checked correct result, never a silent wrong result or a crash."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_bad_input_is_silent_or_crashes():
  spec = importlib.util.spec_from_file_location("input_audit", os.path.join(ROOT, "tools", "input_audit.py"))
  audit = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(audit)
  rows = audit.audit(fast_only=True)
  assert len(rows) >= 40
  bad = [f"{r['case']}: {r['verdict']}: {r['message']}" for r in rows if r["verdict"] in ("silent", "crash")]
  assert not bad, "\n".join(bad)
  assert all("\n" not in r["message"] for r in rows)

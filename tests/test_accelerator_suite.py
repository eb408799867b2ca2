"""benchmarks.accelerator_suite --tiny on CPU, in subprocesses: every part
reports, nothing imports TFDS, and a part killed by its time cap is recorded
as 'timeout' while the other parts' figures survive.

The module is run, never imported here (its absl flags would clash with the
experiments' in this process)."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, *flags, timeout=240):
  cmd = [sys.executable, "-m", "benchmarks.accelerator_suite", "--tiny",
         f"--workdir={workdir}", *flags]
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep +
             os.environ.get("PYTHONPATH", ""))
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=timeout)
  with open(os.path.join(workdir, "accelerator_suite.json")) as f:
    return r, json.load(f)


def _positive(x, what):
  assert isinstance(x, (int, float)) and math.isfinite(x) and x > 0, (
      what, x)


def _no_tensorflow(entry, part):
  assert entry["tensorflow_modules"] == [], (part, entry["tensorflow_modules"])


@pytest.mark.slow
def test_tiny_suite_reports_every_part(tmp_path):
  r, summary = _run(tmp_path)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  parts = summary["parts"]
  assert list(parts) == ["search_tau0", "search_tau200", "family_finetune",
                         "latency"]
  assert summary["device_kind"] == "cpu" and summary["jax_version"]
  assert summary["provenance"]["packages"]["jax"] == summary["jax_version"]
  for name, e in parts.items():
    assert e["status"] == "ok", (name, e)
    _positive(e["seconds"], (name, "seconds"))
    _no_tensorflow(e, name)
    # CPU: no memory statistics, said so
    assert e["peak_bytes_in_use"] is None and e["memory_note"], e

  tau0 = parts["search_tau0"]
  assert tau0["evaluations"] == 16 and "random" in tau0["data"]
  assert set(tau0["runs"]) == {"8"} and tau0["best_k"] == 8
  for k, run in tau0["runs"].items():
    for key in ("wall_s", "search_time_s", "unique", "rounds"):
      _positive(run[key], (k, key))
    assert (run["unique"] + run["memoized"] + run["infeasible"]
            == tau0["evaluations"]), run
    assert run["masked_batch_sizes"] and max(run["masked_batch_sizes"]) <= 8
  _positive(tau0["best_wall_s"], "best_wall_s")

  tau = parts["search_tau200"]
  assert tau["k"] == 8 and tau["tau_hat"] == 2 and tau["steady"]
  assert [x["evaluated"] for x in tau["rounds"]] == [8, 8]
  for key in ("s_per_candidate", "projected_search_s",
              "projected_search_with_memo_s"):
    _positive(tau[key], key)
  assert "goal_met" not in tau   # tiny: no verdict on the GPU goals

  fam = parts["family_finetune"]
  assert fam["steps"] == 3 and len(fam["budgets"]) == 3
  for key in ("sequential_s", "parallel_s", "parallel_over_sequential"):
    _positive(fam[key], key)
  assert fam["faster"] in ("parallel", "sequential")

  lat = parts["latency"]
  assert 0 < lat["flops_fraction"] <= 0.47
  assert lat["sliced_macs"] < lat["unpruned_macs"]
  rows = {(x["dtype"], x["batch"]): x for x in lat["rows"]}
  assert set(rows) == {(d, b) for d in ("float32", "bfloat16")
                       for b in (1, 8)}
  for key, row in rows.items():
    for f in ("unpruned_ms", "sliced_ms", "sliced_over_unpruned"):
      _positive(row[f], (key, f))

  for line in ("search_tau0      ok", "search_tau200    ok",
               "family_finetune  ok", "latency          ok",
               "goal: 400 candidates at tau_hat = 0 in under 1 minute"):
    assert line in r.stdout, line


def test_part_timeout_is_recorded_and_other_parts_survive(tmp_path):
  r, summary = _run(tmp_path, "--parts=family_finetune,latency",
                    "--part_timeouts=latency=1")
  assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
  family, latency = (summary["parts"][p] for p in ("family_finetune",
                                                   "latency"))
  assert family["status"] == "ok", family
  _no_tensorflow(family, "family_finetune")
  assert latency["status"] == "timeout", latency
  assert "killed after 1 s" in latency["message"]
  assert latency["seconds"] < 30
  assert "latency          timeout" in r.stdout
  # the table is printed again from the JSON alone
  t = subprocess.run(
      [sys.executable, "-m", "benchmarks.accelerator_suite",
       f"--workdir={tmp_path}", "--table_only"], cwd=ROOT,
      capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert t.returncode == 0, t.stderr[-3000:]
  assert "latency          timeout" in t.stdout

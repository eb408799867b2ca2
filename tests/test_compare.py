"""experiments.compare end to end on a tiny digits setting: four methods
(one with options, LeGR's learn stage included) at one budget and two seeds,
the report, the resume. (Every method runs through the same family path;
each is tested on its own in test_methods.py.)"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "experiments.compare",
                         *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900)


@pytest.mark.slow
def test_compare_end_to_end_and_resume(tmp_path):
  wd = str(tmp_path / "cmp")
  names = ["l2", "l2@aggregate=mean", "random", "legr"]
  args = (f"--workdir={wd}", f"--methods={','.join(names)}", "--budget=0.5",
          "--seeds=0,1",
          "--baseline_epochs=2", "--epochs=1", "--legr_evaluations=6",
          "--legr_population=4", "--legr_sample=2", "--noprogress")
  r = _run(*args)
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.load(open(os.path.join(wd, "comparison.json")))
  rows = report["rows"]
  assert [r["method"] for r in rows] == names * 2   # two seeds
  for row in rows:
    assert row["flops_fraction"] <= 0.5
    assert row["test_split"] == "test"
    for key in ("val_accuracy_pruned", "test_accuracy_pruned",
                "val_accuracy", "test_accuracy"):
      assert 0.0 <= row[key] <= 1.0
    assert row["latency_ms"] > 0 and row["method_seconds"] >= 0
  md = open(os.path.join(wd, "comparison.md")).read()
  for name in names:
    assert f"| flops:0.5 | {name} |" in md
  assert "±" in md                                  # mean ± std over seeds
  assert os.path.getsize(os.path.join(wd, "comparison.png")) > 1000
  # the seeds differ where a method is random, the baseline is shared
  rnd = [r for r in rows if r["method"] == "random"]
  assert rnd[0]["widths"] != rnd[1]["widths"]
  # rerun: everything is reused
  r2 = _run(*args)
  assert r2.returncode == 0, r2.stderr[-3000:]
  assert (r2.stdout + r2.stderr).count("nothing to do") >= 2 * len(names)
  again = json.load(open(os.path.join(wd, "comparison.json")))["rows"]
  assert ([r["test_accuracy"] for r in again] ==
          [r["test_accuracy"] for r in rows])


def test_bad_flags_are_refused_before_anything_is_written(tmp_path):
  wd = tmp_path / "nothing"
  for bad in ("--methods=l2,nope", "--budget=1.5", "--seeds=a",
              "--legr_population=500"):
    r = _run(f"--workdir={wd}", bad)
    assert r.returncode != 0, bad
    assert bad.split("=")[0] in r.stderr, (bad, r.stderr[-500:])
    assert not wd.exists()


def test_paired_difference_matches_scipys_paired_t_test():
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scipy import stats  # pylint: disable=g-import-not-at-top
  from experiments import compare  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a, b = rng.uniform(0.4, 0.7, 3), rng.uniform(0.4, 0.7, 3)
  mean, se = compare.paired_difference(a, b)
  t = stats.ttest_rel(a, b).statistic
  assert np.isclose(mean, np.mean(a - b))
  assert np.isclose(mean / se, t)
  assert compare.verdict(0.05, 0.02) == "beats"
  assert compare.verdict(-0.05, 0.02) == "loses"
  assert compare.verdict(0.03, 0.02) == "tie"
  assert compare.paired_difference([0.5], [0.4])[1] is None


def test_report_pairs_methods_with_the_baselines_by_seed(tmp_path):
  from experiments import compare  # pylint: disable=g-import-not-at-top
  rows = []
  accs = {"uniform": [0.60, 0.62, 0.61], "l2": [0.50, 0.55, 0.52],
          "legr": [0.70, 0.72, 0.69]}
  for name, values in accs.items():
    for seed, acc in enumerate(values):
      rows.append({"method": name, "seed": seed, "budget": 0.3,
                   "budget_metric": "flops", "test_accuracy": acc})
  baseline = {"val_accuracy": 0.7, "test_accuracy": 0.7, "latency_ms": 1.0,
              "latency_batch": 8, "device_kind": "cpu"}
  table = compare.write_report(str(tmp_path), rows, ["# t"], baseline)
  legr_line = next(l for l in table.splitlines()
                   if l.startswith("| flops:0.3 | legr |") and "vs" not in l
                   and ("beats" in l or "tie" in l or "loses" in l))
  # legr - uniform = +0.0933 (all three seeds higher): beats both
  assert legr_line.count("beats") == 2 and "+0.0933" in legr_line
  l2_line = next(l for l in table.splitlines()
                 if l.startswith("| flops:0.3 | l2 |") and "loses" in l)
  assert "-0.0867" in l2_line

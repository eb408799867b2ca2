"""experiments.prune end to end on digits: pruned family + Pareto set."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("base"))
  r = _run("experiments.train", f"--workdir={wd}", "--epochs=2")
  assert r.returncode == 0, r.stderr[-2000:]
  return wd


@pytest.mark.slow
def test_prune_family_and_pareto_set(baseline, tmp_path):
  from legr_jax import pareto  # pylint: disable=g-import-not-at-top
  wd = str(tmp_path / "pruned")
  r = _run("experiments.prune", f"--checkpoint={baseline}", f"--workdir={wd}",
           "--budgets=0.4,0.7", "--epochs=1")
  assert r.returncode == 0, r.stderr[-2000:]
  summary = json.load(open(os.path.join(wd, "summary.json")))
  fracs = [m["flops_fraction"] for m in summary["members"]]
  assert fracs[0] <= 0.4 and 0.4 < fracs[1] <= 0.7
  loaded = pareto.load(os.path.join(wd, "pareto"))
  assert [m["budget"] for _, _, m in loaded] == [0.4, 0.7]
  # each stored network's own cost equals the recorded figure
  from legr_jax import cost  # pylint: disable=g-import-not-at-top
  for net, _, metrics in loaded:
    assert cost.unpruned(net.spec) == metrics["flops"]
  # rerunning resumes: finished fine-tuning runs are not redone
  r2 = _run("experiments.prune", f"--checkpoint={baseline}",
            f"--workdir={wd}", "--budgets=0.4,0.7", "--epochs=1")
  assert r2.returncode == 0, r2.stderr[-2000:]
  assert "nothing to do" in r2.stdout + r2.stderr


@pytest.mark.slow
def test_missing_ranking_is_a_clear_error(baseline, tmp_path):
  r = _run("experiments.prune", f"--checkpoint={baseline}",
           f"--workdir={tmp_path}", f"--ranking={tmp_path}/nope")
  assert r.returncode != 0
  assert "learn_ranking" in r.stderr


@pytest.mark.slow
def test_round_to_gives_aligned_widths(baseline, tmp_path):
  from legr_jax import models  # pylint: disable=g-import-not-at-top
  wd = str(tmp_path / "aligned")
  r = _run("experiments.prune", f"--checkpoint={baseline}", f"--workdir={wd}",
           "--budgets=0.5", "--epochs=0", "--round_to=8")
  assert r.returncode == 0, r.stderr[-2000:]
  summary = json.load(open(os.path.join(wd, "summary.json")))
  assert summary["round_to"] == 8
  assert summary["members"][0]["flops_fraction"] <= 0.5
  base = models.from_config(json.load(open(os.path.join(baseline,
                                                        "net.json"))))
  sizes = {g.name: g.size for g in base.spec.groups}
  from legr_jax import pareto  # pylint: disable=g-import-not-at-top
  (small, _, _), = pareto.load(os.path.join(wd, "pareto"))
  widths = {g.name: g.size for g in small.spec.groups}
  assert any(widths[g] < sizes[g] for g in sizes)   # something was pruned
  for g, w in widths.items():
    if sizes[g] % 8 == 0:
      assert w % 8 == 0, (g, w)

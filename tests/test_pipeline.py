"""The README's main job (experiments.legr_pipeline), small and offline."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_pipeline_end_to_end_and_resume(tmp_path):
  wd = str(tmp_path / "legr")
  cmd = [sys.executable, "-m", "experiments.legr_pipeline", f"--workdir={wd}",
         "--epochs=2", "--generations=8", "--population=4", "--sample=2",
         "--finetune_epochs=1", "--budgets=0.4,0.7", "--target_flops=0.4"]
  env = dict(os.environ, PYTHONPATH=ROOT)
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  ranking = json.load(open(os.path.join(wd, "ranking", "ranking.json")))
  assert set(ranking["layers"]) == {"conv0", "conv1", "conv2", "conv3"}
  summary = json.load(open(os.path.join(wd, "pruned", "summary.json")))
  assert summary["ranking"].endswith("ranking")
  assert [m["budget"] for m in summary["members"]] == [0.4, 0.7]
  for m in summary["members"]:
    assert m["flops_fraction"] <= m["budget"]
    assert 0.0 <= m["test_accuracy"] <= 1.0
  assert os.path.exists(os.path.join(wd, "pruned", "pareto", "pareto.json"))
  # the same command again resumes every stage without redoing work
  r2 = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                      timeout=900)
  assert r2.returncode == 0, r2.stderr[-3000:]
  assert "nothing to do" in r2.stdout + r2.stderr

"""experiments/colab_tpu.ipynb: its code cells run on CPU with tiny
settings, offline.

The cells are read with ``json`` (no nbformat/nbclient needed) and run as
one script in a subprocess, as a kernel would run them in order. The install
cell runs too, but installs nothing and downloads nothing: ``LEGR_SOURCE``
names this checkout (a folder: used in place) and ``LEGR_SKIP_INSTALL=1``
skips pip. Tiny settings are assignments appended to the settings cell (the
variables the notebook defines there).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab_tpu.ipynb")

TINY = """
WORKDIR = {workdir!r}
PRESET = ""
PIPELINE_FLAGS = ["--epochs=1", "--generations=2", "--population=2",
                  "--sample=1", "--finetune_epochs=0", "--target_flops=0.5",
                  "--budgets=0.5,0.7", "--cpu_kernels=off"]
PREPARE_TFDS = ""
"""


def code_cells():
  with open(NOTEBOOK, encoding="utf-8") as f:
    nb = json.load(f)
  assert nb["nbformat"] == 4
  return ["".join(c["source"]) for c in nb["cells"]
          if c["cell_type"] == "code"]


def test_notebook_cells_are_plain_python():
  cells = code_cells()
  assert len(cells) >= 4
  for i, src in enumerate(cells):
    compile(src, f"cell {i}", "exec")   # no IPython magics or shell escapes
  install, settings = cells[0], cells[1]
  assert re.search(r"^LEGR_SOURCE = ", install, re.M)
  assert "pip" in install and "LEGR_SKIP_INSTALL" in install
  for name in ("WORKDIR", "PRESET", "PIPELINE_FLAGS", "PREPARE_TFDS"):
    assert re.search(rf"^{name} = ", settings, re.M), name
  rest = "\n".join(cells[2:])
  assert "experiments.legr_pipeline" in rest and "jax.devices()" in rest
  assert "savefig" in rest


def _run(script, env_extra, cwd, timeout=600):
  env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu",
             **env_extra)
  return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_install_cell_unpacks_an_uploaded_archive(tmp_path):
  """An archive of the repository (one top folder, as GitHub's zip) is
  unpacked into SRC_DIR; nothing is installed (LEGR_SKIP_INSTALL=1)."""
  archive = tmp_path / "legr_jax-main.zip"
  with zipfile.ZipFile(archive, "w") as z:
    z.writestr("legr_jax-main/pyproject.toml", "[project]\nname='x'\n")
    z.writestr("legr_jax-main/experiments/legr_pipeline.py", "")
  src_dir = tmp_path / "content" / "legr_jax"
  install = re.sub(r"^SRC_DIR = .*$", f"SRC_DIR = {str(src_dir)!r}",
                   code_cells()[0], count=1, flags=re.M)
  r = _run(install, {"LEGR_SOURCE": str(archive), "LEGR_SKIP_INSTALL": "1"},
           cwd=tmp_path, timeout=60)
  assert r.returncode == 0, r.stderr
  assert (src_dir / "experiments" / "legr_pipeline.py").exists()
  assert f"legr_jax source: {src_dir}" in r.stdout
  assert "pip" not in r.stdout


@pytest.mark.slow
def test_notebook_runs_on_cpu_with_tiny_settings(tmp_path):
  cells = code_cells()
  workdir = tmp_path / "legr"
  script = "\n\n".join([cells[0], cells[1] + TINY.format(
      workdir=str(workdir))] + cells[2:])
  r = _run(script, {"LEGR_SOURCE": ROOT, "LEGR_SKIP_INSTALL": "1"},
           cwd=tmp_path)
  out = r.stdout + r.stderr
  assert r.returncode == 0, out[-5000:]
  assert f"legr_jax source: {ROOT}" in r.stdout
  assert "jax.devices(): [CpuDevice" in r.stdout
  assert "pip install" not in out and "git clone" not in out
  plot = workdir / "accuracy_vs_flops.png"
  assert plot.exists()
  with open(plot, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert (workdir / "pruned" / "pareto" / "pareto.png").exists()
  shutil.rmtree(workdir)

"""Packaging: the wheel / sdist built from pyproject.toml, and a light import.

The builds run on a copy of the checkout in a temporary directory (so no
build/ or *.egg-info lands in the work tree) with the environment's own
setuptools (`pip wheel --no-build-isolation`, offline); without setuptools
>= 77 (SPDX license expressions) or pip they are skipped.
"""

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import legr_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "legr_jax"
HEAVY = ("tensorflow", "tensorflow_datasets", "orbax")
_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "workdirs", "tmp",
                                 "build", "dist", "*.egg-info", "__pycache__",
                                 ".pytest_cache", "*.pyc")


def _build_skip_reason() -> str | None:
  if importlib.util.find_spec("pip") is None:
    return "pip is not installed"
  # (the version from its metadata: importing setuptools into a process
  # that has already imported distutils fails)
  try:
    version = importlib.metadata.version("setuptools")
  except importlib.metadata.PackageNotFoundError:
    return "setuptools is not installed (pip install 'setuptools>=77')"
  if int(re.match(r"\d+", version).group()) < 77:
    return (f"setuptools {version} < 77 cannot build pyproject.toml "
            "(pip install 'setuptools>=77')")
  return None


needs_build = pytest.mark.skipif(_build_skip_reason() is not None,
                                 reason=str(_build_skip_reason()))


def _source_files(pattern: str) -> list[str]:
  """Paths (relative to the repository root) of package files."""
  return sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob(pattern)
                if "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
  dst = tmp_path_factory.mktemp("src") / "legr_jax_src"
  shutil.copytree(ROOT, dst, ignore=_IGNORE)
  return dst


@pytest.fixture(scope="module")
def wheel(source_copy, tmp_path_factory):
  out = tmp_path_factory.mktemp("wheel")
  r = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
       "--no-build-isolation", "-q", "-w", str(out), str(source_copy)],
      capture_output=True, text=True, timeout=600, check=False)
  assert r.returncode == 0, r.stdout + r.stderr
  wheels = list(out.glob("legr_jax-*.whl"))
  assert len(wheels) == 1, list(out.iterdir())
  return wheels[0]


@pytest.mark.slow
@needs_build
def test_wheel_contents(wheel):
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    dist_info = f"legr_jax-{legr_jax.__version__}.dist-info"
    metadata = z.read(f"{dist_info}/METADATA").decode()
  # the C++ sources compiled at run time by legr_jax/cpu/kernels.py
  csrc = _source_files("cpu/csrc/*.cc") + _source_files("cpu/csrc/*.h")
  assert any(p.endswith(".cc") for p in csrc), csrc
  assert any(p.endswith(".h") for p in csrc), csrc
  assert set(csrc) <= names, sorted(set(csrc) - names)
  # every module of the package (a folder without __init__.py is skipped)
  py = _source_files("*.py")
  assert set(py) <= names, sorted(set(py) - names)
  # nothing but the package and its metadata
  tops = {n.split("/")[0] for n in names}
  assert tops == {"legr_jax", dist_info}, tops
  assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
  assert f"{dist_info}/licenses/LICENSE" in names

  fields = [line.split(": ", 1) for line in metadata.splitlines()
            if ": " in line]
  assert ["Name", "legr_jax"] in fields
  assert ["Version", legr_jax.__version__] in fields
  assert ["License-Expression", "Apache-2.0"] in fields
  requires = [v for k, v in fields if k == "Requires-Dist"]
  core = [r for r in requires if "extra ==" not in r]
  core_names = {re.match(r"[A-Za-z0-9_.-]+", r).group().lower()
                for r in core}
  assert {"jax", "flax", "optax", "orbax-checkpoint", "chex", "numpy",
          "absl-py"} <= core_names, core
  assert not any("==" in r.split(";")[0] for r in requires), requires
  assert any(r.startswith("tensorflow-datasets") and "extra" in r
             for r in requires), requires


@pytest.mark.slow
@needs_build
def test_installed_wheel_finds_its_kernel_sources(wheel, tmp_path):
  """The wheel unpacked as site-packages: kernels.py's sources are there."""
  site = tmp_path / "site"
  with zipfile.ZipFile(wheel) as z:
    z.extractall(site)
  code = ("import json, sys, legr_jax, legr_jax.cpu.kernels as k\n"
          "assert legr_jax.__file__.startswith(sys.argv[1]), legr_jax.__file__\n"
          "files = [str(p) for p in (*k.SOURCES, *k.HEADERS)]\n"
          "print(json.dumps({'missing': [f for f in files\n"
          "  if not __import__('os').path.isfile(f)], 'n': len(files)}))\n")
  env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path,
                     env=env, capture_output=True, text=True, timeout=300,
                     check=False)
  assert r.returncode == 0, r.stderr
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert got["missing"] == [] and got["n"] > 0, got


@pytest.mark.slow
@needs_build
def test_sdist_contents(source_copy, tmp_path):
  code = ("import sys; from setuptools import build_meta\n"
          "print(build_meta.build_sdist(sys.argv[1]))\n")
  r = subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                     cwd=source_copy, capture_output=True, text=True,
                     timeout=600, check=False)
  assert r.returncode == 0, r.stdout + r.stderr
  sdist = tmp_path / r.stdout.strip().splitlines()[-1]
  with tarfile.open(sdist) as t:
    names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
  csrc = _source_files("cpu/csrc/*.cc") + _source_files("cpu/csrc/*.h")
  wanted = {"pyproject.toml", "LICENSE", "README.md", *csrc,
            *_source_files("*.py")}
  assert wanted <= names, sorted(wanted - names)


def _run(code: str, tmp_path) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                     capture_output=True, text=True, timeout=300, check=False)
  assert r.returncode == 0, r.stderr
  return json.loads(r.stdout.strip().splitlines()[-1])


_HEAVY_LOADED = (
    f"heavy = lambda: sorted(m for m in sys.modules\n"
    f"                       if m.split('.')[0] in {HEAVY!r})\n")


@pytest.mark.parametrize("stmt", ["import legr_jax",
                                  "import legr_jax.ranking",
                                  "from legr_jax import cost, models, ranking"])
def test_import_is_light(stmt, tmp_path):
  code = (f"import json, sys\n{stmt}\n{_HEAVY_LOADED}"
          "print(json.dumps({'heavy': heavy(),\n"
          "  'lazy_loaded': sorted(m for m in ('surgery', 'pareto', 'data',\n"
          "      'train', 'search', 'provenance')\n"
          "      if 'legr_jax.' + m in sys.modules)}))\n")
  got = _run(code, tmp_path)
  assert got == {"heavy": [], "lazy_loaded": []}, got


def test_lazy_attributes(tmp_path):
  code = (f"import json, sys\nimport legr_jax\n{_HEAVY_LOADED}"
          "names = dir(legr_jax)\n"
          "surgery = legr_jax.surgery\n"  # light: no orbax either
          "after_surgery = heavy()\n"
          "pareto = legr_jax.pareto\n"    # pareto stores with orbax
          "try:\n"
          "  legr_jax.no_such_thing\n"
          "  missing = 'no error'\n"
          "except AttributeError as e:\n"
          "  missing = str(e)\n"
          "print(json.dumps({\n"
          "  'dir': names,\n"
          "  'surgery': surgery is sys.modules['legr_jax.surgery'],\n"
          "  'slice': hasattr(surgery, 'slice_network'),\n"
          "  'after_surgery': after_surgery,\n"
          "  'pareto': pareto is sys.modules['legr_jax.pareto'],\n"
          "  'orbax_after_pareto': 'orbax' in sys.modules,\n"
          "  'missing': missing,\n"
          "  'version': legr_jax.__version__}))\n")
  got = _run(code, tmp_path)
  for name in ("models", "cost", "ranking", "surgery", "pareto", "data",
               "train", "search", "ops", "cpu", "provenance",
               "masks_for_budget", "__version__"):
    assert name in got["dir"], name
  assert got["surgery"] and got["slice"]
  assert got["after_surgery"] == []
  assert got["pareto"] and got["orbax_after_pareto"]
  assert "no_such_thing" in got["missing"]
  assert got["version"] == legr_jax.__version__


def test_star_import_is_light(tmp_path):
  code = (f"import json, sys\nfrom legr_jax import *\n{_HEAVY_LOADED}"
          "print(json.dumps({'heavy': heavy(),\n"
          "                  'ranking': 'masks_for_budget' in dir()}))\n")
  assert _run(code, tmp_path) == {"heavy": [], "ranking": True}


@pytest.mark.parametrize("name", ["cpu", "data", "ops", "pareto",
                                  "provenance", "search", "surgery", "train"])
def test_every_lazy_submodule_imports(name):
  import importlib  # pylint: disable=import-outside-toplevel
  assert getattr(legr_jax, name) is importlib.import_module(
      f"legr_jax.{name}")

"""legr_jax.provenance: what a run ran on."""

import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import pytest

import legr_jax
from legr_jax import provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "legr_jax"


def _git(*args, cwd=ROOT):
  return subprocess.run(["git", *args], cwd=cwd, capture_output=True,
                        text=True, check=True).stdout.strip()


def _in_checkout() -> bool:
  if shutil.which("git") is None:
    return False
  r = subprocess.run(["git", "ls-files", "--error-unmatch", "__init__.py"],
                     cwd=PACKAGE, capture_output=True, check=False)
  return r.returncode == 0


def _copy_package(dst: pathlib.Path) -> pathlib.Path:
  shutil.copytree(PACKAGE, dst / "legr_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  return dst / "legr_jax"


def test_collect_fields():
  r = provenance.collect()
  json.dumps(r)  # JSON-serializable as is
  assert r["legr_jax_version"] == legr_jax.__version__
  assert r["python"].startswith(f"{sys.version_info.major}."
                                f"{sys.version_info.minor}")
  assert r["packages"]["jax"] == importlib.metadata.version("jax")
  assert r["packages"]["jaxlib"] == importlib.metadata.version("jaxlib")
  assert set(provenance.PACKAGES) <= set(r["packages"])
  assert r["jax_backend"] == jax.default_backend()
  assert r["device_count"] == jax.device_count()
  assert r["device_kind"] == sorted({d.device_kind for d in jax.devices()})
  assert r["process_count"] == jax.process_count()
  assert r["machine"]
  assert set(r["cpu_isa"]) == set(provenance.ISA_FLAGS)
  assert all(v in (True, False, None) for v in r["cpu_isa"].values())
  if r["machine"] in ("x86_64", "AMD64"):
    assert r["cpu_isa"]["neon"] in (False, None)
  assert all(k.startswith(provenance.ENV_PREFIXES) for k in r["env"])


def test_collect_given_devices():
  r = provenance.collect(devices=jax.devices()[:1])
  assert r["device_count"] == 1
  assert r["device_kind"] == [jax.devices()[0].device_kind]
  assert r["jax_backend"] == jax.devices()[0].platform


def test_env_recorded(monkeypatch):
  monkeypatch.setenv("LEGR_PROVENANCE_TEST", "1")
  monkeypatch.setenv("PROVENANCE_UNRELATED", "x")
  env = provenance.collect()["env"]
  assert env["LEGR_PROVENANCE_TEST"] == "1"
  assert "PROVENANCE_UNRELATED" not in env


@pytest.mark.skipif(not _in_checkout(),
                    reason="legr_jax is not imported from a git checkout")
def test_commit_of_this_checkout():
  r = provenance.collect()
  assert r["git_commit"] == _git("rev-parse", "HEAD")
  dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
  assert r["git_dirty"] == dirty


def test_package_copy_outside_git_has_no_commit(tmp_path):
  """A copied package (no git around it) reports None, in a fresh process
  that imports the copy, and loads no TensorFlow / orbax on the way."""
  _copy_package(tmp_path)
  code = ("import json, sys, legr_jax.provenance as p\n"
          "r = p.collect()\n"
          "assert p.__file__.startswith(sys.argv[1]), p.__file__\n"
          "heavy = sorted(m for m in sys.modules if m.split('.')[0] in\n"
          "               ('tensorflow', 'tensorflow_datasets', 'orbax'))\n"
          "print(json.dumps({'commit': r['git_commit'],\n"
          "                  'dirty': r['git_dirty'], 'heavy': heavy}))\n")
  env = dict(os.environ, PYTHONPATH=str(tmp_path), JAX_PLATFORMS="cpu",
             # as if tmp_path were the top of the file system for git
             GIT_CEILING_DIRECTORIES=str(tmp_path.parent))
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300, check=False)
  assert out.returncode == 0, out.stderr
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got == {"commit": None, "dirty": None, "heavy": []}


@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
def test_package_inside_other_repo_untracked_then_committed(tmp_path):
  """Lying in a work tree is not enough: the package must be tracked."""
  repo = tmp_path / "repo"
  repo.mkdir()
  git = ["git", "-c", "user.name=t", "-c", "user.email=t@t",
         "-c", "commit.gpgsign=false"]
  subprocess.run(git + ["init", "-q"], cwd=repo, check=True)
  (repo / "other.txt").write_text("x\n")
  subprocess.run(git + ["add", "other.txt"], cwd=repo, check=True)
  subprocess.run(git + ["commit", "-q", "-m", "other"], cwd=repo, check=True)
  pkg = _copy_package(repo)
  assert provenance.git_state(pkg) == (None, None)  # untracked

  subprocess.run(git + ["add", "legr_jax"], cwd=repo, check=True)
  subprocess.run(git + ["commit", "-q", "-m", "pkg"], cwd=repo, check=True)
  head = _git("rev-parse", "HEAD", cwd=repo)
  assert provenance.git_state(pkg) == (head, False)

  (repo / "other.txt").write_text("changed\n")
  assert provenance.git_state(pkg) == (head, True)
  (repo / "other.txt").write_text("x\n")
  (repo / "untracked.txt").write_text("new\n")  # untracked: not dirty
  assert provenance.git_state(pkg) == (head, False)


def test_no_git_executable(monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory
  assert provenance.git_state() == (None, None)
  r = provenance.collect()
  assert r["git_commit"] is None and r["git_dirty"] is None


def test_no_package_dir(tmp_path):
  assert provenance.git_state(tmp_path / "missing") == (None, None)


@pytest.mark.parametrize("machine,cpuinfo,expect", [
    ("x86_64", {"model name": "Some CPU", "flags": "sse4_2 avx avx2 fma"},
     {"avx2": True, "fma": True, "avx512f": False, "neon": False}),
    ("x86_64", {"flags": "avx2 avx512f avx512_bf16 amx_tile"},
     {"avx512f": True, "avx512_bf16": True, "amx_tile": True}),
    ("aarch64", {"features": "fp asimd evtstrm sve"},
     {"neon": True, "sve": True, "avx2": False, "avx512f": False}),
    ("aarch64", {}, {"neon": True, "avx2": False, "sve": None}),
    ("riscv64", {}, {"neon": None, "avx2": None}),
])
def test_cpu_isa(monkeypatch, machine, cpuinfo, expect):
  monkeypatch.setattr(provenance, "_cpuinfo", lambda: dict(cpuinfo))
  model, isa = provenance._cpu(machine)  # pylint: disable=protected-access
  assert set(isa) == set(provenance.ISA_FLAGS)
  for flag, value in expect.items():
    assert isa[flag] is value, (flag, isa)
  if "model name" in cpuinfo:
    assert model == cpuinfo["model name"]


def test_write_round_trips(tmp_path):
  workdir = tmp_path / "run" / "sub"  # created
  r = provenance.write(workdir, extra={"stage": "train", "seed": 0,
                                       "path": pathlib.Path("/x")})
  assert r["stage"] == "train" and r["seed"] == 0
  path = workdir / "provenance.json"
  on_disk = json.loads(path.read_text())
  assert on_disk == json.loads(json.dumps(r, default=str))
  assert on_disk["path"] == "/x"
  assert sorted(p.name for p in workdir.iterdir()) == ["provenance.json"]

  # rewriting replaces the file; another name sits beside it
  r2 = provenance.write(workdir, extra={"stage": "prune"})
  assert json.loads(path.read_text())["stage"] == "prune"
  assert r2["stage"] == "prune"
  provenance.write(workdir, name="other.json")
  assert sorted(p.name for p in workdir.iterdir()) == ["other.json",
                                                       "provenance.json"]


def test_write_failure_leaves_no_temp_file(tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    raise OSError("disk full")
  monkeypatch.setattr(provenance.os, "replace", fail)
  with pytest.raises(OSError, match="disk full"):
    provenance.write(tmp_path)
  assert list(tmp_path.iterdir()) == []

"""legr_jax.cpu.kernels: choosing the compiler, building with other flags,
the instruction set a build targets, the no-compiler path, and the kernels
built for AVX-512, AVX2 and a generic x86-64 checked against XLA / NumPy
(issue 14: the AVX2 build did not compile)."""

import os
import pathlib
import platform
import stat

import pytest

from kernel_support import check_build, require_kernels, run_python
from legr_jax.cpu import kernels

X86 = platform.machine().lower() in ("x86_64", "amd64")


def _cpu_flags() -> set[str]:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def _script(path, body="exit 0\n"):
  path.write_text("#!/bin/sh\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return path


def test_compiler_choice(tmp_path, monkeypatch):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  mine = _script(tmp_path / "my-cxx")
  monkeypatch.setenv("PATH", str(bin_dir))
  for off in ("", "none", "NONE", " None "):
    monkeypatch.setenv("CXX", off)
    assert kernels.compiler() is None, off
  monkeypatch.setenv("CXX", str(mine))
  assert kernels.compiler() == str(mine)
  # CXX pointing nowhere: no compiler, even with one on PATH
  _script(bin_dir / "g++")
  monkeypatch.setenv("CXX", str(tmp_path / "missing-cxx"))
  assert kernels.compiler() is None
  monkeypatch.setenv("CXX", "my-cxx")     # not on PATH
  assert kernels.compiler() is None
  # CXX unset: g++, then c++, then clang++
  monkeypatch.delenv("CXX")
  assert kernels.compiler() == str(bin_dir / "g++")
  os.remove(bin_dir / "g++")
  _script(bin_dir / "clang++")
  assert kernels.compiler() == str(bin_dir / "clang++")
  _script(bin_dir / "c++")
  assert kernels.compiler() == str(bin_dir / "c++")
  os.remove(bin_dir / "c++")
  os.remove(bin_dir / "clang++")
  assert kernels.compiler() is None
  assert not kernels.expected()


def test_expected_on_x86_64_with_a_compiler(monkeypatch, tmp_path):
  monkeypatch.setenv("CXX", str(_script(tmp_path / "cxx")))
  for machine, want in (("x86_64", True), ("AMD64", True),
                        ("aarch64", False), ("arm64", False)):
    monkeypatch.setattr(platform, "machine", lambda m=machine: m)
    assert kernels.expected() == want, machine
  monkeypatch.setenv("CXX", "none")
  monkeypatch.setattr(platform, "machine", lambda: "x86_64")
  assert not kernels.expected()


def test_require_kernels_fails_where_a_build_is_expected(monkeypatch):
  """The tests' skip logic: a broken build on x86-64 with a compiler is a
  failure with the build error, elsewhere a skip."""
  monkeypatch.setattr(kernels, "compiler", lambda: "/usr/bin/c++")
  monkeypatch.setattr(kernels, "load", lambda: "error: out of cheese")
  monkeypatch.setattr(kernels, "expected", lambda: True)
  with pytest.raises(pytest.fail.Exception, match="out of cheese"):
    require_kernels()
  monkeypatch.setattr(kernels, "expected", lambda: False)
  with pytest.raises(pytest.skip.Exception, match="out of cheese"):
    require_kernels()
  monkeypatch.setattr(kernels, "compiler", lambda: None)
  with pytest.raises(pytest.skip.Exception, match="no C\\+\\+ compiler"):
    require_kernels()


def test_extra_flags_reach_the_compiler_and_the_cache_key(tmp_path,
                                                          monkeypatch):
  log = tmp_path / "log"
  fake = _script(tmp_path / "fake-cxx", f"""echo "$@" >> {log}
while [ $# -gt 0 ]; do
  if [ "$1" = -o ]; then : > "$2"; fi
  shift
done
""")
  monkeypatch.setenv("LEGR_KERNEL_CACHE", str(tmp_path / "cache"))
  plain = kernels.build(str(fake))
  lines = log.read_text().splitlines()
  assert not any("-mno-avx512f" in line for line in lines)
  log.write_text("")
  avx2 = kernels.build(str(fake), extra_flags=("-mno-avx512f",))
  assert avx2 != plain and avx2.exists() and plain.exists()
  lines = [line for line in log.read_text().splitlines()
           if line != "--version"]
  # three sources compiled, one link: each with the flag after -march
  assert len(lines) == 4
  for line in lines:
    args = line.split()
    assert args.index("-mno-avx512f") > args.index("-march=native")
  assert kernels.build(str(fake), extra_flags=("-mno-avx512f",)) == avx2
  assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
      [plain.name, avx2.name])


def test_build_failure_shows_the_compiler_output(tmp_path, monkeypatch):
  if kernels.compiler() is None:
    pytest.skip("no C++ compiler on this machine")
  monkeypatch.setenv("LEGR_KERNEL_CACHE", str(tmp_path))
  with pytest.raises(RuntimeError, match="no-such-flag") as e:
    kernels.build(extra_flags=("-mno-such-flag",))
  assert "building legr_jax's C++ kernels failed" in str(e.value)
  assert list(tmp_path.iterdir()) == []   # nothing half-built left


def test_target_isa_follows_the_flags():
  if kernels.compiler() is None:
    pytest.skip("no C++ compiler on this machine")
  native = kernels.target_isa()
  assert native in kernels.LANES
  if not X86:
    pytest.skip("x86 flags")
  cpu = _cpu_flags()
  if cpu:
    assert (native == "avx512") == ("avx512f" in cpu), native
  assert kernels.target_isa(extra_flags=("-mno-avx512f",)) != "avx512"
  if "avx2" in cpu:
    assert kernels.target_isa(extra_flags=("-mno-avx512f",)) == "avx2"
  assert kernels.target_isa(extra_flags=("-march=x86-64",)) == "generic"
  assert kernels.target_isa(extra_flags=("-march=haswell",)) == "avx2"
  assert kernels.target_isa(extra_flags=("-march=sandybridge",)) == "avx"
  assert kernels.target_isa(
      extra_flags=("-march=x86-64", "-mavx512f")) == "avx512"
  with pytest.raises(RuntimeError, match="no-such-flag"):
    kernels.target_isa(extra_flags=("-mno-such-flag",))


def test_use_flags_must_come_before_the_first_load():
  require_kernels()
  assert kernels.flags() == ()
  with pytest.raises(RuntimeError, match="already loaded"):
    kernels.use_flags("-march=x86-64")
  kernels.use_flags()   # the flags it has: fine
  assert kernels.flags() == ()


def test_no_compiler_falls_back_without_an_exception(tmp_path):
  """A fresh process with CXX=none: no compiler, `load` says why (one
  warning), `available` is False, nothing is built."""
  out = run_python(
      "from legr_jax.cpu import kernels as k\n"
      "print('COMPILER', k.compiler())\n"
      "print('EXPECTED', k.expected())\n"
      "why = k.load()\n"
      "print('WHY', why)\n"
      "print('AVAILABLE', k.available(), k.load() is why)\n",
      env={"CXX": "none", "LEGR_KERNEL_CACHE": str(tmp_path / "cache")})
  assert out.returncode == 0, out.stderr
  assert "COMPILER None" in out.stdout
  assert "EXPECTED False" in out.stdout
  assert "WHY no C++ compiler" in out.stdout
  assert "AVAILABLE False True" in out.stdout
  assert out.stderr.count("C++ CPU kernels unavailable") == 1, out.stderr
  assert not (tmp_path / "cache").exists() or not any(
      (tmp_path / "cache").iterdir())


def test_native_build_matches_xla():
  """The library the package uses (-march=native): AVX-512 on a CPU with
  avx512f, AVX2 on one with avx2, checked in this process."""
  require_kernels()
  isas = tuple(kernels.LANES)
  cpu = _cpu_flags()
  if X86 and cpu:
    isas = (("avx512",) if "avx512f" in cpu else
            ("avx2",) if "avx2" in cpu else ("avx", "generic"))
  check_build((), isas)


@pytest.mark.slow
@pytest.mark.parametrize("extra_flags,isas", [
    # issue 14: AVX2 at most (on this CPU exactly AVX2 where it has it)
    (("-mno-avx512f",), None),
    # the portable 4-float width (SSE2)
    (("-march=x86-64",), ("generic",)),
], ids=["avx2", "generic"])
def test_build_with_other_flags_matches_xla(extra_flags, isas, tmp_path):
  """Builds with ``extra_flags`` into an empty cache and checks every kernel
  against XLA in a fresh process (that loads this build)."""
  if not kernels.expected():
    pytest.skip("x86-64 with a C++ compiler only (x86 flags)")
  if isas is None:
    isas = ("avx2",) if "avx2" in _cpu_flags() else ("avx", "generic")
  out = run_python(
      "from kernel_support import check_build\n"
      f"check_build({extra_flags!r}, {isas!r})\n",
      env={"LEGR_KERNEL_CACHE": str(tmp_path / "cache")})
  assert out.returncode == 0, out.stdout + out.stderr
  assert f"CHECKED {' '.join(extra_flags)}" in out.stdout, out.stdout
  assert len(list((tmp_path / "cache").iterdir())) == 1


def test_sources_are_package_data():
  """The build reads its sources beside the module, not from a checkout."""
  here = pathlib.Path(kernels.__file__).parent / "csrc"
  for path in kernels.SOURCES + kernels.HEADERS:
    assert path.parent == here and path.exists()

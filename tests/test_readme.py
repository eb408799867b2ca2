"""Every ```python block of README.md runs as written.

Each block runs on its own in a fresh interpreter (cwd: an empty temporary
directory; PYTHONPATH: the repository root; JAX_PLATFORMS=cpu), so a snippet
can rely on nothing but its own lines and the installed requirements.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# an opening fence of exactly "```python" at the start of a line, up to the
# next closing fence
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def python_blocks(text: str) -> list[tuple[int, str]]:
  """(1-based line of the opening fence, code) of every python block."""
  return [(text.count("\n", 0, m.start()) + 1, m.group(1))
          for m in _BLOCK.finditer(text)]


_BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks():
  # the extraction itself (a changed fence style would silently test nothing)
  assert len(_BLOCKS) >= 2, _BLOCKS
  assert any("legr_jax.surgery.slice_network" in code for _, code in _BLOCKS)


def test_python_blocks_extraction():
  text = ("intro\n```python\na = 1\n```\n```bash\nls\n```\n"
          "```python\nb = 2\nc = 3\n```\n")
  assert python_blocks(text) == [(2, "a = 1\n"), (8, "b = 2\nc = 3\n")]


@pytest.mark.slow
@pytest.mark.parametrize("line,code", _BLOCKS,
                         ids=[f"README.md:{line}" for line, _ in _BLOCKS])
def test_readme_python_block_runs(line, code, tmp_path):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  env["JAX_PLATFORMS"] = "cpu"
  r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                     capture_output=True, text=True, timeout=900)
  if r.returncode != 0:
    pytest.fail(f"README.md block at line {line} failed (exit "
                f"{r.returncode}):\n--- snippet ---\n{code}"
                f"--- stderr ---\n{r.stderr[-6000:]}"
                f"--- stdout ---\n{r.stdout[-2000:]}", pytrace=False)

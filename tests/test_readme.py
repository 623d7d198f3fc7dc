"""README.md is assembled from docs/ and its first lines hold the two fresh-clone commands."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _builder():
    spec = importlib.util.spec_from_file_location("build_readme", ROOT / "tools" / "build_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_is_built_from_docs():
    assert (ROOT / "README.md").read_text() == _builder().build(), "run: python tools/build_readme.py"


def _first_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert block and text.index(block.group(0)) < 200, "the two commands must open the README"
    return [line.split("#")[0].strip() for line in block.group(1).strip().splitlines()]


def test_first_lines_are_quickstart_and_tests():
    quick, tests = _first_commands()
    assert quick.endswith("ief train quickstart")
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
    _, tests = _first_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in [line.strip() for line in ci], ".ci/run must call the README's test command verbatim"

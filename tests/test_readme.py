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


def _console_block(doc: str, command_start: str) -> tuple[str, list[str]]:
    """The ``$ command`` line starting with ``command_start`` in docs/<doc> and the output lines after it."""
    text = (ROOT / "docs" / doc).read_text()
    for block in re.findall(r"```console\n(.*?)```", text, flags=re.S):
        lines = block.splitlines()
        if lines and lines[0].startswith(f"$ {command_start}"):
            return lines[0][2:], lines[1:]
    raise AssertionError(f"docs/{doc}: no console block starting with $ {command_start}")


def test_train_md_jq_example_is_true(tmp_path, monkeypatch):
    """docs/train.md's `jq` example on the quickstart run prints what the doc shows (the first
    50 steps of quickstart: a constant lr, so they are the full run's first 50 steps)."""
    import json
    import shutil
    import subprocess

    from typer.testing import CliRunner

    from iefcli.cli import app

    command, shown = _console_block("train.md", "jq ")
    want = [line for line in shown if line != "..."]
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["train", "quickstart", "-q", "--set", "device=cpu", "--set", "train.steps=50"])
    assert res.exit_code == 0, res.output
    if shutil.which("jq"):
        out = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60, check=True).stdout
        got = out.splitlines()
    else:  # the same filter in Python: select(.split == "val") | [.step, .accuracy], compact
        recs = [json.loads(line) for line in (tmp_path / "runs/quickstart/metrics.jsonl").read_text().splitlines()]
        got = [json.dumps([r["step"], r["accuracy"]], separators=(",", ":")) for r in recs if r["split"] == "val"]
    assert got[: len(want)] == want


def test_demo_toy_example_is_true(tmp_path, monkeypatch):
    """docs/reports.md's `ief demo toy --out docs/img --overwrite` block: the command works on an
    existing figure (run twice) and prints exactly the documented lines (paths aside)."""
    from typer.testing import CliRunner

    from iefcli.cli import app

    doc = (ROOT / "docs" / "reports.md").read_text()
    block = re.search(r"```console\n\$ ief demo toy --out docs/img --overwrite\n(.*?)```", doc, flags=re.S)
    assert block, "docs/reports.md must show `ief demo toy --out docs/img --overwrite`"
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for _ in range(2):  # the second run meets the figure the first one wrote
        res = runner.invoke(app, ["demo", "toy", "--out", "docs/img", "--overwrite"])
        assert res.exit_code == 0, res.output
    assert (tmp_path / "docs" / "img" / "toy.png").is_file()
    want = [ln for ln in block.group(1).splitlines() if ln.strip()]
    got = [ln for ln in res.output.splitlines() if ln.strip()]
    assert got == want

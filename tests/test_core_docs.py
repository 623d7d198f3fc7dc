"""The README's Python API example (docs/core.md) runs and does what it says."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "core.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_core_md_example_runs_and_lowers_the_loss():
    blocks = _python_blocks(DOC.read_text())
    assert len(blocks) == 1, "docs/core.md should hold exactly one ```python example"
    code = blocks[0]
    assert len(code.strip().splitlines()) <= 20  # the README promises a short example
    ns: dict = {}
    out = io.StringIO()
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(out):  # the example seeds the global RNG
        exec(compile(code, str(DOC), "exec"), ns)
    readme = (DOC.parents[1] / "README.md").read_text()
    assert code in readme, "the README must show the same example (python tools/build_readme.py)"
    bg, d, info = ns["bg"], ns["d"], ns["info"]
    assert d.shape == (bg.layout.size,)
    assert float(info.residual) < 1e-10
    # iEF at near-zero damping: J d = s / N, so a unit step lowers the mean loss.
    assert float(ns["after"]) < float(bg.loss.mean())
    assert out.getvalue().startswith("loss ")

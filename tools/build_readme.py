"""Assemble README.md from docs/README.head.md and the per-topic sections in docs/.

The sections stay readable on their own under docs/ (image links relative to
docs/); in README.md the links are rewritten relative to the repository root.
Run: python tools/build_readme.py   (tests/test_readme.py checks README.md is current)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SECTIONS = ["core.md", "library.md", "train.md", "eval-gamma.md", "reports.md", "hf.md", "own-model.md", "kfac.md", "distributed.md", "reproduce.md", "bench.md"]


def build() -> str:
    parts = [(DOCS / "README.head.md").read_text().rstrip() + "\n"]
    for name in SECTIONS:
        text = (DOCS / name).read_text().rstrip() + "\n"
        parts.append(text.replace("](img/", "](docs/img/"))
    parts.append((DOCS / "README.tail.md").read_text().rstrip() + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    text = build()
    if "--check" in sys.argv:
        sys.exit(0 if (ROOT / "README.md").read_text() == text else 1)
    (ROOT / "README.md").write_text(text)

"""Reports over run directories written by ``ief train``: one row per run, output files.

Everything is read through :mod:`iefcli.train.rundir` (the run-directory
contract in docs/DESIGN.md); nothing here parses those files itself.

- :func:`prepare_output`: the output-file policy shared by compare, plot and
  demo (never overwrite without ``--overwrite``; the folder must exist).
- :func:`load_runs`: every run directory -> a :class:`RunInfo` (summary,
  recipe, metric curves), failing with one line on a missing / non-run dir.
- :func:`compare_rows`, :func:`best_per_column`, :func:`rows_to_csv`,
  :func:`rows_to_json`: the comparison table as plain data.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from iefcli.errors import UsageError

# ------------------------------------------------------------- output files ---


def prepare_output(path: Path | str, *, overwrite: bool, make_parent: bool = False) -> Path:
    """Check that ``path`` may be written; return it.

    An existing file is refused unless ``overwrite`` (so a report is never
    replaced by accident); a directory at that path is always refused. The
    parent folder must exist unless ``make_parent`` (then it is created).
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, expected an output file path")
    if path.exists() and not overwrite:
        raise UsageError(f"{path}: already exists (pass --overwrite to replace it)")
    parent = path.parent
    if not parent.is_dir():
        if make_parent and not parent.exists():
            parent.mkdir(parents=True, exist_ok=True)
        elif parent.exists():
            raise UsageError(f"{parent}: not a directory")
        else:
            raise UsageError(f"{parent}: output directory does not exist")
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Write text through the run-dir module's atomic writer (temp file + os.replace)."""
    from iefcli.train.rundir import atomic_write_text

    atomic_write_text(path, text)

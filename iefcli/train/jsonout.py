"""What every JSON output carries, and the JSON error object of a failed ``--json`` command.

- :func:`stamp` puts ``iefcli_version`` (the package version) and
  ``schema_version`` (:data:`SCHEMA_VERSION`, raised when a JSON layout changes
  incompatibly) at the front of a JSON object: summary.json, export.json and
  every command's ``--json`` object.
- :func:`error_object` is what ``--json`` prints on stdout when a command fails
  (instead of 0 bytes)::

      {"iefcli_version": "0.1.0", "schema_version": 1, "status": "error",
       "command": "train", "error": {"type": "UsageError", "message": "r.yaml: optimizer.lr: must be > 0, got -1",
       "exit_code": 2}, "summary": {...}}

  ``summary`` is the run's summary when the failure happened after a run
  directory was written (a diverged run: ``status: failed``): the exception's
  ``summary`` attribute if it has one, else ``run_dir``'s summary.json; else absent.
- :func:`json_errors` is the context manager a command wraps around its work
  (inside ``cli_errors()``): on an IEFError it prints the object and re-raises,
  so stderr still gets the one-line message and the exit code is unchanged.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, TextIO

import iefcli
from iefcli.errors import EXIT_INTERRUPTED, IEFError, one_line

SCHEMA_VERSION = 1


def versions() -> dict[str, Any]:
    return {"iefcli_version": iefcli.__version__, "schema_version": SCHEMA_VERSION}


def stamp(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` with the package and schema versions first (existing keys win)."""
    return {**versions(), **dict(obj)}


def error_object(exc: BaseException, *, command: str, run_dir: Path | str | None = None) -> dict[str, Any]:
    """The JSON object describing a failed command (see the module docstring)."""
    code = getattr(exc, "exit_code", EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else 1)
    message = one_line(str(exc)) or type(exc).__name__  # the same bound as the stderr line
    obj: dict[str, Any] = {"status": "error", "command": command,
                           "error": {"type": type(exc).__name__, "message": message, "exit_code": int(code)}}
    summary = getattr(exc, "summary", None)  # a RunFailed may carry the run's summary
    if isinstance(summary, Mapping):
        obj["summary"] = dict(summary)
    elif run_dir is not None:
        from iefcli.train.rundir import SUMMARY_FILE

        path = Path(run_dir) / SUMMARY_FILE
        try:
            obj["summary"] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    return stamp(obj)


def dumps(obj: Any) -> str:
    """JSON text as the commands print it (NaN/Inf as null, tensors as numbers)."""
    from iefcli.train.rundir import to_json

    return to_json(obj, indent=2) + "\n"


@contextmanager
def json_errors(enabled: bool, command: str, *, run_dir: Path | str | None = None,
                stream: TextIO | None = None) -> Iterator[None]:
    """With ``enabled`` (the command's --json), print :func:`error_object` on stdout for an
    IEFError or Ctrl-C, then re-raise it unchanged."""
    try:
        yield
    except (IEFError, KeyboardInterrupt) as e:
        if enabled:
            (stream or sys.stdout).write(dumps(error_object(e, command=command, run_dir=run_dir)))
            (stream or sys.stdout).flush()
        raise

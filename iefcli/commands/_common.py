"""What every command shares: the error-to-exit-code mapping and the consoles."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

import typer
from rich.console import Console

from iefcli.errors import EXIT_INTERRUPTED, IEFError

out = Console()  # stdout: tables, JSON
err = Console(stderr=True)  # stderr: progress, messages


def fail(message: str, code: int) -> typer.Exit:
    """Print one line 'ief: error: ...' on stderr and return the Exit to raise."""
    print(f"ief: error: {message}", file=sys.stderr)
    return typer.Exit(code)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Map IEFError to its exit code with one line on stderr; Ctrl-C to 130.

    Anything else is a bug and keeps its traceback.
    """
    try:
        yield
    except IEFError as e:
        raise fail(str(e), e.exit_code) from None
    except KeyboardInterrupt:
        raise fail("interrupted", EXIT_INTERRUPTED) from None

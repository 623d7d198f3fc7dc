"""What every command shares: the error-to-exit-code mapping, the consoles, the
one way to print a table or JSON, and the option declarations used by several
commands (declared once here, worded per command by their argument)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator

import typer
from rich.console import Console

from iefcli.errors import EXIT_INTERRUPTED, MAX_ERROR_CHARS, IEFError, one_line  # noqa: F401 (re-exported)

out = Console()  # stdout: tables, JSON
err = Console(stderr=True)  # stderr: progress, messages


def fail(message: str, code: int) -> typer.Exit:
    """Print one line 'ief: error: ...' on stderr and return the Exit to raise."""
    print(f"ief: error: {one_line(message)}", file=sys.stderr)
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


def print_json(obj: Any) -> None:
    """The one way a command prints JSON: indented, NaN/Inf as null, on stdout."""
    from iefcli.train.rundir import to_json

    sys.stdout.write(to_json(obj, indent=2) + "\n")
    sys.stdout.flush()


def print_table(table: Any, plain: Any = None) -> None:
    """The one way a command prints a table (a rich renderable) on stdout.

    On a colour terminal: ``table``, fit to its width. Piped, captured or
    NO_COLOR: ``plain`` (default ``table``; e.g. best cells starred instead of
    coloured) as plain text 200 columns wide, not squashed to 80.
    """
    if out.is_terminal and out.color_system is not None:
        out.print(table)
    else:
        Console(width=200, no_color=True, force_terminal=False).print(plain if plain is not None else table)


# ----------------------------------------------------------------------------- shared options


def json_option(what: str) -> Any:
    return typer.Option("--json", help=f"Print {what} as JSON on stdout.")


def quiet_option(what: str) -> Any:
    return typer.Option("--quiet", "-q", help=what)


def overwrite_option(what: str) -> Any:
    return typer.Option("--overwrite", help=f"Replace {what}.")


def out_option(what: str) -> Any:
    return typer.Option("--out", "-o", help=what)

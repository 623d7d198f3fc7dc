"""The one exception family the library raises for problems a user can fix.

The CLI maps each class to an exit code and prints its message as one line on
stderr; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class IEFError(Exception):
    """Base class: a problem the user can fix, reported in one line."""

    exit_code = EXIT_USAGE


class UsageError(IEFError):
    """Bad input: a recipe key, an option, a missing or corrupt file (exit 2)."""

    exit_code = EXIT_USAGE


class RunFailed(IEFError):
    """A run that started but could not finish (diverged, too many bad steps) (exit 1)."""

    exit_code = EXIT_RUN_FAILED


class ModelError(IEFError):
    """A model that the core cannot differentiate as asked (e.g. a trainable
    parameter that never receives a gradient)."""

    exit_code = EXIT_USAGE

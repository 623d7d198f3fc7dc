"""The one exception family the library raises for problems a user can fix.

The CLI maps each class to an exit code and prints its message as one line on
stderr; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

MAX_ERROR_CHARS = 500


def one_line(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``message`` as ONE line of at most ``limit`` characters: line breaks and runs of
    white space become one space, and the middle of a longer message is cut out (a value
    echoed in an error may be huge; the start names the file and key, the end the rule).
    Both stderr's ``ief: error:`` line and the ``--json`` error object use it."""
    text = " ".join(str(message).split())
    if len(text) > limit:
        keep = (limit - 5) // 2
        text = f"{text[:keep]} ... {text[-keep:]}"
    return text


class IEFError(Exception):
    """Base class: a problem the user can fix, reported in one line."""

    exit_code = EXIT_USAGE


class UsageError(IEFError):
    """Bad input: a recipe key, an option, a missing or corrupt file (exit 2)."""

    exit_code = EXIT_USAGE


class RunExists(UsageError):
    """The run directory already holds something (the CLI words the --overwrite / --resume hint)."""

    def __init__(self, run_dir):
        super().__init__(f"{run_dir}: run directory exists and is not empty")
        self.run_dir = run_dir


class RunFailed(IEFError):
    """A run that started but could not finish (diverged, too many bad steps) (exit 1)."""

    exit_code = EXIT_RUN_FAILED


class ModelError(IEFError):
    """A model that the core cannot differentiate as asked (e.g. a trainable
    parameter that never receives a gradient)."""

    exit_code = EXIT_USAGE


class Interrupted(IEFError):
    """Ctrl-C during training, after a checkpoint of the state was saved (exit 130).

    ``run_dir`` and ``step`` say where to continue from (the CLI words the hint).
    """

    exit_code = EXIT_INTERRUPTED

    def __init__(self, message: str, *, run_dir=None, step: int | None = None):
        super().__init__(message)
        self.run_dir = run_dir
        self.step = step

"""`ief train --nproc K`: the same command, K times, under torchrun's launcher on this machine.

Equivalent to ``torchrun --standalone --nproc-per-node K -m iefcli train ...`` (it calls
torchrun's own launcher, :func:`torch.distributed.launcher.api.elastic_launch`, with the
``--standalone`` rendezvous), with one difference: the ranks' ERROR output goes to one log
file per rank (``rank-R.log`` in a fresh directory named ``ief-nproc-*`` under the temp
dir; :func:`rank_errors_to_log`), not to the terminal. Rank 0's ordinary output (progress,
summary) is printed as usual; the other ranks print nothing. A rank that fails stops the
others (torchrun's agent) and the command ends with ONE line on stderr: the first failing
rank's own error (its ``ief: error:`` line, or the last line of its traceback; a rank that
only saw another rank vanish is named only when no rank says more) and the log directory,
exit 1 (2 when that rank's error was a usage error). The logs are removed after a
successful run. Raw ``torchrun`` instead prints every rank's error and traceback (each line
prefixed ``[rankR]:``) and then its own multi-line ``ChildFailedError`` summary.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from iefcli.errors import IEFError, RunFailed, UsageError

__all__ = ["relaunch", "child_args", "rank_errors_to_log", "root_error", "LOG_DIR_ENV"]

LOG_DIR_ENV = "IEF_NPROC_LOG_DIR"
"""Set by :func:`relaunch` for its ranks: where each rank writes ``rank-R.log``."""


class _ChildUsageError(IEFError):
    exit_code = 2


def child_args(argv: list[str]) -> list[str]:
    """``argv`` (sys.argv[1:], from ``train`` on) without ``--nproc K`` / ``--nproc=K``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def relaunch(nproc: int, argv: list[str] | None = None) -> None:
    """Run this ``ief train`` command as ``nproc`` ranks and exit with the job's status
    (returns at once for nproc == 1: the caller trains in this process)."""
    if nproc < 1:
        raise UsageError(f"--nproc: must be >= 1, got {nproc}")
    if os.environ.get("WORLD_SIZE") is not None:
        raise UsageError("--nproc: this process already runs under torchrun; drop --nproc")
    if nproc == 1:
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    if "train" not in argv:
        raise UsageError("--nproc: could not find the train command on the command line")
    args = child_args(argv[argv.index("train"):])

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logs = Path(tempfile.mkdtemp(prefix="ief-nproc-"))
    os.environ[LOG_DIR_ENV] = str(logs)  # the ranks inherit it (this process only waits for them)
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                       rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(cfg, entrypoint=sys.executable)("-m", "iefcli", *args)
    except ChildFailedError as e:
        failed = sorted((r, f.exitcode) for r, f in e.failures.items())
        rank, code, msg = root_error(failed, logs)
        line = (f"rank {rank} of {nproc} failed: {msg} (every rank's log: {logs}); the job was stopped")
        if code == 2:  # (a rank stopped by a signal, code < 0, counts as a failed run: exit 1)
            raise _ChildUsageError(line) from None
        raise RunFailed(line) from None
    shutil.rmtree(logs, ignore_errors=True)
    raise SystemExit(0)


_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]:\s?")
_SECONDARY = "another rank crashed or did not answer"


def _last_error(log: Path) -> str | None:
    """A rank log's error: its last ``ief: error:`` line (without the prefix), else the last line of
    a traceback (``RuntimeError: ...``), else its last line; None for an empty or missing log."""
    try:
        lines = [_PREFIX.sub("", ln).rstrip() for ln in log.read_text(errors="replace").splitlines()]
    except OSError:
        return None
    lines = [ln for ln in lines if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("ief: error: "):
            return ln[len("ief: error: "):]
    return lines[-1].strip() if lines else None


def root_error(failed: list[tuple[int, int]], logs: Path) -> tuple[int, int, str]:
    """(rank, exit code, message) of the error to show, from the failed ranks' (rank, exit code; a
    negative code: stopped by that signal) and their logs: the first rank (in rank order) whose
    error is not only that another rank vanished (it may have been stopped by the agent while it
    was still exiting, so any code counts); else the first one with a message; else the first
    failure."""
    found = [(r, c, _last_error(logs / f"rank-{r}.log")) for r, c in failed]
    pick = next((f for f in found if f[2] and _SECONDARY not in f[2]), None) or next((f for f in found if f[2]), None)
    if pick is not None:
        r, c, msg = pick
        if c <= 0:  # stopped while exiting: the code of a rank that said the same (a usage error: 2)
            c = next((c2 for _, c2, m2 in found if m2 == msg and c2 > 0), c)
        return r, c, msg
    r, c = next(((r, c) for r, c in failed if c > 0), failed[0])
    return r, c, f"exit code {c} (no error output)"


@contextlib.contextmanager
def rank_errors_to_log():
    """In a rank started by :func:`relaunch`: its error output goes to ``rank-R.log``. Ranks other
    than 0 send all their stderr there at once (they print nothing else); rank 0 keeps its
    stderr (progress, summary) until an exception leaves the block, then switches it to the log
    before the error line or traceback is printed. A no-op outside ``ief train --nproc``."""
    logs, rank = os.environ.get(LOG_DIR_ENV), os.environ.get("RANK")
    if not logs or rank is None:
        yield
        return
    path = Path(logs) / f"rank-{int(rank)}.log"

    def to_log() -> None:
        sys.stderr.flush()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        os.dup2(fd, 2)
        os.close(fd)

    if rank != "0":
        to_log()
    try:
        yield
    except BaseException as e:
        if rank == "0" and not (isinstance(e, SystemExit) and e.code in (0, None)):
            to_log()
        raise

"""`ief train --nproc K`: the same command, K times, under torchrun's launcher on this machine.

Equivalent to ``torchrun --standalone --nproc-per-node K -m iefcli train ...`` (it calls
torchrun's own launcher, :func:`torch.distributed.launcher.api.elastic_launch`, with the
``--standalone`` rendezvous). A rank that fails stops the others (torchrun's agent) and
the command ends with ONE line naming the rank and its exit code; the rank's own
``ief: error: ...`` line is printed above it.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid

from iefcli.errors import IEFError, RunFailed, UsageError

__all__ = ["relaunch", "child_args"]


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
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                       rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(cfg, entrypoint=sys.executable)("-m", "iefcli", *args)
    except ChildFailedError as e:
        failed = sorted(e.failures.items())
        if any(f.exitcode > 0 for _, f in failed):  # not the ranks the agent stopped (killed by a signal)
            failed = [(r, f) for r, f in failed if f.exitcode > 0]
        codes = sorted({f.exitcode for _, f in failed})
        who = ", ".join(str(r) for r, _ in failed)
        msg = (f"rank{'s' if len(failed) > 1 else ''} {who} of {nproc} stopped with exit code "
               f"{', '.join(map(str, codes))} (the errors are above); the job was stopped")
        code = 2 if codes == [2] else 1
        if code == 2:
            raise _ChildUsageError(msg) from None
        raise RunFailed(msg) from None
    raise SystemExit(0)

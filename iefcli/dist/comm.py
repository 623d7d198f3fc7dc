"""The process group: torch.distributed launched by torchrun (gloo on CPU, NCCL on GPU).

:class:`Comm` is the one object the rest of :mod:`iefcli.dist` talks to; it has two
collectives and a byte count:

- :meth:`Comm.gather_samples`: tensors whose dim 1 indexes this rank's samples, gathered
  from every rank and concatenated along dim 1 in rank order (one small all_gather of
  the per-rank sample counts, then ONE all_gather of all the tensors packed as bytes,
  padded to the largest rank's payload);
- :meth:`Comm.all_reduce_`: an in-place sum.

``Comm.local()`` (one process) does the same with no communication, so micro-batches
on one rank and ranks share the code path. ``bytes_gathered`` / ``bytes_reduced``
count the payload this rank contributes (before padding), for the measurements in
docs/distributed.md.

Failure: :func:`init_from_env` sets a timeout on every collective
(``IEF_DIST_TIMEOUT_S``, default 600 s), so a rank that stops answering ends the job
instead of hanging it; a rank that exits is seen by torchrun, which stops the others.

Exit: the process group iefcli created is destroyed at exit. After :func:`finished` (a
command or a bench that ended without error) a gloo rank first meets the others in a
bounded barrier (``EXIT_BARRIER_S``), so that no rank tears its connections down while a
peer still uses them: in CI a rank that had done all its work was seen aborting at exit
("terminate called without an active exception", SIGABRT in gloo's teardown). A rank on an
error path exits at once (torchrun's agent stops the others).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os

import torch
from torch import Tensor

__all__ = ["Comm", "init_from_env", "world_from_env", "is_main", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 600.0


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them (0, 1, 0 outside torchrun)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def is_main() -> bool:
    """Rank 0 (or no process group): the process that writes files and prints."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def init_from_env(device: str = "cpu") -> "Comm":
    """The process group of a torchrun job (created once: gloo on CPU, NCCL for CUDA), with a
    timeout on collectives; ``Comm.local()`` when the process was not started by torchrun."""
    import torch.distributed as dist

    rank, world, _ = world_from_env()
    if world <= 1:
        return Comm.local()
    if not dist.is_initialized():
        timeout = float(os.environ.get("IEF_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
        atexit.register(_destroy)
    return Comm(dist.get_rank(), dist.get_world_size(), device=torch.device(device))


EXIT_BARRIER_S = 30.0
_finished = False


def finished(done: bool = True) -> None:
    """Mark this rank's work as ended without error (``done``), or not: at exit a finished gloo rank
    meets the other ranks before its process group is destroyed (see the module doc)."""
    global _finished
    _finished = bool(done)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        if _finished and dist.get_backend() == "gloo":
            try:  # bounded: a peer that is gone costs at most EXIT_BARRIER_S, then the teardown goes on
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=EXIT_BARRIER_S))
            except Exception:  # noqa: BLE001 - at exit, after the work: nothing left to report
                pass
        dist.destroy_process_group()


@contextlib.contextmanager
def _lost_peer(what: str, rank: int):
    """A collective that fails (a peer crashed, or did not answer within the timeout) -> one line."""
    try:
        yield
    except RuntimeError as e:
        from iefcli.errors import RunFailed

        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunFailed(f"rank {rank}: {what} failed: another rank crashed or did not answer within "
                        f"IEF_DIST_TIMEOUT_S ({first[:200]})") from None


class Comm:
    """Rank, world size and the two collectives (see the module docstring)."""

    def __init__(self, rank: int, world: int, device: torch.device | str = "cpu", group=None):
        self.rank, self.world, self.group = int(rank), int(world), group
        self.device = torch.device(device)
        self.bytes_gathered = 0
        self.bytes_reduced = 0
        self.calls = {"all_gather": 0, "all_reduce": 0}

    @classmethod
    def local(cls) -> "Comm":
        return cls(0, 1)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    # -- collectives

    def _all_gather(self, t: Tensor) -> list[Tensor]:
        import torch.distributed as dist

        out = [torch.empty_like(t) for _ in range(self.world)]
        with _lost_peer("all_gather", self.rank):
            dist.all_gather(out, t, group=self.group)
        self.calls["all_gather"] += 1
        return out

    def all_reduce_(self, t: Tensor) -> Tensor:
        """Sum ``t`` over the ranks, in place (returns it)."""
        if self.world > 1:
            import torch.distributed as dist

            with _lost_peer("all_reduce", self.rank):
                dist.all_reduce(t, group=self.group)
            self.calls["all_reduce"] += 1
            self.bytes_reduced += t.numel() * t.element_size()
        return t

    def counts(self, n_local: int) -> list[int]:
        """Every rank's sample count (one small all_gather)."""
        if self.world == 1:
            return [n_local]
        t = torch.tensor([n_local], dtype=torch.int64, device=self.device)
        return [int(x) for x in torch.cat(self._all_gather(t)).tolist()]

    def gather_samples(self, tensors: list[Tensor], counts: list[int]) -> list[Tensor]:
        """Each tensor (A, n_local, *rest) -> (A, sum(counts), *rest): the ranks' tensors concatenated
        along dim 1 in rank order. ``counts``: every rank's n (from :meth:`counts`); A and rest must
        be the same on every rank. One all_gather of all the tensors packed as bytes."""
        if self.world == 1:
            return list(tensors)
        mine = counts[self.rank]
        for t in tensors:
            if t.dim() < 2 or t.shape[1] != mine:
                raise ValueError(f"gather_samples: expected dim 1 = {mine} (this rank's samples), got {tuple(t.shape)}")
        flat = [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors]
        size = lambda t, n: t.element_size() * (t.numel() // max(1, mine)) * n if mine else 0  # noqa: E731
        per_rank = [sum(size(t, n) for t in tensors) for n in counts]
        pad = max(per_rank)
        buf = torch.zeros(pad, dtype=torch.uint8, device=tensors[0].device if tensors else self.device)
        if flat:
            local = torch.cat(flat)
            if local.numel() != per_rank[self.rank]:
                raise AssertionError("gather_samples: payload size")
            buf[: local.numel()] = local
        self.bytes_gathered += per_rank[self.rank]
        got = self._all_gather(buf)
        out_parts: list[list[Tensor]] = [[] for _ in tensors]
        for r, (b, n) in enumerate(zip(got, counts)):
            off = 0
            for i, t in enumerate(tensors):
                nbytes = size(t, n)
                shape = (t.shape[0], n, *t.shape[2:])
                out_parts[i].append(b[off : off + nbytes].clone().view(t.dtype).reshape(shape))  # clone: aligned
                off += nbytes
        return [torch.cat(p, dim=1) for p in out_parts]

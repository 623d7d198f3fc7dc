"""Timing of the preconditioner inside a plain torch loop: ``bench_loop``.

Three ways to take one step on the same model and batch (the bench's
workloads, :func:`iefcli.eval.bench.build_workload`: ``mlp`` 64-1024-1024-10,
``bert-lora``, ...), each on its own copy of the model:

- ``sgd_loop``:     zero_grad, forward, mean loss, backward, torch.optim.SGD step;
- ``precond_loop``: the same loop with ``pre.loss`` / ``pre.step()`` (iEF by default);
- ``cli_fast``:     the CLI's optimiser update on the fast path (``batch_grads`` + the method
                    table, :class:`iefcli.eval.bench.Step`, ``jacobian="fast"``).

Steps alternate within every round (``warmup`` rounds first, then ``repeats``);
the medians of wall time and process CPU time are reported, and the peak
memory of one step: CUDA, ``max_memory_allocated``; Linux CPU, the growth of
the resident set during the step (high-water mark reset before it, glibc
asked to return freed blocks >= 64 KiB to the OS) plus the model and batch.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["bench_loop", "PATHS"]

PATHS = ("sgd_loop", "precond_loop", "cli_fast")


def _loop_step(wl, model, *, pre=None, lr: float) -> Callable[[], None]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = wl.forward(model, {}, wl.inputs)
        if pre is None:
            wl.loss_fn.per_sample(logits, wl.targets).mean().backward()
        else:
            pre.loss(logits, wl.targets).backward()
            pre.step()
        opt.step()

    return step


def _peak_setup() -> bool:
    try:
        from iefcli.eval.bench import cpu_peak_supported

        if not cpu_peak_supported():
            return False
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: freed big blocks go back to the OS
        # and what the heap already holds free (`ief` keeps it: iefcli.allocator) goes back now, or the
        # steps below would be served from it and the resident set would not show their peak
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError, ImportError):
        return False


def _peak_mib(step: Callable[[], None], device: torch.device, held: int, cpu_ok: bool) -> float | None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    if not cpu_ok:
        return None
    from iefcli.eval.bench import _proc_kib, _reset_peak_rss

    before = _proc_kib("VmRSS")
    _reset_peak_rss()
    step()
    return ((_proc_kib("VmHWM") - before) * 1024 + held) / 2**20


def _paths(wl, *, method: str, damping: float, lr: float, seed: int):
    """The three steps of :data:`PATHS` on ``wl`` (each on its own copy of the model) and the preconditioner."""
    from iefcli.eval.bench import Step
    from iefcli.precond.preconditioner import Preconditioner

    m_sgd, m_pre = copy.deepcopy(wl.model), copy.deepcopy(wl.model)
    pre = Preconditioner(m_pre, method=method, damping=damping, loss=wl.loss_fn)
    steps = {"sgd_loop": _loop_step(wl, m_sgd, lr=lr),
             "precond_loop": _loop_step(wl, m_pre, pre=pre, lr=lr),
             "cli_fast": Step(method, wl, jacobian="fast", damping=damping, lr=lr, seed=seed)}
    return steps, pre


def bench_loop(*, model: str = "mlp", batch_sizes=(32, 64, 128), method: str = "ief", damping: float = 1e-7,
               lr: float = 1e-6, repeats: int = 5, warmup: int = 2, seed: int = 0, device: str = "cpu",
               memory: bool = True, threads: int | None = None) -> list[dict[str, Any]]:
    """Rows ``{model, n, path, wall_ms, cpu_ms, peak_mib, wall_vs_sgd, cpu_vs_sgd}``, one per batch size
    and path (:data:`PATHS`); ``peak_mib`` is None where it cannot be measured. The lr is tiny so
    that repeated steps stay at (almost) the same point. ``threads``: torch's CPU threads (None: as is).

    Every batch size is timed first; the CPU peaks are measured afterwards, in a second pass on fresh
    copies, because measuring them asks glibc to return freed blocks to the OS (``_peak_setup``),
    which would make every timed step fault its temporaries in again."""
    from iefcli.eval.bench import _workload_bytes, build_workload

    dev = torch.device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    rows: list[dict[str, Any]] = []
    for n in batch_sizes:
        wl = build_workload(model, n, seed=seed, device=dev)
        steps, pre = _paths(wl, method=method, damping=damping, lr=lr, seed=seed)
        wall: dict[str, list[float]] = {k: [] for k in steps}
        cpu: dict[str, list[float]] = {k: [] for k in steps}
        for r in range(warmup + repeats):
            for k, f in steps.items():
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0, c0 = time.perf_counter(), time.process_time()
                f()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                if r >= warmup:
                    wall[k].append(time.perf_counter() - t0)
                    cpu[k].append(time.process_time() - c0)
        base_w, base_c = statistics.median(wall["sgd_loop"]), statistics.median(cpu["sgd_loop"])
        for k in steps:
            w, c = statistics.median(wall[k]), statistics.median(cpu[k])
            rows.append({"model": model, "n": n, "path": k, "method": method if k != "sgd_loop" else "sgd",
                         "wall_ms": 1e3 * w, "cpu_ms": 1e3 * c, "peak_mib": None,
                         "wall_vs_sgd": w / base_w, "cpu_vs_sgd": c / base_c})
        pre.remove()
        del wl, steps, pre
    if memory:
        cpu_ok = dev.type == "cpu" and _peak_setup()
        for n in batch_sizes:
            wl = build_workload(model, n, seed=seed, device=dev)
            steps, pre = _paths(wl, method=method, damping=damping, lr=lr, seed=seed)
            for f in steps.values():  # lazy initialisation is not the step's memory
                f()
            held = _workload_bytes(wl)
            for row in rows:
                if row["n"] == n:
                    row["peak_mib"] = _peak_mib(steps[row["path"]], dev, held, cpu_ok)
            pre.remove()
            del wl, steps, pre
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as a plain-text table (for a CLI or a report)."""
    head = f"{'model':<10} {'N':>4} {'path':<13} {'wall ms':>9} {'cpu ms':>9} {'peak MiB':>9} {'wall/sgd':>9} {'cpu/sgd':>8}"
    lines = [head]
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        lines.append(f"{r['model']:<10} {r['n']:>4} {r['path']:<13} {r['wall_ms']:>9.2f} {r['cpu_ms']:>9.2f} "
                     f"{peak:>9} {r['wall_vs_sgd']:>9.2f} {r['cpu_vs_sgd']:>8.2f}")
    return "\n".join(lines)

"""Time ``iefcli.core.solve.solve_gram`` / ``duplicate_mask`` against the implementation they replaced.

    python tools/bench_solve.py                      # M = 32, 64, 128, 512, one thread
    python tools/bench_solve.py --sizes 32,64 --repeats 21 --json
    python tools/bench_solve.py --models cnn-gn,tied,encoder -n 32   # whole steps, old vs new solve

The previous implementation (before the fixed-cost rewrite, issue 14) is kept verbatim below as
``old_solve_gram`` / ``old_duplicate_mask``: the benchmark's baseline, and the tests' bitwise twin
(``tests/test_solve.py`` loads this file). For each size M the Gram of M random rows (3M columns,
float64) is solved with damping 1e-3 and the default duplicate threshold 0.99, and with the filter
off; each round times a batch of calls of the old and then the new function (order alternating
between rounds), so both see the same machine state, and the medians over rounds are reported.
Absolute times on a shared machine are noisy; the ratios come from the paired rounds.

``--models``: for each ``ief bench`` model spec, one process times an SGD step, an iEF step and
an iEF step whose Gram solve is the old one (``iefcli.directions.solve_gram`` swapped for the
duration of that step), alternating within every round (``iefcli.eval.bench.time_methods``),
the step ``ief train`` runs between log lines (no diagnostics).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch import Tensor

from iefcli.core.solve import SolveInfo, duplicate_mask, solve_gram

# ----------------------------------------------------------------------------- the old implementation


def old_duplicate_mask(gram: Tensor, threshold: float | None) -> Tensor:
    """Bool (M,) mask of rows to KEEP.

    Row i is dropped when it is all-zero, or when some row j has
    |cos(i, j)| > threshold and a larger norm (or the same norm and j < i).
    ``threshold`` None or 0 keeps every non-zero row.
    """
    norms2 = torch.diagonal(gram)
    nonzero = norms2 > 0
    if not threshold:
        return nonzero
    norms = norms2.clamp_min(torch.finfo(gram.dtype).tiny).sqrt()
    cos = gram / (norms[:, None] * norms[None, :])
    m = gram.shape[0]
    idx = torch.arange(m, device=gram.device)
    # j "beats" i when it is larger, or equal and earlier.
    beats = (norms[None, :] > norms[:, None]) | ((norms[None, :] == norms[:, None]) & (idx[None, :] < idx[:, None]))
    close = (cos.abs() > threshold) & beats & nonzero[None, :]
    close.fill_diagonal_(False)
    return nonzero & ~close.any(dim=1)


def old_solve_gram(
    gram: Tensor,
    rhs: Tensor,
    damping: float,
    *,
    dup_threshold: float | None = 0.99,
    branch_free: bool | None = None,
) -> tuple[Tensor, SolveInfo]:
    """Solve (C_KK + damping I) x_K = b_K in float64; x is 0 off K. See module doc.

    ``branch_free``: None (default) branches on the CPU and not elsewhere; True
    forces the accelerator's branch-free fallback on any device.
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    c = gram.to(torch.float64)
    b = rhs.to(torch.float64)
    keep = old_duplicate_mask(c, dup_threshold)
    keepf = keep.to(torch.float64)
    m = c.shape[0]
    eye = torch.eye(m, dtype=torch.float64, device=c.device)
    # Dropped rows/columns become identity rows/columns with a zero right-hand side.
    # (Built from keepf, not torch.where(keep, damping, 1.0): that makes a float32
    # tensor and would round the damping to float32.)
    a = c * keepf[:, None] * keepf[None, :] + eye * (keepf * damping + (1.0 - keepf))
    bk = b * keepf

    chol, info = torch.linalg.cholesky_ex(a)
    failed = info != 0
    x = torch.cholesky_solve(bk.unsqueeze(1), chol).squeeze(1)
    diag = torch.diagonal(chol)
    cond = (diag.max() / diag.min()) ** 2
    if a.device.type == "cpu" and not branch_free:
        # A CPU memory read, not a device sync: the eigen path runs only when needed, and never on a
        # non-finite Gram (NaN/Inf per-sample gradients: eigh would raise; x stays non-finite below).
        if bool(failed) and bool(torch.isfinite(a).all()):
            evals, evecs = torch.linalg.eigh(a)
            tol = evals.abs().max() * m * torch.finfo(torch.float64).eps
            inv = torch.where(evals > tol, 1.0 / evals.clamp_min(tol), torch.zeros_like(evals))
            x = evecs @ (inv * (evecs.T @ bk))
            cond = evals.max() / evals.clamp_min(tol).min()
    else:
        # Branch-free: always solve once more with the damping floored at sqrt(eps) * max diag,
        # and pick by the flag. Dropped rows are identity rows either way.
        tau = torch.finfo(torch.float64).eps ** 0.5 * torch.diagonal(a).max()
        a_floor = a + torch.diag(keepf * (tau - damping).clamp_min(0))
        chol_f, _ = torch.linalg.cholesky_ex(a_floor)
        x_floor = torch.cholesky_solve(bk.unsqueeze(1), chol_f).squeeze(1)
        x = torch.where(failed, x_floor, x)
        diag_f = torch.diagonal(chol_f)
        cond = torch.where(failed, (diag_f.max() / diag_f.min()) ** 2, cond)
    # A non-finite Gram or right-hand side (NaN/Inf per-sample gradients) gives an all-NaN x on
    # every path, so the caller sees a non-finite update and rejects the step (no exception).
    finite = torch.isfinite(a).all() & torch.isfinite(bk).all()
    x = torch.where(finite, x, torch.full_like(x, float("nan")))
    resid = torch.linalg.vector_norm(a @ x - bk) / torch.linalg.vector_norm(bk).clamp_min(torch.finfo(torch.float64).tiny)
    info_out = SolveInfo(residual=resid, rows_kept=keep.sum(), cond=cond, fallback=failed)
    return x * keepf, info_out


# ----------------------------------------------------------------------------- timing


def problem(m: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(m, 3 * m, dtype=torch.float64, generator=g)
    return r @ r.T, torch.randn(m, dtype=torch.float64, generator=g)


def _per_call_ms(fn, calls: int) -> tuple[float, float]:
    """(wall, thread CPU) ms per call over `calls` calls."""
    w0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - w0) / calls * 1e3, (time.thread_time() - c0) / calls * 1e3


def measure(m: int, *, repeats: int = 11, target_ms: float = 20.0) -> dict:
    """Median per-call ms (wall and thread CPU) of old vs new for M = m: the solve with the duplicate
    filter (threshold 0.99) and without, and the mask alone; ratios old / new."""
    c, b = problem(m)
    pairs = {
        "solve": (lambda: old_solve_gram(c, b, 1e-3), lambda: solve_gram(c, b, 1e-3)),
        "solve_nodup": (lambda: old_solve_gram(c, b, 1e-3, dup_threshold=None),
                        lambda: solve_gram(c, b, 1e-3, dup_threshold=None)),
        "mask": (lambda: old_duplicate_mask(c, 0.99), lambda: duplicate_mask(c, 0.99)),
    }
    out: dict = {"M": m}
    for name, (old, new) in pairs.items():
        for f in (old, new, old, new):  # warm-up
            f()
        calls = max(1, int(target_ms / max(_per_call_ms(old, 1)[0], 1e-3)))
        times: dict[str, list] = {"old": [], "new": []}
        for k in range(repeats):  # paired rounds, the order alternating
            for which in (("old", "new") if k % 2 == 0 else ("new", "old")):
                times[which].append(_per_call_ms(old if which == "old" else new, calls))
        for clock, i in (("wall", 0), ("cpu", 1)):
            o = statistics.median(t[i] for t in times["old"])
            n = statistics.median(t[i] for t in times["new"])
            out[f"{name}_{clock}_old_ms"], out[f"{name}_{clock}_new_ms"], out[f"{name}_{clock}_x"] = o, n, o / n
    return out


def measure_models(specs: list[str], n: int, *, repeats: int = 11, warmup: int = 2) -> list[dict]:
    """Median ms (wall, process CPU) of sgd / ief / ief-with-the-old-solve steps per model spec."""
    from iefcli import directions
    from iefcli.eval import bench

    out = []
    for spec in specs:
        wl = bench.build_workload(spec, n)
        sgd = bench.make_step("sgd", wl, diagnostics=False)
        new = bench.make_step("ief", wl, diagnostics=False)
        old_step = bench.make_step("ief", wl, diagnostics=False)

        def old() -> None:
            directions.solve_gram = old_solve_gram
            try:
                old_step()
            finally:
                directions.solve_gram = solve_gram

        cpu: dict[str, list[float]] = {}
        wall = bench.time_methods({"sgd": sgd, "ief": new, "ief_old_solve": old}, repeats=repeats, warmup=warmup,
                                  device=torch.device("cpu"), cpu_times=cpu)
        row: dict = {"model": spec, "N": n}
        for k in wall:
            row[f"{k}_ms"] = statistics.median(wall[k]) * 1e3
            row[f"{k}_cpu_ms"] = statistics.median(cpu[k]) * 1e3
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="32,64,128,512", help="comma-separated M")
    p.add_argument("--repeats", type=int, default=11, help="paired rounds (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="one JSON object per size instead of a table")
    p.add_argument("--models", default="", help="comma-separated `ief bench` model specs: time whole steps instead")
    p.add_argument("-n", type=int, default=32, help="batch size for --models")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.models:
        rows = measure_models(args.models.split(","), args.n, repeats=args.repeats)
        if args.json:
            for r in rows:
                print(json.dumps(r))
            return 0
        print("| model | N | SGD ms | iEF ms (old solve) | iEF ms (new solve) | iEF/SGD old | iEF/SGD new "
              "| CPU: iEF/SGD old | CPU: iEF/SGD new |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['N']} | {r['sgd_ms']:.2f} | {r['ief_old_solve_ms']:.2f} | {r['ief_ms']:.2f} "
                  f"| {r['ief_old_solve_ms'] / r['sgd_ms']:.2f} | {r['ief_ms'] / r['sgd_ms']:.2f} "
                  f"| {r['ief_old_solve_cpu_ms'] / r['sgd_cpu_ms']:.2f} | {r['ief_cpu_ms'] / r['sgd_cpu_ms']:.2f} |")
        print(f"(median of {args.repeats} alternating rounds, {args.threads} thread(s); wall ms; "
              "absolute ms are noisy on a shared machine)")
        return 0
    rows = [measure(int(m), repeats=args.repeats) for m in args.sizes.split(",")]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    for clock in ("cpu", "wall"):
        print(f"{clock} ms per call (old -> new, old/new)")
        print()
        print("| M | solve_gram (threshold 0.99) | x | solve_gram (no filter) | x | duplicate_mask | x |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            cells = [f"{r['M']}"]
            for k in ("solve", "solve_nodup", "mask"):
                cells += [f"{r[f'{k}_{clock}_old_ms']:.4f} -> {r[f'{k}_{clock}_new_ms']:.4f}", f"{r[f'{k}_{clock}_x']:.2f}"]
            print("| " + " | ".join(cells) + " |")
        print()
    print(f"(median of {args.repeats} paired rounds, {args.threads} thread(s), torch {torch.__version__}; "
          "absolute ms are noisy on a shared machine, the ratios come from paired rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

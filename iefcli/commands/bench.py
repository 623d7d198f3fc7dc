"""`ief bench`: time SGD vs EF / iEF / SF steps (and their peak memory) on one model and batch.

The shell around :func:`iefcli.eval.bench.run_bench`: parse options, print a Rich
table or ``--json``. All timing and memory logic lives in :mod:`iefcli.eval.bench`.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Annotated, Any, Optional

import typer

from iefcli.commands._common import cli_errors, err, out
from iefcli.core.methods import BENCH_METHODS
from iefcli.errors import UsageError

DEFAULT_BATCH_SIZES = "32,64,128"
DEFAULT_METHODS = ",".join(BENCH_METHODS)


def parse_int_list(text: str, option: str) -> list[int]:
    vals: list[int] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            v = int(item)
        except ValueError:
            raise UsageError(f"{option} {text}: {item!r} is not an integer") from None
        if v < 1:
            raise UsageError(f"{option} {text}: {item} must be >= 1")
        vals.append(v)
    if not vals:
        raise UsageError(f"{option} {text!r}: give at least one value")
    return vals


def parse_methods(text: str) -> list[str]:
    from iefcli.eval.bench import choices

    items = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in items if m not in choices()]
    if bad or not items:
        raise UsageError(f"--methods {text}: {', '.join(bad) or 'empty'}; choose from {', '.join(choices())}")
    return list(dict.fromkeys(items))


def _fmt(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def _notes(rows: list[dict]) -> list[str]:
    """The footnotes under the table: a prefix-only fast-vs-plain check, the parameters without a rule."""
    partial = sorted({r["check_n"] for r in rows if r.get("check_n") not in (None, r["batch_size"])})
    notes = []
    if partial:
        notes.append(f"* fast vs plain checked on the first {', '.join(map(str, partial))} samples "
                     "(the plain path's N x P would exceed 2^26 numbers)")
    fell = next((r["fallback_params"] for r in rows if r.get("fallback_params")), {})
    if fell:
        notes.append(f"{len(fell)} parameter(s) without a layer rule (replay: only their module per sample; "
                     "vmap: the whole model per sample):")
        notes.extend(f"  {p} -> {why}" for p, why in fell.items())
    return notes


def _diff(r: dict) -> str:
    diff = _fmt(r["max_rel_diff_fast_vs_plain"], ".1e")
    return diff + "*" if r.get("check_n") not in (None, r["batch_size"]) else diff


def render_table(rows: list[dict], *, wide: bool = False):
    """The timing table, within 80 columns: wall and CPU ms and peak MiB with their ratios to SGD; the
    direction checks follow in a second table (:func:`render_check_table`). ``wide``: one table."""
    from rich.table import Table

    first = rows[0]
    title = (f"ief bench: {first['model']} (P = {first['n_params']:,}), {first['device']}, "
             f"{first['threads']} thread(s), median of {first['repeats']}"
             + (", logging steps" if first.get("diagnostics") else "")
             + (", system malloc" if first.get("cpu_allocator") == "system" else ""))
    t = Table(title=title)
    cols = [("N", "right"), ("optimizer", "left"), ("path", "left"), ("wall ms", "right"), ("xSGD", "right"),
            ("CPU ms", "right"), ("xSGD", "right"), ("MiB", "right"), ("xSGD", "right")]
    if wide:
        cols += [("fast vs plain", "right"), ("vs float64", "right")]
    for col, justify in cols:
        t.add_column(col, justify=justify)
    notes = _notes(rows)
    if notes and wide:
        t.caption = "\n".join(notes)
    elif notes:  # the fallback list stays under the timing table; the prefix footnote under the checks
        t.caption = "\n".join(n for n in notes if not n.startswith("* "))
    for r in rows:
        cells = [str(r["batch_size"]), r["optimizer"], r["jacobian"], _fmt(r["ms_median"], ".1f"),
                 _fmt(r["ratio_to_sgd"], ".2f"), _fmt(r.get("cpu_ms_median"), ".1f"),
                 _fmt(r.get("cpu_ratio_to_sgd"), ".2f"), _fmt(r["peak_mb"], ".1f"), _fmt(r["peak_ratio_to_sgd"], ".2f")]
        if wide:
            cells += [_diff(r), _fmt(r.get("max_rel_diff_vs_float64"), ".1e")]
        t.add_row(*cells)
    return t


def render_check_table(rows: list[dict]):
    """The direction checks (max relative difference, fast vs plain path and vs a float64 reference on
    all N rows) of the rows that have one; None when no check ran."""
    from rich.table import Table

    checked = [r for r in rows if r.get("max_rel_diff_fast_vs_plain") is not None
               or r.get("max_rel_diff_vs_float64") is not None]
    if not checked:
        return None
    t = Table(title="direction check: max relative difference")
    for col in ("N", "optimizer", "fast vs plain", "vs float64 (all N)"):
        t.add_column(col, justify="left" if col == "optimizer" else "right")
    for r in checked:
        t.add_row(str(r["batch_size"]), r["optimizer"], _diff(r), _fmt(r.get("max_rel_diff_vs_float64"), ".1e"))
    partial = [n for n in _notes(rows) if n.startswith("* ")]
    if partial:
        t.caption = partial[0]
    return t


def render_loop_table(rows: list[dict]):
    from rich.table import Table

    t = Table(title=f"ief bench --loop: {rows[0]['model']} (the Preconditioner in a plain torch loop)")
    for col in ("N", "path", "wall ms", "CPU ms", "peak MiB", "wall x SGD", "CPU x SGD"):
        t.add_column(col, justify="left" if col == "path" else "right")
    for r in rows:
        t.add_row(str(r["n"]), r["path"], _fmt(r["wall_ms"], ".1f"), _fmt(r["cpu_ms"], ".1f"),
                  _fmt(r["peak_mib"], ".1f"), _fmt(r["wall_vs_sgd"], ".2f"), _fmt(r["cpu_vs_sgd"], ".2f"))
    return t


def bench(
    model: Annotated[str, typer.Option(help="Built-in model spec: mlp (64-1024-1024-10), mlp:W0-W1-...-C, bert-lora (tiny BERT + LoRA, sequence length 64; needs transformers and peft), bert (the same BERT, full fine-tuning), or one of mha, encoder, conv1d, cnn-bn, cnn-gn, resnet-gn, resnet-bn, lstm, tied (small models with and without layer rules).")] = "mlp",
    recipe: Annotated[Optional[str], typer.Option(help="Benchmark a training recipe's model and data instead (a YAML file or built-in name); overrides --model.")] = None,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", "-n", help="Comma-separated batch sizes N.")] = DEFAULT_BATCH_SIZES,
    methods: Annotated[str, typer.Option(help="Comma-separated optimisers (any of `ief train`'s: sgd, adamw, adafactor, ef, ief, sf, ngd; ratios need sgd).")] = DEFAULT_METHODS,
    jacobian: Annotated[str, typer.Option(help="Path timed for ef/ief/sf: auto (fast), fast, or vmap (the plain per-sample path).")] = "auto",
    repeats: Annotated[int, typer.Option(help="Timed rounds; the methods alternate within each round.")] = 7,
    warmup: Annotated[int, typer.Option(help="Untimed rounds first.")] = 2,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (default: torch's).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    damping: Annotated[float, typer.Option(help="Damping of the EF/iEF/SF/NGD solves, on the paper's scale (as in recipes).")] = 1e-4,
    seed: Annotated[int, typer.Option(help="Seeds the model and the random batch.")] = 0,
    memory: Annotated[bool, typer.Option(help="Measure peak memory (CPU: in a worker process).")] = True,
    check: Annotated[bool, typer.Option(help="Compare fast-path and plain-path directions.")] = True,
    diagnostics: Annotated[bool, typer.Option(help="Time logging steps (grad norm, cosine, imbalance, ... for every method) instead of the step `ief train` runs between log lines.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON list of result objects on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress notes on stderr.")] = False,
    wide: Annotated[bool, typer.Option("--wide", help="One table with the direction checks as columns (wider than 80 columns).")] = False,
    loop: Annotated[bool, typer.Option("--loop", help="Time the Preconditioner inside a plain torch loop instead (sgd_loop, precond_loop, cli_fast; the first of --methods' curvature methods, default ief).")] = False,
) -> None:
    """Time an SGD step and EF / iEF / SF steps on the same model and batch, for each batch size.

    Each step is the optimiser update `ief train` runs. Methods alternate after warm-up; medians, the ratio to SGD, peak memory (CPU: resident set
    of a worker process; CUDA: max_memory_allocated) and the max relative difference between
    fast-path and plain-path directions are reported.
    """
    with cli_errors():
        sizes = parse_int_list(batch_sizes, "--batch-sizes")
        method_list = parse_methods(methods)
        from iefcli.eval.bench import run_bench

        note = None if quiet else (lambda msg: err.print(f"ief: note: {msg}", highlight=False))
        if recipe is not None:
            model = f"recipe:{recipe}"
        if loop:
            from iefcli.eval.bench import CURVATURE, build_workload
            from iefcli.precond.bench import bench_loop

            method = next((m for m in method_list if m in CURVATURE), "ief")
            build_workload(model, 1, seed=seed)  # a bad --model fails here, with one line
            if threads is not None and threads < 1:
                raise UsageError("--threads must be >= 1")
            rows = bench_loop(model=model, batch_sizes=sizes, method=method, repeats=repeats, warmup=warmup,
                              seed=seed, device=device, memory=memory, threads=threads)
            if json_out:
                sys.stdout.write(json.dumps(rows, indent=2) + "\n")
                sys.stdout.flush()
                return
            out.print(render_loop_table(rows))
            return
        rows = run_bench(model=model, batch_sizes=sizes, methods=method_list, jacobian=jacobian,
                         repeats=repeats, warmup=warmup, threads=threads, device=device, damping=damping,
                         seed=seed, memory=memory, check=check, progress=note, diagnostics=diagnostics)
        if json_out:
            from iefcli.train.jsonout import stamp  # a list: each result object carries the versions

            sys.stdout.write(json.dumps([stamp(r) for r in rows], indent=2) + "\n")
            sys.stdout.flush()
            return
        out.print(render_table(rows, wide=wide))
        check_table = None if wide else render_check_table(rows)
        if check_table is not None:
            out.print(check_table)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)

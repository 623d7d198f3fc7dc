"""`ief compare`: one table of final numbers over several run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from iefcli.commands._common import cli_errors, json_option, out_option, overwrite_option, print_table
from iefcli.errors import UsageError


def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories written by `ief train`.", show_default=False)],
    json_out: Annotated[bool, json_option("the rows (one document) instead of the table")] = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="Print the rows as CSV instead of the table.")] = False,
    out_file: Annotated[
        Optional[Path],
        out_option("Write the rows to this .json or .csv file (format from --json/--csv, else the suffix)."),
    ] = None,
    overwrite: Annotated[bool, overwrite_option("an existing --out file")] = False,
    group_seeds: Annotated[bool, typer.Option(
        "--group-seeds", help="One row per group of runs whose recipes differ only by seed: mean ± std.")] = False,
) -> None:
    """Compare runs in one table (or JSON / CSV).

    A row per run: recipe, optimiser, lr, damping, steps, final train loss,
    best validation metric and its step, test metric at the best-validation
    checkpoint, wall time, steps/s. Runs are grouped by task and the best
    value of each column within a task is highlighted. Reads the run
    directories only (no re-training); a run without summary.json yet is
    shown from its latest metrics with status 'running'.
    """
    from iefcli.train.jsonout import json_errors

    with cli_errors(), json_errors(json_out, "compare"):
        run_compare(run_dirs=run_dirs, json_out=json_out, csv_out=csv_out, out_file=out_file, overwrite=overwrite,
                    group_seeds=group_seeds)


def run_compare(
    *, run_dirs: list[Path], json_out: bool = False, csv_out: bool = False, out_file: Path | None = None,
    overwrite: bool = False, group_seeds: bool = False,
) -> list[dict]:
    """Load runs, print the table (or JSON / CSV) on stdout, optionally write --out; return the rows
    (with ``group_seeds``: one row per seed group, :mod:`iefcli.eval.seeds`)."""
    from iefcli.eval import reports, seeds

    if json_out and csv_out:
        raise UsageError("--json and --csv: choose one")
    fmt = "json" if json_out else "csv" if csv_out else None
    if out_file is not None:
        if fmt is None:
            fmt = {".json": "json", ".csv": "csv"}.get(out_file.suffix.lower())
            if fmt is None:
                raise UsageError(f"--out {out_file}: cannot tell the format; use a .json or .csv name, or --json/--csv")
        reports.prepare_output(out_file, overwrite=overwrite)  # fail before reading anything
        from iefcli.train.rundir import check_writable

        check_writable(out_file.parent, f"--out {out_file}:")
    runs = reports.load_runs(run_dirs)
    if group_seeds:
        rows = seeds.grouped_compare_rows(runs)
        text = {"json": seeds.grouped_to_json, "csv": seeds.grouped_to_csv}[fmt](rows) if fmt else None
        show = lambda: print_table(seeds.grouped_table(rows))  # noqa: E731
    else:
        rows = reports.compare_rows(runs)
        marks = reports.best_per_column(rows, reports.metric_modes(runs))
        text = {"json": lambda r: _stamped(reports.rows_to_json(r, marks)), "csv": reports.rows_to_csv}[fmt](rows) if fmt else None
        show = lambda: _print_table(rows, marks)  # noqa: E731
    if out_file is not None:
        reports.write_text_atomic(out_file, text)
        show()
        typer.echo(f"wrote {out_file}", err=True)
    elif text is not None:
        typer.echo(text, nl=False)
    else:
        show()
    return rows


def _stamped(text: str) -> str:
    """The {"columns", "rows"} document with the package and schema versions first."""
    import json

    from iefcli.train.jsonout import dumps, stamp

    return dumps(stamp(json.loads(text)))


def _print_table(rows, marks) -> None:
    from rich.markup import escape

    from iefcli.eval.reports import render_table

    # Names come from users' recipes and run directories: a name like "[/x]" is text, not markup.
    rows = [{k: escape(v) if isinstance(v, str) else v for k, v in r.items()} for r in rows]
    print_table(render_table(rows, marks, colour=True), plain=render_table(rows, marks, colour=False))


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)

"""`ief plot`: training-loss and validation-metric curves of several runs in one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from iefcli.commands._common import cli_errors, out_option, overwrite_option
from iefcli.errors import UsageError


def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories written by `ief train`.", show_default=False)],
    out_file: Annotated[Path, out_option("The figure file to write: .png, .pdf or .svg.")],
    x: Annotated[str, typer.Option("--x", help="Horizontal axis: step, or time (wall-clock seconds).")] = "step",
    overwrite: Annotated[bool, overwrite_option("an existing --out file")] = False,
) -> None:
    """Plot training-loss and validation-metric curves of runs into one figure (PNG, PDF or SVG by --out's suffix).

    One row of two panels per task: training loss (log scale) and the
    validation metric, against step, or wall time with --x time. One line
    per run, labelled by its optimiser. Reads the run directories only (no
    re-training).
    """
    with cli_errors():
        run_plot(run_dirs=run_dirs, out_file=out_file, x=x, overwrite=overwrite)


def run_plot(*, run_dirs: list[Path], out_file: Path, x: str = "step", overwrite: bool = False):
    """Load runs, draw, write ``out_file`` atomically; return the Figure."""
    from iefcli.eval import reports
    from iefcli.eval.figures import FIGURE_FORMATS, runs_figure, save_figure

    if x not in ("step", "time"):
        raise UsageError(f"--x: must be step or time, got {x!r}")
    if out_file.suffix.lower().lstrip(".") not in FIGURE_FORMATS:
        raise UsageError(f"--out {out_file}: must end in {', '.join('.' + f for f in FIGURE_FORMATS)}")
    reports.prepare_output(out_file, overwrite=overwrite)
    runs = reports.load_runs(run_dirs)
    fig = runs_figure(runs, x=x)
    save_figure(fig, out_file)
    typer.echo(f"wrote {out_file}")
    return fig


def register(app: typer.Typer) -> None:
    app.command("plot")(plot)

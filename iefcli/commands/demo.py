"""`ief demo toy`: the paper's Figure 1 on a 2-parameter least-squares problem."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from iefcli.commands._common import cli_errors, out_option, overwrite_option


def toy(
    out: Annotated[Path, out_option("Directory for toy.png (created if missing).")],
    steps: Annotated[int, typer.Option("--steps", min=1, help="Steps K of every trajectory.")] = 40,
    grid: Annotated[int, typer.Option("--grid", min=2, help="Vector-field arrows per axis.")] = 15,
    ef_damping: Annotated[Optional[float], typer.Option(
        "--ef-damping", min=0.0, help="EF's damping lambda (paper scale; default: the toy's 2.5e-3).")] = None,
    overwrite: Annotated[bool, overwrite_option("an existing toy.png")] = False,
) -> None:
    """Draw the paper's Figure 1: SGD, NGD/iEF and EF on 2-datum linear least squares.

    Three panels (SGD, NGD / iEF, EF): loss contours, the normalised update
    field, the two per-sample optimal lines (dashed), the global minimum and
    5 trajectories from fixed starts. Every direction comes from the core
    (batch_grads + iefcli.directions). Prints one line per method with the
    mean loss after K steps, so the result can be checked without looking.
    """
    with cli_errors():
        run_demo_toy(out=out, steps=steps, grid=grid, ef_damping=ef_damping, overwrite=overwrite)


def run_demo_toy(*, out: Path, steps: int, grid: int, ef_damping: float | None, overwrite: bool) -> Path:
    """Compute, print the summary lines on stdout, write OUT/toy.png; return its path."""
    from iefcli.eval.figures import save_png, toy_figure
    from iefcli.eval.reports import prepare_output
    from iefcli.eval.toy import METHODS, ToySettings, run_toy

    png = prepare_output(Path(out) / "toy.png", overwrite=overwrite, make_parent=True)
    defaults = ToySettings()
    ef = defaults.damping["ef"] if ef_damping is None else ef_damping
    settings = ToySettings(steps=steps, damping={**defaults.damping, "ef": ef})
    result = run_toy(settings=settings, grid=grid)
    fig = toy_figure(result)
    save_png(fig, png)
    n_starts = len(settings.starts)
    for m in METHODS:
        final = result.final_loss[m]
        typer.echo(
            f"{m:<4} final loss after {steps} steps: {float(final.mean()):.3e} "
            f"(mean of {n_starts} starts, max {float(final.max()):.3e}; "
            f"lr {settings.lr[m]:g}, damping {settings.damping[m]:g})"
        )
    typer.echo(f"iEF vs NGD: largest relative direction difference along iEF's paths {result.ief_ngd_gap:.1e}")
    typer.echo(f"wrote {png}")
    return png


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        name="demo",
        help="Small self-contained demonstrations (no data, no training run needed).",
        no_args_is_help=True,
    )
    group.command("toy")(toy)
    app.add_typer(group, name="demo")

"""`ief reproduce`: run the offline equivalents of the paper's experiments and write a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from iefcli.commands._common import cli_errors


def reproduce(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Report directory (default: reproduce-quick or reproduce-full). Resumable: finished runs in it are reused.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="CPU-sized: toy, digits, small Fashion-MNIST, gamma on digits, short runs (about 15 minutes on 2 cores).")] = False,
    tasks: Annotated[Optional[str], typer.Option(help="Comma-separated subset of: toy, digits, fmnist, minilm-lora, minilm-prompt, vit, gamma (default: all; with --quick: toy,digits,fmnist,gamma).")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per optimiser and task (0..N-1); the paper's claims need >= 3.")] = 3,
    steps: Annotated[Optional[int], typer.Option(help="Override every run's training steps (smoke tests; default: the recipes', shortened by --quick).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda (default: each recipe's).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines on stderr.")] = False,
) -> None:
    """Reproduce the paper's claims offline: REPORT.md with tables, figures and a verdict per claim.

    Sections: optimisation (Table 2 layout: SGD, AdamW, Adafactor, EF, SF, iEF; final
    train loss and test metric, mean +- std over seeds), approximation quality
    (eval-gamma over training stages and dampings for EF, SF, iEF and exact NG), and
    the Figure 1 toy. Every sub-run is an ordinary run directory under OUT/runs;
    running the command again resumes (finished runs are reused).
    """
    with cli_errors():
        run_reproduce(out=out, quick=quick, tasks=tasks, seeds=seeds, steps=steps, device=device, quiet=quiet)


def run_reproduce(*, out: Path | None, quick: bool, tasks: str | None, seeds: int, steps: int | None,
                  device: str | None, quiet: bool = False):
    from iefcli.eval.reproduce import HOLDS, reproduce as run

    if device is not None and device not in ("auto", "cpu", "cuda"):
        from iefcli.errors import UsageError

        raise UsageError(f"--device {device}: choose auto, cpu or cuda")
    target = out if out is not None else Path("reproduce-quick" if quick else "reproduce-full")
    log = None if quiet else (lambda msg: typer.echo(msg, err=True))
    res = run(out=target, quick=quick, tasks=tasks, seeds=seeds, steps=steps, device=device, log=log)
    held = sum(c.verdict == HOLDS for c in res.claims)
    typer.echo(f"{held} of {len(res.claims)} claims hold here; report: {res.report}")
    return res


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce)

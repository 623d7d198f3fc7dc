"""`ief eval-gamma PATH`: how close is each method's update to the natural gradient?

Parses the options, calls :func:`iefcli.eval.gamma_run.eval_gamma` (the whole
application: checkpoints, batches, the evaluation, the --out directory) and
prints a table or the JSON on stdout; progress and notes go to stderr.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from iefcli.commands._common import (
    cli_errors, err, json_option, out, out_option, overwrite_option, print_json, print_table, quiet_option,
)
from iefcli.eval.gamma_run import run_eval_gamma  # noqa: F401  (the library entry point, for callers of the old path)

DEFAULT_METHODS = "sgd,ef,ief,sf"
DEFAULT_DAMPINGS = "1e-12,1e-10,1e-8,1e-6,1e-4,1e-2,1"


class _Progress:
    """A live bar when stderr is a terminal; one line per finished checkpoint otherwise (logs, CI)."""

    def __init__(self) -> None:
        self.bar = None
        self.task = None
        self.done = self.total = 0
        self.t0 = time.monotonic()

    def start(self, total: int) -> None:
        self.total = total
        if err.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("eval-gamma"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                console=err, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("batches", total=total)

    def batch(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.advance(self.task)

    def stage(self, result) -> None:
        if self.bar is None:
            err.print(f"eval-gamma: step {result.doc['step']} done ({self.done}/{self.total} batches, "
                      f"{time.monotonic() - self.t0:.1f} s)", highlight=False, soft_wrap=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def eval_gamma(
    path: Annotated[Path, typer.Argument(help="A checkpoint directory, or a run directory (then its best/ checkpoint).", show_default=False)],
    stage: Annotated[str, typer.Option(help="With a run directory: best, last, all (every checkpoint, in step order) or a step number.")] = "best",
    methods: Annotated[str, typer.Option(help="Comma-separated: sgd, ef, ief, sf, ngd (ngd: exact natural gradient by CG, small models).")] = DEFAULT_METHODS,
    damping: Annotated[str, typer.Option(help="Comma-separated damping values lambda, on the paper's scale (as in recipes).")] = DEFAULT_DAMPINGS,
    batches: Annotated[int, typer.Option(help="Number of evaluation batches M.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Samples per evaluation batch N (the paper uses 160).")] = 160,
    sf_samples: Annotated[int, typer.Option(help="SF: Monte-Carlo label draws per sample.")] = 1,
    split: Annotated[str, typer.Option(help="Data split to draw batches from: train, val or test.")] = "train",
    seed: Annotated[int, typer.Option(help="Seeds the batch draw (seed) and SF's labels (seed + 1).")] = 0,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda (default: the recipe's).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="float32 or float64 (default: the recipe's).")] = None,
    ngd_maxiter: Annotated[int, typer.Option(help="ngd: conjugate-gradient iteration cap.")] = 500,
    json_out: Annotated[bool, json_option("one document (a list of them with --stage all)")] = False,
    out_dir: Annotated[Optional[Path], out_option("Also write JSON, a CSV of every row and the figures to this directory.")] = None,
    figures: Annotated[str, typer.Option("--figures", help="File type of the --out figures: png, pdf or svg.")] = "png",
    overwrite: Annotated[bool, overwrite_option("a non-empty --out directory (only one this command wrote)")] = False,
    quiet: Annotated[bool, quiet_option("No progress or notes on stderr.")] = False,
) -> None:
    """Measure how close each method's update is to the exact natural gradient (the paper's gamma ratio).

    For every evaluation batch and damping: each method's direction d, gamma(d) = sqrt(d^T G d) / (d^T g) with G the GGN (= Fisher), its ratio to SGD's gamma (below 1: closer to NG than SGD), the cosine to the NG direction when ngd is included, and the batch's per-sample gradient-norm imbalance. Aggregated over batches: median, mean and inter-quartile range. A direction that is not finite or not a descent direction (d^T g <= 0) is reported per row and left out of the statistics.
    """
    from iefcli.eval import gamma_output
    from iefcli.eval.gamma_run import eval_gamma as run, parse_dampings, parse_methods

    with cli_errors():
        method_list, damping_list = parse_methods(methods), parse_dampings(damping)
        note = None if quiet else (lambda msg: err.print(f"ief: note: {msg}", highlight=False, soft_wrap=True))
        progress = None if quiet else _Progress()
        try:
            report = run(
                path=path, stage=stage, methods=method_list, dampings=damping_list, n_batches=batches,
                batch_size=batch_size, sf_samples=sf_samples, split=split, seed=seed, device=device, dtype=dtype,
                ngd_maxiter=ngd_maxiter, out_dir=out_dir, overwrite=overwrite, figure_format=figures,
                on_start=progress and progress.start, on_batch=progress and progress.batch,
                on_stage=progress and progress.stage, note=note,
            )
        finally:
            if progress is not None:
                progress.stop()
        if out_dir is not None and note is not None:
            note(f"wrote {', '.join(p.name for p in report.written)} to {out_dir}")
        if json_out:
            print_json(report.payload)
            return
        for r in report.results:
            print_table(gamma_output.render_table(r.doc))
            out.print(gamma_output.imbalance_line(r.doc), highlight=False)


def register(app: typer.Typer) -> None:
    app.command("eval-gamma")(eval_gamma)

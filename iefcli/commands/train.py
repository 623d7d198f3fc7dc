"""`ief train RECIPE`: train with iEF or a baseline, leaving a run directory."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from iefcli.commands._common import cli_errors, err, json_option, out_option, overwrite_option, print_json, quiet_option
from iefcli.errors import Interrupted, RunExists, UsageError


def train(
    recipe: Annotated[Optional[str], typer.Argument(
        help="Recipe YAML file, or a built-in name (see `ief recipes`); omit with --resume.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a recipe key: --set optimizer.lr=10 (repeatable; value parsed as YAML).")] = None,
    out: Annotated[Optional[str], out_option("Run directory (default: the recipe's output.dir, runs/<name>).")] = None,
    overwrite: Annotated[bool, overwrite_option("an existing run directory")] = False,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", help="Continue the run in RUN_DIR from its last checkpoint.", metavar="RUN_DIR")] = None,
    quiet: Annotated[bool, quiet_option("Print only errors and the final one-line summary.")] = False,
    json_out: Annotated[bool, json_option("the summary (a JSON error object when the run fails)")] = False,
    nproc: Annotated[Optional[int], typer.Option(
        "--nproc", help="Run K data-parallel processes (torchrun on this machine; the batch is the global batch).",
        metavar="K")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the resolved recipe and the model's parameter count; do not train.")] = False,
) -> None:
    """Train a model from a YAML recipe with iEF or a baseline optimiser.

    Writes RUN/recipe.yaml, metrics.jsonl, checkpoints/step-N/, best/ and
    summary.json. Exit codes: 0 ok, 1 run failed (diverged), 2 bad recipe or
    usage, 130 interrupted (a checkpoint is saved; continue with --resume).
    """
    from iefcli.train.jsonout import json_errors
    from iefcli.train.launch import resume_run, train_recipe

    if dry_run:
        _dry_run(recipe, list(set_ or ()), resume=resume, json_out=json_out)
        return
    if nproc is not None:
        from iefcli.dist.launch import relaunch

        with cli_errors():
            relaunch(nproc)  # runs K copies of this command under torchrun, or returns at once when K == 1
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints
    progress = None if (quiet or not rank0) else _Progress()
    with cli_errors(), _rank_log(), json_errors(json_out, "train", run_dir=resume):
        try:
            if resume is not None:
                if recipe is not None:
                    raise UsageError("give either a RECIPE or --resume RUN_DIR, not both")
                for given, what in ((set_, "--set"), (out, "--out"), (overwrite, "--overwrite")):
                    if given:
                        raise UsageError(f"{what} cannot be combined with --resume (the run continues in RUN_DIR "
                                         "with its saved recipe.yaml)")
                summary = resume_run(resume, on_event=progress)
            elif recipe is None:
                raise UsageError("missing RECIPE (a YAML file or a built-in name; see `ief recipes`)")
            else:
                summary = train_recipe(recipe, sets=list(set_ or ()), out=out, overwrite=overwrite, on_event=progress)
        except Interrupted as e:
            raise Interrupted(f"{e}; continue with: ief train --resume {e.run_dir}") from None
        except RunExists as e:
            raise UsageError(f"{e} (use --overwrite, or --resume {e.run_dir})") from None
        finally:
            if progress is not None:
                progress.stop()
    if not rank0:
        return
    print(_summary_line(summary), file=sys.stderr)
    if json_out:
        print_json(summary)


def _rank_log():
    """Under `ief train --nproc`: this rank's error output to its log file (iefcli.dist.launch)."""
    from iefcli.dist.launch import rank_errors_to_log

    return rank_errors_to_log()


def _dry_run(recipe: str | None, sets: list[str], *, resume: str | None, json_out: bool) -> None:
    """`ief train --dry-run`: the resolved recipe and the model's size on stdout; nothing written."""
    from iefcli.train.extends import dry_run, dry_run_text
    from iefcli.train.jsonout import json_errors, stamp

    with cli_errors(), json_errors(json_out, "train"):
        if resume is not None:
            raise UsageError("--dry-run cannot be combined with --resume")
        if recipe is None:
            raise UsageError("--dry-run needs a RECIPE (a YAML file or a built-in name; see `ief recipes`)")
        report = dry_run(recipe, sets)
    if json_out:
        print_json(stamp({k: v for k, v in report.items() if k != "yaml"}))
    else:
        sys.stdout.write(dry_run_text(report))


def _summary_line(s: dict) -> str:
    def f(v, spec=".4g"):
        return "-" if v is None else format(v, spec)

    return (
        f"{s['status']}: {s['recipe']} ({s['optimizer']}) {s['total_steps']} steps in {f(s['wall_time_s'], '.1f')}s; "
        f"final train loss {f(s['final_train_loss'])}; best val {s['metric']} {f(s['best_val_metric'])} "
        f"at step {s['best_val_step']}; test {s['metric']} {f(s['test_metric'])}; run dir {s['run_dir']}"
    )


class _Progress:
    """Rich progress bar on stderr: step, epoch, loss, val metric, lr, step time (fits 80 columns)."""

    def __init__(self) -> None:
        self.p = None
        self.task = None
        self.metric_name = ""

    def _bar(self, total: int):
        """The bar, built once the total is known: the step count (``1234/12345``) never shrinks
        (rich squeezes the other columns first, the time left last of all), so the total stays
        visible in 80 columns."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        from rich.table import Column

        count = MofNCompleteColumn(table_column=Column(no_wrap=True, min_width=2 * len(str(total)) + 1))
        return Progress(
            TextColumn("[bold]train"), BarColumn(bar_width=8), count,
            TextColumn("ep {task.fields[epoch]}"), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[metric]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[dt]}"), TimeRemainingColumn(),
            console=err, transient=False,
        )

    def __call__(self, kind: str, e: dict) -> None:
        if kind == "start":
            self.metric_name = e["metric"]
            self.p = self._bar(e["total_steps"])
            self.p.start()
            self.task = self.p.add_task("train", total=e["total_steps"], completed=e["start_step"],
                                        epoch="0.0", loss="-", metric="val -", lr="-", dt="-")
        elif kind == "step" and self.task is not None:
            self.p.update(self.task, completed=e["step"], epoch=f"{e['epoch']:.1f}", loss=f"{e['loss']:.4g}",
                          lr=f"{e['lr']:.3g}", dt=f"{e['step_time_s'] * 1000:.0f}ms/step")
        elif kind == "eval" and e.get("split") == "val" and self.task is not None:
            v = e.get(self.metric_name)
            label = "acc" if self.metric_name == "accuracy" else self.metric_name  # short: the bar fits 80 columns
            self.p.update(self.task, metric=f"val {label} {v:.4g}" if v is not None else "val -")
        elif kind == "note":
            err.print(f"note: {e['message']}", highlight=False, markup=False)
        elif kind == "bad_step":
            err.print(f"[yellow]step {e['step']}: NaN/Inf loss or update; step skipped "
                      f"({e['consecutive_bad_steps']} in a row)[/yellow]")

    def stop(self) -> None:
        if self.task is not None:  # stopping a bar that never started prints a stray blank line
            self.p.stop()


def register(app: typer.Typer) -> None:
    app.command("train")(train)

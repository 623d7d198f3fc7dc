"""Starting and resuming runs: the run directory, every check before it is touched, then
:func:`iefcli.train.loop.train`. This is what `ief train` calls.

Nothing already on disk is lost to a failed start: every check (recipe, data,
model, loss vs data, steps) runs before the directory is touched, and an old run
replaced with ``overwrite`` is moved aside and removed only once the new run has
written its first checkpoint (it is put back if the new run stops before that).
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from iefcli.errors import RunExists, UsageError
from iefcli.train import rundir
from iefcli.train.loop import OnEvent, plan_run, train
from iefcli.train.recipe import Recipe
from iefcli.train.task import build_task


def run_dir_for(recipe: Recipe, out: str | Path | None) -> Path:
    if out is not None:
        return Path(out)
    return Path(recipe["output"]["dir"].replace("{name}", recipe["name"]))


def prepare_run_dir(run_dir: Path, overwrite: bool) -> Path | None:
    """Make ``run_dir`` an empty directory. A non-empty one is refused unless
    ``overwrite``; with it, only an old RUN directory is accepted, and it is not
    deleted but moved aside to a hidden sibling, whose path is returned: the
    caller removes it once the new run has a checkpoint (:func:`train_recipe`)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir}: exists and is not a directory")
    aside = None
    if rundir.is_nonempty_dir(run_dir):
        if not overwrite:
            raise RunExists(run_dir)
        if not ((run_dir / rundir.RECIPE_FILE).exists() or (run_dir / rundir.METRICS_FILE).exists()):
            raise UsageError(f"{run_dir}: not a run directory (no recipe.yaml or metrics.jsonl); refusing to overwrite it")
        aside = run_dir.parent / f".{run_dir.name}.overwritten-{secrets.token_hex(4)}"
        os.replace(run_dir, aside)
    run_dir.mkdir(parents=True, exist_ok=True)
    return aside


def train_recipe(
    recipe: str | Path,
    *,
    sets: list[str] | tuple[str, ...] = (),
    out: str | Path | None = None,
    overwrite: bool = False,
    on_event: OnEvent | None = None,
) -> dict:
    """Load a recipe (a file or a built-in name) with ``--set``-style overrides,
    check everything (data and model included), prepare its run directory, train.
    Returns the summary.

    Nothing already on disk is lost to a failed start: every check runs before the
    directory is touched, and an old run replaced by ``overwrite`` is kept aside
    until the new run has written its first checkpoint (it is put back if the new
    run stops before that; a kill in between leaves it as ``.NAME.overwritten-*``).
    """
    from iefcli.train.recipe import load_recipe_file

    notes: list[str] = []  # e.g. "--set optimizer.name=adamw: optimizer.lr ... replaced by adamw's defaults"
    r = load_recipe_file(recipe, sets, notes=notes)
    for n in notes:
        if on_event is not None:
            on_event("note", {"message": n})
    run_dir = run_dir_for(r, out)
    if rundir.is_nonempty_dir(run_dir) and not overwrite and os.environ.get("RANK", "0") == "0":
        raise RunExists(run_dir)  # (under torchrun rank 0 says it; torchrun then stops the others)
    rundir.check_writable(run_dir, "run directory")
    plan = plan_run(r, build_task(r, _rank_device(r)))
    if not _is_main():  # under torchrun only rank 0 touches the run directory
        return train(recipe=r, run_dir=run_dir, on_event=on_event, plan=plan)
    existed = run_dir.exists()
    aside = prepare_run_dir(run_dir, overwrite)
    started = False

    def on_first_checkpoint(kind: str, payload: dict) -> None:
        nonlocal started
        if kind == "checkpoint" and not started:
            started = True
            if aside is not None:
                shutil.rmtree(aside)
        if on_event is not None:
            on_event(kind, payload)

    try:
        return train(recipe=r, run_dir=run_dir, on_event=on_first_checkpoint, plan=plan)
    except BaseException:
        if not started:  # nothing worth keeping was written: leave the disk as it was
            shutil.rmtree(run_dir, ignore_errors=True)
            if aside is not None:
                os.replace(aside, run_dir)
            elif existed:
                run_dir.mkdir(parents=True, exist_ok=True)
        raise


def resume_run(run_dir: str | Path, *, on_event: OnEvent | None = None) -> dict:
    """Continue the run in ``run_dir`` from its last checkpoint (its saved recipe.yaml)."""
    run_dir = Path(run_dir)
    r = rundir.load_recipe(run_dir)
    if not rundir.list_checkpoints(run_dir):
        raise UsageError(f"{run_dir}: no checkpoint to resume from")
    rundir.check_writable(run_dir, "--resume")
    return train(recipe=r, run_dir=run_dir, resume=True, on_event=on_event, device=_rank_device(r))


def _rank_device(r: Recipe) -> str | None:
    """Under torchrun on CUDA: this rank's GPU (iefcli.dist); else None (the recipe's device)."""
    if os.environ.get("WORLD_SIZE", "1") == "1":
        return None
    from iefcli.dist.train import rank_device

    return rank_device(r)


def _is_main() -> bool:
    from iefcli.dist.comm import is_main

    return is_main()

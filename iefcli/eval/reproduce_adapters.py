"""Every call `ief reproduce` makes into other parts of iefcli, in one place.

The training loop, eval-gamma, the figures and the toy are being restructured by
other hands; :mod:`iefcli.eval.reproduce` calls only the functions below, so a
rename is fixed here once. Each function uses the highest-level entry point that
exists (the newer one first, the older as a fallback).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
from pathlib import Path
from typing import Any, Sequence

# ----------------------------------------------------------------------------- recipes and training


def load_recipe(name: str, overrides: Sequence[str] = (), *, optimizer_from: str | None = None):
    """A validated recipe: built-in ``name`` with ``overrides`` (``key.path=value``) applied.

    ``optimizer_from``: another recipe whose whole ``optimizer`` section replaces ``name``'s
    (an optimiser the task has no recipe for borrows the tuned settings of a sibling task;
    the task's schedule is kept, so all optimisers of a task share it).
    """
    from iefcli.train.extends import load_raw
    from iefcli.train.recipe import apply_overrides, recipe_from_dict, resolve_recipe_path

    def raw_of(n: str) -> dict:  # the built-in with its extends: chain merged in
        return load_raw(resolve_recipe_path(n))

    raw = raw_of(name)
    if optimizer_from is not None:
        donor = raw_of(optimizer_from)
        raw["optimizer"] = copy.deepcopy(donor.get("optimizer", {}))
    return recipe_from_dict(apply_overrides(raw, overrides), source=f"{name} (reproduce)")


def recipe_exists(name: str) -> bool:
    from iefcli.errors import UsageError
    from iefcli.train.recipe import resolve_recipe_path

    try:
        resolve_recipe_path(name)
        return True
    except UsageError:
        return False


def stored_recipe(run_dir: Path) -> dict | None:
    """The resolved recipe a run directory was trained with (None when unreadable)."""
    from iefcli.errors import IEFError
    from iefcli.train import rundir

    try:
        return dict(rundir.load_recipe(run_dir))
    except (IEFError, OSError, ValueError):
        return None


def read_summary(run_dir: Path) -> dict | None:
    from iefcli.errors import IEFError
    from iefcli.train import rundir

    if not (Path(run_dir) / rundir.SUMMARY_FILE).is_file():
        return None
    try:
        return rundir.read_summary(run_dir)
    except (IEFError, OSError, ValueError):
        return None


def has_checkpoint(run_dir: Path) -> bool:
    from iefcli.train import rundir

    try:
        return bool(rundir.list_checkpoints(run_dir))
    except Exception:  # a half-written directory is simply not resumable
        return False


def train_run(recipe, run_dir: Path, *, resume: bool, device: str | None = None) -> dict:
    """Train (or resume) ``recipe`` into ``run_dir``; returns summary.json's dict.

    A fresh run clears ``run_dir`` first (it belongs to the reproduce directory).
    """
    import shutil

    from iefcli.train.loop import train

    run_dir = Path(run_dir)
    if not resume:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
    return train(recipe=recipe, run_dir=run_dir, resume=resume, device=device)


def train_curve(run_dir: Path) -> tuple[list[float], list[float]]:
    """(steps, train losses) from metrics.jsonl, bad steps left out."""
    from iefcli.train import rundir

    xs, ys = [], []
    for r in rundir.read_metrics(run_dir):
        if r.get("split") != "train" or r.get("skipped") or r.get("event") == "bad_step":
            continue
        if isinstance(r.get("step"), (int, float)) and isinstance(r.get("loss"), (int, float)):
            xs.append(float(r["step"]))
            ys.append(float(r["loss"]))
    return xs, ys


def last_checkpoint_params(run_dir: Path) -> dict:
    from iefcli.train import rundir

    _, ck = rundir.list_checkpoints(run_dir)[-1]
    return rundir.load_checkpoint_params(ck)


# ----------------------------------------------------------------------------- eval-gamma


def gamma_stages(
    run_dir: Path,
    *,
    methods: Sequence[str],
    dampings: Sequence[float],
    n_batches: int,
    batch_size: int,
    seed: int = 0,
    ngd_maxiter: int = 500,
    device: str | None = None,
) -> list[dict[str, Any]]:
    """eval-gamma at every checkpoint of ``run_dir`` (``--stage all``): one JSON document per stage."""
    kw = dict(path=Path(run_dir), stage="all", methods=list(methods), dampings=list(dampings), n_batches=n_batches,
              batch_size=batch_size, seed=seed, device=device, ngd_maxiter=ngd_maxiter)
    if importlib.util.find_spec("iefcli.eval.gamma_run") is not None:  # eval-gamma as a library (issue 15)
        mod = importlib.import_module("iefcli.eval.gamma_run")
        results = mod.run_eval_gamma(**kw)
    else:
        from iefcli.commands.eval_gamma import run_eval_gamma

        results = run_eval_gamma(**kw)
    return [r.doc for r in results]


def gamma_figures(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """{file name: Figure}: ratio vs damping (panel per stage), ratio vs stage, imbalance vs stage."""
    from iefcli.eval import figures

    if hasattr(figures, "gamma_ratio_vs_damping"):
        f_damp, f_stage, f_imb = figures.gamma_ratio_vs_damping, figures.gamma_ratio_vs_stage, figures.imbalance_vs_stage
    else:
        from iefcli.commands import eval_gamma as eg

        f_damp, f_stage, f_imb = eg.figure_ratio_vs_damping, eg.figure_ratio_vs_stage, eg.figure_imbalance_vs_stage
    out = {"gamma_vs_damping.png": f_damp(list(docs))}
    if len(docs) > 1:
        out["gamma_vs_stage.png"] = f_stage(list(docs))
        out["imbalance_vs_stage.png"] = f_imb(list(docs))
    return out


# ----------------------------------------------------------------------------- figures


def new_figure(width: float, height: float):
    from iefcli.eval.figures import new_figure as nf

    return nf(width, height)


def save_png(fig, path: Path) -> None:
    from iefcli.eval import figures

    if hasattr(figures, "save_figure"):
        figures.save_figure(fig, path)
    else:
        figures.save_png(fig, Path(path))


def method_style(name: str) -> tuple[str | None, str]:
    """(colour, linestyle) of an optimiser / method, the house map when there is one."""
    from iefcli.eval import figures

    if hasattr(figures, "method_style"):
        try:
            return figures.method_style(name)
        except Exception:
            pass
    order = ("sgd", "adamw", "adafactor", "ef", "sf", "ief", "ngd")
    pal = figures.PALETTE
    i = order.index(name) if name in order else len(order)
    return pal[i % len(pal)], "-"


def style_context():
    import matplotlib

    from iefcli.eval import figures

    return matplotlib.rc_context(getattr(figures, "STYLE", {}))


# ----------------------------------------------------------------------------- the toy


def toy_result(steps: int | None = None):
    from iefcli.eval.toy import ToySettings, run_toy

    settings = ToySettings() if steps is None else ToySettings(steps=steps)
    return run_toy(settings=settings)


def toy_figure(result):
    from iefcli.eval.figures import toy_figure as tf

    return tf(result)


# ----------------------------------------------------------------------------- conventions


def damping_scale() -> str:
    """'paper' when damping/lr are on the paper's scale (the method table exists), else 'internal'."""
    return "paper" if importlib.util.find_spec("iefcli.core.methods") is not None else "internal"


def total_steps(recipe) -> int:
    """The number of optimiser steps ``recipe`` trains for (train.steps, else epochs x batches per epoch)."""
    tr = recipe["train"]
    if tr["steps"] is not None:
        return int(tr["steps"])
    from iefcli.train.task import build_task

    task = build_task(recipe, "cpu")
    return int(tr["epochs"]) * task.n_batches("train", tr["batch_size"], tr["drop_last"])


def toy_problem_as_float32(problem):
    """The toy with inputs and targets rounded through float32, as the toy-lsq recipe's data are."""
    import torch

    from iefcli.eval.toy import ToyProblem

    x32 = problem.inputs.to(torch.float32).to(torch.float64)
    y32 = problem.targets.to(torch.float32).to(torch.float64)
    return ToyProblem(inputs=x32, theta_star=torch.linalg.solve(x32, y32))


def toy_endpoint(problem, start, method: str, lr: float, damping: float, steps: int):
    """The demo's trajectory from ``start``: its final theta (2,)."""
    import torch

    from iefcli.eval.toy import trajectory

    path, _ = trajectory(problem, torch.as_tensor(start, dtype=torch.float64), method, lr, damping, steps)
    return path[-1]

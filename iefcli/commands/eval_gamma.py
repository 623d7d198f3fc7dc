"""`ief eval-gamma PATH`: how close is each method's update to the natural gradient?

The shell around :func:`iefcli.eval.gamma_eval.evaluate_gamma`: resolve the
checkpoint(s), rebuild the task from the run's recipe, draw the evaluation
batches from an explicit seed, then print a table / JSON and write the --out
directory (JSON, CSV of every row, PNG plots). All maths lives in the core.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Sequence

import typer

from iefcli.commands._common import cli_errors, err, out
from iefcli.errors import UsageError

DEFAULT_METHODS = "sgd,ef,ief,sf"
DEFAULT_DAMPINGS = "1e-12,1e-10,1e-8,1e-6,1e-4,1e-2,1"
JSON_FILE = "eval_gamma.json"
CSV_FILE = "eval_gamma_rows.csv"
PNG_DAMPING = "ratio_vs_damping.png"
PNG_STAGE = "ratio_vs_stage.png"
PNG_IMBALANCE = "imbalance_vs_stage.png"
CSV_COLUMNS = (
    "stage", "checkpoint", "batch", "method", "damping", "gamma", "gamma_ratio", "cos_to_ngd",
    "grad_norm_max_min", "grad_norm_top10_bottom10", "logit_grad_norm_max_min", "logit_grad_norm_top10_bottom10",
)


@dataclass
class StageResult:
    """One evaluated checkpoint: its JSON document and its tidy rows."""

    doc: dict[str, Any]
    rows: list[dict[str, Any]]


# ----------------------------------------------------------------------------- parsing


def parse_methods(text: str) -> list[str]:
    from iefcli.eval.gamma_eval import check_methods

    items = [m.strip() for m in text.split(",") if m.strip()]
    try:
        return list(check_methods(items, [1.0])[0])
    except ValueError as e:
        raise UsageError(f"--methods {text}: {e}") from None


def parse_dampings(text: str) -> list[float]:
    vals = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            v = float(item)
        except ValueError:
            raise UsageError(f"--damping {text}: {item!r} is not a number") from None
        if not (math.isfinite(v) and v >= 0):
            raise UsageError(f"--damping {text}: {item} must be a finite number >= 0")
        if v not in vals:
            vals.append(v)
    if not vals:
        raise UsageError(f"--damping {text!r}: give at least one value")
    return vals


# ----------------------------------------------------------------------------- checkpoints


def _run_dir_of(ckpt: Path) -> Path:
    """The run directory holding a checkpoint: RUN/best or RUN/checkpoints/step-N."""
    from iefcli.train.rundir import RECIPE_FILE

    for cand in (ckpt.parent, ckpt.parent.parent):
        if (cand / RECIPE_FILE).is_file():
            return cand
    raise UsageError(f"{ckpt}: no recipe.yaml next to this checkpoint (expected RUN/best or RUN/checkpoints/step-N)")


def select_checkpoints(path: Path, stage: str) -> tuple[Path, list[Path]]:
    """(run_dir, checkpoints in step order) for PATH and --stage best | last | all | <step>."""
    from iefcli.train import rundir

    if not path.exists():
        raise UsageError(f"{path}: checkpoint or run directory not found")
    if rundir.is_checkpoint(path):
        if stage not in ("best", path.name):
            raise UsageError(f"--stage {stage}: {path} is a single checkpoint; give the run directory instead")
        return _run_dir_of(path), [path]
    if not (path / rundir.RECIPE_FILE).is_file():
        raise UsageError(f"{path}: not a checkpoint directory (params.safetensors missing) nor a run directory (recipe.yaml missing)")
    if stage == "best":
        return path, [rundir.resolve_checkpoint(path)]
    ckpts = rundir.list_checkpoints(path)
    if stage == "all":
        if not ckpts:
            raise UsageError(f"{path}: run directory has no checkpoints/step-N yet")
        return path, [p for _, p in ckpts]
    if stage == "last":
        if not ckpts:
            raise UsageError(f"{path}: run directory has no checkpoints/step-N yet")
        return path, [ckpts[-1][1]]
    try:
        step = int(stage)
    except ValueError:
        raise UsageError(f"--stage {stage}: expected best, last, all or a step number") from None
    for s, p in ckpts:
        if s == step:
            return path, [p]
    have = ", ".join(str(s) for s, _ in ckpts) or "none"
    raise UsageError(f"--stage {stage}: {path} has no checkpoint at step {step} (steps: {have})")


def _load_params(task, ckpt: Path):
    """The checkpoint's trainable params, checked against the task's model, on its device/dtype."""
    from iefcli.train.rundir import PARAMS_FILE, load_checkpoint_params

    saved = load_checkpoint_params(ckpt)
    own = task.params()
    missing = [k for k in own if k not in saved]
    if missing:
        raise UsageError(f"{ckpt / PARAMS_FILE}: trainable parameter {missing[0]!r} of the recipe's model is missing")
    params = {}
    for k, ref in own.items():
        v = saved[k]
        if v.shape != ref.shape:
            raise UsageError(f"{ckpt / PARAMS_FILE}: {k} has shape {tuple(v.shape)}, the recipe's model expects {tuple(ref.shape)}")
        params[k] = v.to(device=ref.device, dtype=ref.dtype)
    return params


def _eval_batches(task, split: str, batch_size: int, n_batches: int, seed: int):
    """M batches of N samples drawn without replacement within each pass over the
    split, reshuffled for every further pass (from a CPU generator seeded by ``seed``).
    A split of at most N samples gives one batch holding all of it."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    if task.size(split) <= batch_size:
        yield from task.batches(split, task.size(split))
        return
    done = 0
    while done < n_batches:
        for b in task.batches(split, batch_size, gen, drop_last=True):
            yield b
            done += 1
            if done == n_batches:
                return


# ----------------------------------------------------------------------------- the work


def run_eval_gamma(
    *,
    path: Path,
    stage: str = "best",
    methods: Sequence[str],
    dampings: Sequence[float],
    n_batches: int = 10,
    batch_size: int = 160,
    sf_samples: int = 1,
    split: str = "train",
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    ngd_maxiter: int = 500,
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[], None] | None = None,
    note: Callable[[str], None] | None = None,
) -> list[StageResult]:
    """Evaluate gamma at each selected checkpoint; returns one StageResult per checkpoint, in step order.

    The same M batches (seed ``seed``) and the same SF label draws (seed ``seed + 1``)
    are used at every checkpoint. Raises UsageError for bad input or files.
    """
    import torch

    from iefcli.eval.gamma_eval import check_methods, evaluate_gamma
    from iefcli.train import rundir
    from iefcli.train.task import DTYPES, build_task, resolve_device

    try:
        methods, dampings = check_methods(methods, dampings)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for name, v in (("--batches", n_batches), ("--batch-size", batch_size), ("--sf-samples", sf_samples), ("--ngd-maxiter", ngd_maxiter)):
        if v < 1:
            raise UsageError(f"{name} must be >= 1, got {v}")
    if split not in ("train", "val", "test"):
        raise UsageError(f"--split {split}: choose train, val or test")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose {' or '.join(DTYPES)}")

    run_dir, ckpts = select_checkpoints(Path(path), stage)
    recipe = rundir.load_recipe(run_dir)
    if dtype is not None:
        recipe["dtype"] = dtype
    dev = resolve_device(device if device is not None else recipe["device"])
    task = build_task(recipe, dev)
    task.model.eval()  # dropout off: gamma is a property of the deterministic model
    if task.size(split) == 0:
        raise UsageError(f"{run_dir / rundir.RECIPE_FILE}: the {split} split is empty")
    single = task.size(split) <= batch_size  # then one batch holds the whole split
    eff_bs = min(batch_size, task.size(split))
    if single and n_batches > 1 and note is not None:
        note(f"the {split} split has {task.size(split)} samples: evaluating one batch of all of them")
    metas = [rundir.checkpoint_meta(c) for c in ckpts]
    for c, m in zip(ckpts, metas):  # read every file before the (long) evaluation starts
        if not isinstance(m["step"], int) or isinstance(m["step"], bool):
            raise UsageError(f"{c / rundir.META_FILE}: corrupt checkpoint metadata (step {m['step']!r} is not an integer)")
    all_params = [_load_params(task, c) for c in ckpts]  # trainable params only: small next to the model
    if on_start is not None:
        on_start(len(ckpts) * (1 if single else n_batches))

    results = []
    for ckpt, meta, params in zip(ckpts, metas, all_params):
        sf_gen = torch.Generator(device=dev).manual_seed(seed + 1)
        # Inputs were validated above and the split is non-empty, so a ValueError from here is a bug.
        res = evaluate_gamma(
            model=task.model, params=params, loss_fn=task.loss_fn, forward=task.forward,
            batches=_eval_batches(task, split, batch_size, n_batches, seed), max_batches=n_batches,
            methods=methods, dampings=dampings, sf_samples=sf_samples, generator=sf_gen,
            # the run's own per-sample-gradient settings (path, memory chunking, duplicate filter)
            jacobian=recipe["optimizer"]["jacobian"], chunk_size=recipe["optimizer"]["chunk_size"],
            dup_threshold=recipe["optimizer"]["dup_threshold"], ngd_maxiter=ngd_maxiter,
            on_batch=(lambda _done: on_batch()) if on_batch is not None else None,
        )
        step = meta["step"]
        doc: dict[str, Any] = {
            "checkpoint": str(ckpt),
            "step": step,
            "split": split,
            "batch_size": eff_bs,
            "n_batches": res.n_batches,
            "seed": seed,
            "sf_samples": sf_samples,
            "methods": list(res.methods),
            "dampings": list(res.dampings),
            "results": res.summary,
            "imbalance": res.imbalance_summary,
        }
        if res.ngd_info:
            doc["ngd_cg"] = {
                "max_iterations": max(i["cg_iterations"] for i in res.ngd_info),
                "max_residual": max(i["cg_residual"] for i in res.ngd_info),
                "all_converged": all(i["cg_converged"] for i in res.ngd_info),
            }
            if not doc["ngd_cg"]["all_converged"] and note is not None:
                note(
                    f"step {step}: ngd's CG stopped before its tolerance (max relative residual "
                    f"{doc['ngd_cg']['max_residual']:.2g} after {doc['ngd_cg']['max_iterations']} iterations); "
                    "its gamma is an upper bound on the exact NG gamma (raise --ngd-maxiter, or try --dtype float64)"
                )
        rows = [{"stage": step, "checkpoint": str(ckpt), **r} for r in res.rows]
        results.append(StageResult(doc, rows))
    return results


# ----------------------------------------------------------------------------- output


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3g}"


def render_table(doc: dict[str, Any]):
    """A Rich table: one row per damping, one column per method, median ratio [IQR].

    SGD's column is left out when other methods are shown (its ratio is 1 by definition);
    its median gamma goes into the caption instead.
    """
    from rich.table import Table

    shown = [m for m in doc["methods"] if m != "sgd"] or ["sgd"]
    by = {(r["method"], r["damping"]): r for r in doc["results"]}
    table = Table(
        title=f"gamma / gamma(SGD) at step {doc['step']}: median [IQR] over {doc['n_batches']} "
        f"{doc['split']} batches of {doc['batch_size']} (below 1 beats SGD)",
        title_justify="left",
    )
    if "sgd" in doc["methods"] and shown != ["sgd"]:
        table.caption = f"gamma(SGD) median {_fmt(by[('sgd', doc['dampings'][0])]['gamma_median'])}"
        table.caption_justify = "left"
    table.add_column("damping", justify="right", style="bold")
    for m in shown:
        table.add_column("iEF" if m == "ief" else m.upper(), justify="right")
    for lam in doc["dampings"]:
        cells = []
        for m in shown:
            r = by[(m, lam)]
            q25, q75 = r["gamma_ratio_iqr"]
            cells.append(f"{_fmt(r['gamma_ratio_median'])} [{_fmt(q25)}, {_fmt(q75)}]")
        table.add_row(f"{lam:g}", *cells)
    return table


def imbalance_line(doc: dict[str, Any]) -> str:
    i = doc["imbalance"]
    return (
        f"imbalance (median over batches): per-sample gradient norm max/min {_fmt(i['grad_norm_max_min'])}, "
        f"top10%/bottom10% {_fmt(i['grad_norm_top10_bottom10'])}; logit-gradient norm max/min "
        f"{_fmt(i['logit_grad_norm_max_min'])}, top10%/bottom10% {_fmt(i['logit_grad_norm_top10_bottom10'])}"
    )


def rows_csv(results: Sequence[StageResult]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for st in results:
        for r in st.rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()


def _new_figure(width: float, height: float):
    from iefcli.eval.figures import new_figure  # headless Agg figure, the house style (lazy: matplotlib)

    return new_figure(width, height)


_STYLE = {"sgd": ("#000000", "--"), "ef": ("#D55E00", "-"), "ief": ("#0072B2", "-"), "sf": ("#009E73", "-"), "ngd": ("#CC79A7", ":")}


def _plain_log_ticks(ax) -> None:
    """Log-scale y labels as plain numbers (0.8, 2, 3) instead of 8x10^-1."""
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)


def _positive(v: float | None) -> float:
    return v if v is not None and v > 0 and math.isfinite(v) else math.nan


def _grid(fig, n: int, ncol_max: int = 4):
    ncol = min(ncol_max, n)
    nrow = math.ceil(n / ncol)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    flat = [axes[i // ncol][i % ncol] for i in range(nrow * ncol)]
    for ax in flat[n:]:
        ax.set_visible(False)
    return flat[:n], ncol, nrow


def _label(m: str) -> str:
    return "iEF" if m == "ief" else m.upper()


def figure_ratio_vs_damping(docs: dict[str, Any] | Sequence[dict[str, Any]]):
    """Median gamma ratio vs damping (log-log), IQR shaded: one panel per checkpoint,
    one line per method (the paper's damping figure)."""
    docs = [docs] if isinstance(docs, dict) else list(docs)
    ncol = min(3, len(docs))
    nrow = math.ceil(len(docs) / ncol)
    fig = _new_figure(2.4 + 3.4 * ncol, 1.0 + 3.0 * nrow)
    panels, ncol, nrow = _grid(fig, len(docs), 3)
    for i, (ax, doc) in enumerate(zip(panels, docs)):
        lams = sorted(doc["dampings"])
        by = {(r["method"], r["damping"]): r for r in doc["results"]}
        for m in doc["methods"]:
            color, ls = _STYLE.get(m, (None, "-"))
            med = [_positive(by[(m, lam)]["gamma_ratio_median"]) for lam in lams]
            lo = [_positive(by[(m, lam)]["gamma_ratio_iqr"][0]) for lam in lams]
            hi = [_positive(by[(m, lam)]["gamma_ratio_iqr"][1]) for lam in lams]
            ax.plot(lams, med, marker="o", ms=4, color=color, ls=ls, label=_label(m))
            ax.fill_between(lams, lo, hi, color=color, alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_title(f"step {doc['step']}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        if i // ncol == nrow - 1:
            ax.set_xlabel("damping λ")
        if i % ncol == 0:
            ax.set_ylabel("γ / γ(SGD)  (median, IQR shaded)")
    panels[0].legend(fontsize=9)
    fig.suptitle("gamma relative to SGD (lower is closer to the natural gradient)", fontsize=11)
    return fig


def figure_ratio_vs_stage(docs: Sequence[dict[str, Any]]):
    """One panel per damping: median gamma ratio vs training step, one line per method
    (the paper's training-stage figure)."""
    lams = list(docs[0]["dampings"])
    ncol = min(4, len(lams))
    nrow = math.ceil(len(lams) / ncol)
    fig = _new_figure(1.0 + 3.0 * ncol, 1.0 + 2.6 * nrow)
    panels, ncol, nrow = _grid(fig, len(lams), 4)
    steps = [d["step"] for d in docs]
    for i, (ax, lam) in enumerate(zip(panels, lams)):
        for m in docs[0]["methods"]:
            color, ls = _STYLE.get(m, (None, "-"))
            med = [_positive(_by(d)[(m, lam)]["gamma_ratio_median"]) for d in docs]
            ax.plot(steps, med, marker="o", ms=3, color=color, ls=ls, label=_label(m))
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_title(f"λ = {lam:g}", fontsize=10)
        ax.grid(True, alpha=0.3)
        if i % ncol == 0:
            ax.set_ylabel("γ / γ(SGD)")
        if i // ncol == nrow - 1 or i + ncol >= len(lams):
            ax.set_xlabel("training step")
    panels[0].legend(fontsize=8)
    fig.suptitle("gamma relative to SGD through training (median over batches)", fontsize=11)
    return fig


def _by(doc: dict[str, Any]) -> dict[tuple[str, float], dict[str, Any]]:
    return {(r["method"], r["damping"]): r for r in doc["results"]}


_IMB_LABELS = {
    "grad_norm_max_min": "grad norm max/min",
    "grad_norm_top10_bottom10": "grad norm top10%/bottom10%",
    "logit_grad_norm_max_min": "logit-grad norm max/min",
    "logit_grad_norm_top10_bottom10": "logit-grad norm top10%/bottom10%",
}


def figure_imbalance_vs_stage(docs: Sequence[dict[str, Any]]):
    """Per-sample gradient-norm and logit-gradient-norm imbalance vs training step (one line per figure)."""
    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    steps = [d["step"] for d in docs]
    for key, label in _IMB_LABELS.items():
        ax.plot(steps, [_positive(d["imbalance"].get(key)) for d in docs], marker="o", ms=4,
                ls="-" if key.startswith("grad") else "--", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("imbalance (median over batches)")
    ax.set_title("per-sample gradient-norm imbalance through training", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def build_figures(results: Sequence[StageResult]) -> dict[str, Any]:
    """{file name: Figure} for --out: ratio vs damping (a panel per checkpoint), and with
    more than one checkpoint ratio vs stage and imbalance vs stage."""
    docs = [r.doc for r in results]
    figs = {PNG_DAMPING: figure_ratio_vs_damping(docs)}
    if len(docs) > 1:
        figs[PNG_STAGE] = figure_ratio_vs_stage(docs)
        figs[PNG_IMBALANCE] = figure_imbalance_vs_stage(docs)
    return figs


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise UsageError(f"--out {out_dir}: directory exists and is not empty (use --overwrite to replace it)")
        # As `ief train --overwrite`: only ever replace what this command wrote.
        if not (out_dir / JSON_FILE).is_file():
            raise UsageError(f"--out {out_dir}: not an eval-gamma output directory (no {JSON_FILE}); refusing to overwrite it")


def write_out_dir(out_dir: Path, results: Sequence[StageResult], json_text: str, *, overwrite: bool) -> list[Path]:
    """Write JSON, CSV and PNGs into a hidden sibling directory, then move it into place
    (an existing DIR is replaced only with ``overwrite``): never a half-written result."""
    import matplotlib

    from iefcli.train.rundir import replace_dir

    matplotlib.use("Agg", force=False)  # harmless: figures are drawn on their own Agg canvases
    check_out_dir(out_dir, overwrite)
    parent = out_dir.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{out_dir.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()  # (not mkdtemp: that would leave DIR with mode 0700 after the rename)
    try:
        (tmp / JSON_FILE).write_text(json_text + "\n", encoding="utf-8")
        (tmp / CSV_FILE).write_text(rows_csv(results), encoding="utf-8")
        for name, fig in build_figures(results).items():
            fig.savefig(tmp / name, format="png", dpi=100)
        replace_dir(tmp, out_dir, parent / f".{out_dir.name}.old")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(out_dir.iterdir())


# ----------------------------------------------------------------------------- the command


def eval_gamma(
    path: Annotated[Path, typer.Argument(help="A checkpoint directory, or a run directory (then its best/ checkpoint).", show_default=False)],
    stage: Annotated[str, typer.Option(help="With a run directory: best, last, all (every checkpoint, in step order) or a step number.")] = "best",
    methods: Annotated[str, typer.Option(help="Comma-separated: sgd, ef, ief, sf, ngd (ngd: exact natural gradient by CG, small models).")] = DEFAULT_METHODS,
    damping: Annotated[str, typer.Option(help="Comma-separated damping values lambda.")] = DEFAULT_DAMPINGS,
    batches: Annotated[int, typer.Option(help="Number of evaluation batches M.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Samples per evaluation batch N (the paper uses 160).")] = 160,
    sf_samples: Annotated[int, typer.Option(help="SF: Monte-Carlo label draws per sample.")] = 1,
    split: Annotated[str, typer.Option(help="Data split to draw batches from: train, val or test.")] = "train",
    seed: Annotated[int, typer.Option(help="Seeds the batch draw (seed) and SF's labels (seed + 1).")] = 0,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda (default: the recipe's).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="float32 or float64 (default: the recipe's).")] = None,
    ngd_maxiter: Annotated[int, typer.Option(help="ngd: conjugate-gradient iteration cap.")] = 500,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (a list with --stage all).")] = False,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Also write JSON, a CSV of every row and PNG plots to this directory.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out directory (only one this command wrote).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or notes on stderr.")] = False,
) -> None:
    """Measure how close each method's update is to the exact natural gradient (the paper's gamma ratio).

    For every evaluation batch and damping: each method's direction d, gamma(d) = sqrt(d^T G d) / (d^T g) with G the GGN (= Fisher), its ratio to SGD's gamma (below 1: closer to NG than SGD), the cosine to the NG direction when ngd is included, and the batch's per-sample gradient-norm imbalance. Aggregated over batches: median, mean and inter-quartile range.
    """
    with cli_errors():
        method_list = parse_methods(methods)
        damping_list = parse_dampings(damping)
        if out_dir is not None:
            check_out_dir(out_dir, overwrite)  # fail before the (long) evaluation
        note = None if quiet else (lambda msg: err.print(f"ief: note: {msg}", highlight=False, soft_wrap=True))
        progress = None
        if not quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            progress = Progress(TextColumn("eval-gamma"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                console=err, transient=True)
        task_id = None

        def on_start(total: int) -> None:
            nonlocal task_id
            if progress is not None:
                progress.start()
                task_id = progress.add_task("batches", total=total)

        def on_batch() -> None:
            if progress is not None and task_id is not None:
                progress.advance(task_id)

        try:
            results = run_eval_gamma(
                path=path, stage=stage, methods=method_list, dampings=damping_list, n_batches=batches,
                batch_size=batch_size, sf_samples=sf_samples, split=split, seed=seed, device=device, dtype=dtype,
                ngd_maxiter=ngd_maxiter, on_start=on_start, on_batch=on_batch, note=note,
            )
        finally:
            if progress is not None and task_id is not None:
                progress.stop()

        from iefcli.train.rundir import to_json

        payload: Any = [r.doc for r in results] if stage == "all" else results[0].doc
        json_text = to_json(payload, indent=2)
        if out_dir is not None:
            written = write_out_dir(out_dir, results, json_text, overwrite=overwrite)
            if note is not None:
                note(f"wrote {', '.join(p.name for p in written)} to {out_dir}")
        if json_out:
            sys.stdout.write(json_text + "\n")
            sys.stdout.flush()
            return
        for r in results:
            out.print(render_table(r.doc))
            out.print(imbalance_line(r.doc), highlight=False)


def register(app: typer.Typer) -> None:
    app.command("eval-gamma")(eval_gamma)

"""eval-gamma over a run's checkpoints: the application behind `ief eval-gamma`.

:func:`eval_gamma` is the one keyword-only entry point (the command parses its
options, calls it and prints): it resolves the checkpoint(s), rebuilds the task
from the run's recipe, loads every checkpoint's params, draws the evaluation
batches from an explicit seed, runs :func:`iefcli.eval.gamma_eval.evaluate_gamma`
at each checkpoint and, with ``out_dir``, writes the output directory
(:mod:`iefcli.eval.gamma_output`). :func:`run_eval_gamma` is the evaluation alone
(no files). Nothing here prints: notes and progress go through callbacks.
Every user error is a :class:`~iefcli.errors.UsageError` naming the option or file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from iefcli.errors import UsageError

__all__ = [
    "StageResult",
    "GammaReport",
    "parse_methods",
    "parse_dampings",
    "select_checkpoints",
    "eval_batches",
    "run_eval_gamma",
    "eval_gamma",
]

SPLITS = ("train", "val", "test")


@dataclass
class StageResult:
    """One evaluated checkpoint: its JSON document and its tidy rows (each with ``stage``)."""

    doc: dict[str, Any]
    rows: list[dict[str, Any]]


@dataclass
class GammaReport:
    """What :func:`eval_gamma` returns: the per-checkpoint results, the JSON payload
    (one document, or a list of them with ``stage="all"``), its text, the files written."""

    results: list[StageResult]
    payload: Any
    json_text: str
    written: list[Path] = field(default_factory=list)


# ----------------------------------------------------------------------------- parsing


def parse_methods(text: str) -> list[str]:
    """'sgd,ief' -> ['sgd', 'ief'] (validated, deduplicated); UsageError naming --methods."""
    from iefcli.eval.gamma_eval import check_methods

    items = [m.strip() for m in text.split(",") if m.strip()]
    try:
        return list(check_methods(items, [1.0])[0])
    except ValueError as e:
        raise UsageError(f"--methods {text}: {e}") from None


def parse_dampings(text: str) -> list[float]:
    """'1e-8,1e-4' -> [1e-8, 1e-4] (finite, >= 0, deduplicated); UsageError naming --damping."""
    vals: list[float] = []
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


def select_checkpoints(path: Path | str, stage: str) -> tuple[Path, list[Path]]:
    """(run_dir, checkpoints in step order) for PATH and stage best | last | all | <step>."""
    from iefcli.train import rundir

    path = Path(path)
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
    if stage in ("all", "last"):
        if not ckpts:
            raise UsageError(f"{path}: run directory has no checkpoints/step-N yet")
        return path, [p for _, p in ckpts] if stage == "all" else [ckpts[-1][1]]
    try:
        step = int(stage)
    except ValueError:
        raise UsageError(f"--stage {stage}: expected best, last, all or a step number") from None
    for s, p in ckpts:
        if s == step:
            return path, [p]
    have = ", ".join(str(s) for s, _ in ckpts) or "none"
    raise UsageError(f"--stage {stage}: {path} has no checkpoint at step {step} (steps: {have})")


def eval_batches(task, split: str, batch_size: int, n_batches: int, seed: int) -> Iterator[Any]:
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


# ----------------------------------------------------------------------------- the run


def _check_options(n_batches: int, batch_size: int, sf_samples: int, ngd_maxiter: int, split: str, dtype: str | None) -> None:
    from iefcli.train.task import DTYPES

    for name, v in (("--batches", n_batches), ("--batch-size", batch_size), ("--sf-samples", sf_samples), ("--ngd-maxiter", ngd_maxiter)):
        if v < 1:
            raise UsageError(f"{name} must be >= 1, got {v}")
    if split not in SPLITS:
        raise UsageError(f"--split {split}: choose train, val or test")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose {' or '.join(DTYPES)}")


def _stage_doc(ckpt: Path, step: int, res, *, split: str, batch_size: int, seed: int, sf_samples: int) -> dict[str, Any]:
    from iefcli.eval.gamma_eval import bad_rows

    doc: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "step": step,
        "split": split,
        "batch_size": batch_size,
        "n_batches": res.n_batches,
        "seed": seed,
        "sf_samples": sf_samples,
        "methods": list(res.methods),
        "dampings": list(res.dampings),
        "results": res.summary,
        "imbalance": res.imbalance_summary,
        # every (batch, method, damping) whose direction failed the sanity check, with why
        "bad_rows": bad_rows(res.rows),
    }
    if res.ngd_info:
        doc["ngd_cg"] = {
            "max_iterations": max(i["cg_iterations"] for i in res.ngd_info),
            "max_residual": max(i["cg_residual"] for i in res.ngd_info),
            "all_converged": all(i["cg_converged"] for i in res.ngd_info),
        }
    return doc


def run_eval_gamma(
    *,
    path: Path | str,
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
    on_stage: Callable[[StageResult], None] | None = None,
    note: Callable[[str], None] | None = None,
) -> list[StageResult]:
    """Evaluate gamma at each selected checkpoint; returns one StageResult per checkpoint, in step order.

    The same M batches (seed ``seed``) and the same SF label draws (seed ``seed + 1``)
    are used at every checkpoint. Every file is read before the evaluation starts.
    ``on_start(total batches)``, ``on_batch()`` and ``on_stage(result)`` report progress;
    ``note(text)`` gets one-line remarks for the user. Raises UsageError for bad input or files.
    """
    import torch

    from iefcli.eval.gamma_eval import check_methods, evaluate_gamma
    from iefcli.train import rundir
    from iefcli.train.task import build_task, resolve_device

    try:
        methods, dampings = check_methods(methods, dampings)
    except ValueError as e:
        raise UsageError(str(e)) from None
    _check_options(n_batches, batch_size, sf_samples, ngd_maxiter, split, dtype)

    run_dir, ckpts = select_checkpoints(Path(path), stage)
    recipe = rundir.load_recipe(run_dir)
    if dtype is not None:
        recipe["dtype"] = dtype
    dev = resolve_device(device if device is not None else recipe["device"])
    task = build_task(recipe, dev)
    task.model.eval()  # dropout off: gamma is a property of the deterministic model
    size = task.size(split)
    if size == 0:
        raise UsageError(f"{run_dir / rundir.RECIPE_FILE}: the {split} split is empty")
    single = size <= batch_size  # then one batch holds the whole split
    if single and n_batches > 1 and note is not None:
        note(f"the {split} split has {size} samples: evaluating one batch of all of them")
    metas = [rundir.checkpoint_meta(c) for c in ckpts]
    for c, m in zip(ckpts, metas):  # read every file before the (long) evaluation starts
        if not isinstance(m["step"], int) or isinstance(m["step"], bool):
            raise UsageError(f"{c / rundir.META_FILE}: corrupt checkpoint metadata (step {m['step']!r} is not an integer)")
    own = task.params()  # trainable params only: small next to the model
    all_params = [rundir.load_params(own, c) for c in ckpts]
    for c, p in zip(ckpts, all_params):  # gamma is undefined at NaN/Inf parameters: say so, do not solve
        rundir.check_finite_params(p, c / rundir.PARAMS_FILE)
    if on_start is not None:
        on_start(len(ckpts) * (1 if single else n_batches))

    opt = recipe["optimizer"]
    results = []
    for ckpt, meta, params in zip(ckpts, metas, all_params):
        sf_gen = torch.Generator(device=dev).manual_seed(seed + 1)
        # Inputs were validated above and the split is non-empty, so a ValueError from here is a bug.
        res = evaluate_gamma(
            model=task.model, params=params, loss_fn=task.loss_fn, forward=task.forward,
            batches=eval_batches(task, split, batch_size, n_batches, seed), max_batches=n_batches,
            methods=methods, dampings=dampings, sf_samples=sf_samples, generator=sf_gen,
            # the run's own per-sample-gradient settings (path, memory chunking, duplicate filter)
            jacobian=opt["jacobian"], chunk_size=opt["chunk_size"], dup_threshold=opt["dup_threshold"],
            ngd_maxiter=ngd_maxiter, on_batch=(lambda _done: on_batch()) if on_batch is not None else None,
        )
        step = meta["step"]
        doc = _stage_doc(ckpt, step, res, split=split, batch_size=min(batch_size, size), seed=seed, sf_samples=sf_samples)
        if note is not None:
            _notes(doc, note)
        result = StageResult(doc, [{"stage": step, "checkpoint": str(ckpt), **r} for r in res.rows])
        results.append(result)
        if on_stage is not None:
            on_stage(result)
    return results


def _notes(doc: dict[str, Any], note: Callable[[str], None]) -> None:
    step = doc["step"]
    cg = doc.get("ngd_cg")
    if cg and not cg["all_converged"]:
        note(
            f"step {step}: ngd's CG stopped before its tolerance (max relative residual "
            f"{cg['max_residual']:.2g} after {cg['max_iterations']} iterations); "
            "its gamma is an upper bound on the exact NG gamma (raise --ngd-maxiter, or try --dtype float64)"
        )
    if doc["bad_rows"]:
        counts: dict[str, int] = {}
        for r in doc["bad_rows"]:
            counts[f"{r['method']} {r['sanity']}"] = counts.get(f"{r['method']} {r['sanity']}", 0) + 1
        what = ", ".join(f"{k} x{v}" for k, v in counts.items())
        note(f"step {step}: {len(doc['bad_rows'])} direction(s) failed the sanity check ({what}); "
             "left out of the median/IQR and listed under bad_rows in the JSON")


def eval_gamma(
    *,
    path: Path | str,
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
    out_dir: Path | str | None = None,
    overwrite: bool = False,
    figure_format: str = "png",
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[], None] | None = None,
    on_stage: Callable[[StageResult], None] | None = None,
    note: Callable[[str], None] | None = None,
) -> GammaReport:
    """`ief eval-gamma` as one call: :func:`run_eval_gamma`, then the JSON payload
    (a list of documents with ``stage="all"``, else one) and, with ``out_dir``, the
    output directory (:func:`iefcli.eval.gamma_output.write_out_dir`; checked before the
    evaluation starts, so a bad --out fails in a second, not after the run)."""
    from iefcli.eval import gamma_output
    from iefcli.train.rundir import to_json

    fmt = gamma_output.check_figure_format(figure_format)
    if out_dir is not None:
        gamma_output.check_out_dir(Path(out_dir), overwrite)
    results = run_eval_gamma(
        path=path, stage=stage, methods=methods, dampings=dampings, n_batches=n_batches, batch_size=batch_size,
        sf_samples=sf_samples, split=split, seed=seed, device=device, dtype=dtype, ngd_maxiter=ngd_maxiter,
        on_start=on_start, on_batch=on_batch, on_stage=on_stage, note=note,
    )
    from iefcli.train.jsonout import stamp  # package + schema version on each document (issue 13)

    payload: Any = [stamp(r.doc) for r in results] if stage == "all" else stamp(results[0].doc)
    json_text = to_json(payload, indent=2)
    written: list[Path] = []
    if out_dir is not None:
        written = gamma_output.write_out_dir(Path(out_dir), results, json_text, overwrite=overwrite, figure_format=fmt)
    return GammaReport(results=results, payload=payload, json_text=json_text, written=written)

"""Reports over run directories written by ``ief train``: one row per run, output files.

Everything is read through :mod:`iefcli.train.rundir` (the run-directory
contract in docs/DESIGN.md); nothing here parses those files itself.

- :func:`prepare_output`: the output-file policy shared by compare, plot and
  demo (never overwrite without ``--overwrite``; the folder must exist).
- :func:`load_runs`: every run directory -> a :class:`RunInfo` (summary,
  recipe, metric curves), failing with one line on a missing / non-run dir.
- :func:`compare_rows`, :func:`best_per_column`, :func:`rows_to_csv`,
  :func:`rows_to_json`: the comparison table as plain data.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from iefcli.errors import UsageError

# ------------------------------------------------------------- output files ---


def prepare_output(path: Path | str, *, overwrite: bool, make_parent: bool = False) -> Path:
    """Check that ``path`` may be written; return it.

    An existing file is refused unless ``overwrite`` (so a report is never
    replaced by accident); a directory at that path is always refused. The
    parent folder must exist unless ``make_parent`` (then it is created).
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, expected an output file path")
    if path.exists() and not overwrite:
        raise UsageError(f"{path}: already exists (pass --overwrite to replace it)")
    from iefcli.train.rundir import check_writable

    check_writable(path.parent, f"{path}:")  # a read-only place: one line now, not a traceback after the work
    parent = path.parent
    if not parent.is_dir():
        if make_parent and not parent.exists():
            parent.mkdir(parents=True, exist_ok=True)
        elif parent.exists():
            raise UsageError(f"{parent}: not a directory")
        else:
            raise UsageError(f"{parent}: output directory does not exist")
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Write text through the run-dir module's atomic writer (temp file + os.replace, usual mode)."""
    from iefcli.train.rundir import atomic_write_text

    atomic_write_text(path, text)


# ---------------------------------------------------------------- run data ---

# Keys every metrics.jsonl line may carry that are not task metrics.
_NON_METRIC_KEYS = {"step", "epoch", "split", "loss", "lr", "time", "event", "skipped", "checkpoint", "step_time_s"}


@dataclass
class RunInfo:
    """One run directory as the reports see it.

    summary: summary.json (empty dict while the run has not ended)
    recipe:  the resolved recipe (a dict)
    records: every metrics.jsonl record, in file order
    """

    path: Path
    recipe: dict
    summary: dict
    records: list[dict] = field(repr=False)

    @property
    def name(self) -> str:
        return str(self.summary.get("recipe") or self.recipe.get("name") or self.path.name)

    @property
    def optimizer(self) -> str:
        return str(self.summary.get("optimizer") or self.recipe.get("optimizer", {}).get("name") or "?")

    @property
    def task(self) -> str:
        """What the run learns: 'data kind[:dataset] / model kind'. Runs of one task are comparable."""
        data, model = self.recipe.get("data", {}) or {}, self.recipe.get("model", {}) or {}
        d = str(data.get("kind", "?"))
        for key in ("task", "dataset", "name"):
            if isinstance(data.get(key), str):
                d += f":{data[key]}"
                break
        return f"{d} / {model.get('kind', '?')}"

    @property
    def metric(self) -> str:
        """The task metric: summary's, else the first task metric found on a validation line, else 'loss'."""
        if self.summary.get("metric"):
            return str(self.summary["metric"])
        for r in self.records:
            if r.get("split") == "val":
                for k, v in r.items():
                    if k not in _NON_METRIC_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool):
                        return k
        return "loss"

    @property
    def metric_mode(self) -> str:
        mode = self.summary.get("metric_mode")
        if mode in ("max", "min"):
            return mode
        return "min" if self.metric == "loss" else "max"

    def curve(self, split: str, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """(xs, ys) of ``key`` on ``split`` lines with a finite number, x = 'step' or 'time'.

        Skipped (NaN/Inf) training steps are left out.
        """
        xs, ys = [], []
        for r in self.records:
            if r.get("split") != split or r.get("skipped") or r.get("event") == "bad_step":
                continue
            xv, yv = r.get(x), r.get(key)
            if _is_number(xv) and _is_number(yv) and math.isfinite(yv):
                xs.append(float(xv))
                ys.append(float(yv))
        return xs, ys


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_run(path: Path | str) -> RunInfo:
    """Read one run directory through :mod:`iefcli.train.rundir`.

    Raises UsageError (one line naming the path) when it is missing, not a
    directory, or not a run directory (no recipe.yaml / metrics.jsonl).
    summary.json may be absent (a run still in progress).
    """
    from iefcli.train import rundir

    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: run directory not found")
    if not path.is_dir():
        raise UsageError(f"{path}: not a directory (expected a run directory written by `ief train`)")
    for name in (rundir.RECIPE_FILE, rundir.METRICS_FILE):
        if not (path / name).is_file():
            raise UsageError(f"{path}: not a run directory ({name} missing)")
    recipe = rundir.load_recipe(path)
    records = rundir.read_metrics(path)
    summary = rundir.read_summary(path) if (path / rundir.SUMMARY_FILE).is_file() else {}
    return RunInfo(path=path, recipe=dict(recipe), summary=summary, records=records)


def load_runs(paths: Sequence[Path | str]) -> list[RunInfo]:
    """Every run, in the order given; the first bad path raises UsageError. Duplicates are refused."""
    if not paths:
        raise UsageError("no run directory given")
    seen: dict[Path, str] = {}
    runs = []
    for p in paths:
        key = Path(p).resolve()
        if key in seen:
            raise UsageError(f"{p}: given twice (also as {seen[key]})")
        seen[key] = str(p)
        runs.append(load_run(p))
    return runs


# ------------------------------------------------------------------ compare ---

COLUMNS = (
    "task", "recipe", "optimizer", "lr", "damping", "steps", "final_train_loss", "metric",
    "best_val_metric", "best_val_step", "test_metric", "wall_time_s", "steps_per_s", "status", "run_dir",
)
"""The compare table's columns, in order (also the JSON keys and the CSV header)."""

# Column -> how "best" is decided within a task: "min", "max", or "metric" (the task metric's mode).
BEST_RULES = {
    "final_train_loss": "min",
    "best_val_metric": "metric",
    "test_metric": "metric",
    "wall_time_s": "min",
    "steps_per_s": "max",
}


def _last(run: RunInfo, split: str, key: str) -> tuple[float | None, float | None]:
    xs, ys = run.curve(split, key)
    return (xs[-1], ys[-1]) if xs else (None, None)


def compare_row(run: RunInfo) -> dict[str, Any]:
    """One table row. From summary.json when the run has ended; while it runs
    (no summary), from its last metrics lines, with status 'running'."""
    s = run.summary
    opt = run.recipe.get("optimizer", {}) or {}
    row: dict[str, Any] = {
        "task": run.task,
        "recipe": run.name,
        "optimizer": run.optimizer,
        "lr": s.get("lr", opt.get("lr")),
        "damping": s.get("damping", opt.get("damping") if run.optimizer in ("ef", "sf", "ief", "ngd") else None),
        "metric": run.metric,
        "run_dir": str(run.path),
    }
    if s:
        row.update(
            steps=s.get("total_steps"),
            final_train_loss=s.get("final_train_loss"),
            best_val_metric=s.get("best_val_metric"),
            best_val_step=s.get("best_val_step"),
            test_metric=s.get("test_metric"),
            wall_time_s=s.get("wall_time_s"),
            steps_per_s=s.get("steps_per_s"),
            status=s.get("status", "?"),
        )
    else:
        step, loss = _last(run, "train", "loss")
        xs, ys = run.curve("val", run.metric)
        best = None
        if ys:
            pick = max if run.metric_mode == "max" else min
            best = pick(range(len(ys)), key=lambda i: ys[i])
        times = [r["time"] for r in run.records if _is_number(r.get("time"))]
        wall = max(times) if times else None
        row.update(
            steps=int(step) if step is not None else None,
            final_train_loss=loss,
            best_val_metric=ys[best] if best is not None else None,
            best_val_step=int(xs[best]) if best is not None else None,
            test_metric=None,
            wall_time_s=wall,
            steps_per_s=(step / wall) if step and wall else None,
            status="running",
        )
    return {k: row.get(k) for k in COLUMNS}


def compare_rows(runs: Sequence[RunInfo]) -> list[dict[str, Any]]:
    """Rows grouped by task (tasks in order of first appearance), runs in the order given within a task."""
    rows = [compare_row(r) for r in runs]
    order = {t: i for i, t in reversed(list(enumerate(r["task"] for r in rows)))}
    return sorted(rows, key=lambda r: order[r["task"]])  # stable: keeps the given order within a task


def best_per_column(rows: Sequence[dict[str, Any]], modes: dict[str, str] | None = None) -> set[tuple[int, str]]:
    """{(row index, column)} of the best value of each BEST_RULES column within each task.

    ``modes`` maps a metric name to "max"/"min" (default: "loss" min, others max).
    A metric column is compared only between rows with the same metric; ties
    all count as best; a column with a single number in its group is not marked.
    """
    modes = modes or {}
    marks: set[tuple[int, str]] = set()
    for col, rule in BEST_RULES.items():
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            if _is_number(r.get(col)) and math.isfinite(r[col]):
                key = (r["task"], r["metric"]) if rule == "metric" else (r["task"],)
                groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            if len(idx) < 2:
                continue
            mode = rule if rule != "metric" else modes.get(key[1], "min" if key[1] == "loss" else "max")
            vals = [rows[i][col] for i in idx]
            target = max(vals) if mode == "max" else min(vals)
            marks.update((i, col) for i in idx if rows[i][col] == target)
    return marks


def metric_modes(runs: Sequence[RunInfo]) -> dict[str, str]:
    return {r.metric: r.metric_mode for r in runs}


def rows_to_json(rows: Sequence[dict[str, Any]], marks: set[tuple[int, str]]) -> str:
    """{"columns": [...], "rows": [{column: value, ..., "best": [columns]}]}; NaN/Inf -> null."""
    out = []
    for i, r in enumerate(rows):
        rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
        rec["best"] = [c for c in COLUMNS if (i, c) in marks]
        out.append(rec)
    return json.dumps({"columns": list(COLUMNS), "rows": out}, indent=2) + "\n"


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """CSV with the COLUMNS header; empty cells for missing values; full float precision."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def _fmt(col: str, v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if col in ("lr", "damping"):
        return f"{v:g}"
    if col == "final_train_loss":
        return f"{v:.4g}"
    if col in ("best_val_metric", "test_metric"):
        return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.3e}"
    if col == "wall_time_s":
        return f"{v:.1f}"
    if col == "steps_per_s":
        return f"{v:.2f}"
    return str(v)


# Table columns: (header, row keys shown in the cell). The task is the group's title row; run_dir is left to JSON/CSV.
_TABLE = (
    ("recipe", ("recipe",)),
    ("opt", ("optimizer",)),
    ("lr", ("lr",)),
    ("damping", ("damping",)),
    ("steps", ("steps",)),
    ("train loss", ("final_train_loss",)),
    ("best val @step", ("best_val_metric", "best_val_step")),
    ("test @best", ("test_metric",)),
    ("wall s", ("wall_time_s",)),
    ("steps/s", ("steps_per_s",)),
    ("status", ("status",)),
)


def render_table(rows: Sequence[dict[str, Any]], marks: set[tuple[int, str]], *, colour: bool = True):
    """A Rich Table: a title row per task ('task, metric: name'), then its runs; the
    best value of each column within a task in bold green (``colour``) or,
    for plain-text output, followed by '*'. The status column appears only
    when some run did not complete."""
    from rich import box
    from rich.table import Table

    cols = [c for c in _TABLE if c[0] != "status" or any(r["status"] != "completed" for r in rows)]
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False,
                  caption=("best per task in bold green" if colour else "* best per task")
                  + "; test metric at the best-validation checkpoint")
    for head, keys in cols:
        numeric = keys[0] not in ("recipe", "optimizer", "status")
        table.add_column(head, justify="right" if numeric else "left", no_wrap=keys[0] != "recipe")
    current = None
    for i, r in enumerate(rows):
        group = (r["task"], r["metric"])
        if group != current:
            if current is not None:
                table.add_section()
            table.add_row(f"[bold cyan]{r['task']}[/], metric: {r['metric']}", *[""] * (len(cols) - 1))
            current = group
        cells = []
        for head, keys in cols:
            if keys == ("best_val_metric", "best_val_step"):
                val, step = r["best_val_metric"], r["best_val_step"]
                text = _fmt("best_val_metric", val) + ("" if step is None else f" @{step}")
            else:
                text = _fmt(keys[0], r[keys[0]])
            if keys[0] == "recipe":
                text = f"  {text}"
            if (i, keys[0]) in marks:
                text = f"[bold green]{text}[/]" if colour else f"{text}*"
            elif not colour and keys[0] in BEST_RULES:
                text = f"{text} "  # keep the numbers aligned with the starred ones
            cells.append(text)
        table.add_row(*cells)
    return table

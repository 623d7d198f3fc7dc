"""Group runs that differ only by their seed, and summarise each group as mean +- std.

One seed is not evidence: two runs of one recipe differ by the seed's luck as much as
two optimisers may. ``ief compare --group-seeds`` (and ``ief reproduce``) therefore
collapse the runs whose resolved recipes (recipe.yaml) are identical except for

- ``seed`` (the point of the grouping),
- ``name``, ``description`` and ``output`` (where and under which name a run was written),

into one row: every numeric column becomes the mean over the group's runs, with the
sample standard deviation (n - 1 in the denominator; None for a single run) in
``<column>_std``, and ``seeds`` lists the seeds. Runs with missing values for a column
(e.g. a run still going) are left out of that column's statistics; ``n_seeds`` counts
every run of the group.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

IGNORED_KEYS = ("seed", "name", "description", "output")
"""Top-level recipe keys that may differ within a group."""

STAT_COLUMNS = ("steps", "final_train_loss", "best_val_metric", "best_val_step", "test_metric", "wall_time_s", "steps_per_s")
"""The compare columns summarised by mean and std."""


def recipe_key(recipe: Mapping[str, Any]) -> str:
    """A canonical text of the recipe without the keys a seed group may vary in."""
    rest = {k: v for k, v in recipe.items() if k not in IGNORED_KEYS}
    return json.dumps(rest, sort_keys=True, default=str)


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
    """(mean, sample std, count) of the finite numbers in ``values``; (None, None, 0) when none.

    std uses n - 1 (the spread of the runs, not of the mean); it is None for one value.
    """
    xs = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not xs:
        return None, None, 0
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None, len(xs)
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var), len(xs)


@dataclass
class SeedGroup:
    """Runs (any objects) whose recipes differ only by seed; ``seeds`` in the runs' order."""

    key: str
    runs: list
    seeds: list


def group_by_seed(runs: Sequence[Any], recipe_of=lambda r: r.recipe) -> list[SeedGroup]:
    """Groups in order of first appearance; runs keep the given order inside a group.

    ``recipe_of(run)`` gives the resolved recipe dict (default: ``run.recipe``, as
    :class:`iefcli.eval.reports.RunInfo` has).
    """
    groups: dict[str, SeedGroup] = {}
    for r in runs:
        rec = recipe_of(r)
        k = recipe_key(rec)
        g = groups.setdefault(k, SeedGroup(key=k, runs=[], seeds=[]))
        g.runs.append(r)
        g.seeds.append(rec.get("seed"))
    return list(groups.values())


def group_rows(rows: Sequence[Mapping[str, Any]], groups_of_rows: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
    """Collapse compare rows: one output row per index list in ``groups_of_rows``.

    Non-statistic columns come from the group's first row (``recipe`` is that run's name;
    ``run_dir`` lists every run, comma-separated; ``status`` is the first row's when all
    agree, else 'mixed'). Adds ``<col>_std`` for each STAT_COLUMNS column, ``n_seeds``
    and ``seeds``.
    """
    out = []
    for idx in groups_of_rows:
        sel = [rows[i] for i in idx]
        row: dict[str, Any] = dict(sel[0])
        for col in STAT_COLUMNS:
            if col in row:
                m, s, _ = mean_std(r.get(col) for r in sel)
                row[col] = m
                row[f"{col}_std"] = s
        statuses = {r.get("status") for r in sel}
        row["status"] = sel[0].get("status") if len(statuses) == 1 else "mixed"
        if "run_dir" in row:
            row["run_dir"] = ", ".join(str(r.get("run_dir")) for r in sel)
        row["n_seeds"] = len(sel)
        out.append(row)
    return out


def grouped_compare_rows(runs: Sequence[Any]) -> list[dict[str, Any]]:
    """``ief compare --group-seeds``: :func:`iefcli.eval.reports.compare_row` per run, then
    one row per seed group (see :func:`group_rows`), with ``seeds`` listed."""
    from iefcli.eval.reports import compare_row

    groups = group_by_seed(runs)
    rows, index, spans = [], 0, []
    for g in groups:
        span = []
        for r in g.runs:
            rows.append(compare_row(r))
            span.append(index)
            index += 1
        spans.append(span)
    out = group_rows(rows, spans)
    for row, g in zip(out, groups):
        row["seeds"] = list(g.seeds)
    return out


def format_mean_std(mean: float | None, std: float | None, spec: str = ".4g") -> str:
    """'0.9750 ± 0.0031' (or just the mean for one run, '-' for none)."""
    if mean is None:
        return "-"
    if std is None:
        return format(mean, spec)
    return f"{format(mean, spec)} ± {format(std, spec)}"


# ----------------------------------------------------------------------------- output of grouped rows

GROUPED_COLUMNS = (
    "task", "recipe", "optimizer", "lr", "damping", "seeds", "n_seeds", "steps", "metric",
    "final_train_loss", "final_train_loss_std", "best_val_metric", "best_val_metric_std",
    "test_metric", "test_metric_std", "wall_time_s", "wall_time_s_std", "status", "run_dir",
)
"""Columns of ``ief compare --group-seeds`` (JSON keys and CSV header)."""


def grouped_to_json(rows: Sequence[Mapping[str, Any]]) -> str:
    """{"columns": [...], "rows": [...]}; NaN/Inf -> null."""

    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    out = [{k: clean(r.get(k)) for k in GROUPED_COLUMNS} for r in rows]
    return json.dumps({"columns": list(GROUPED_COLUMNS), "rows": out}, indent=2) + "\n"


def grouped_to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(GROUPED_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else " ".join(map(str, r[k])) if isinstance(r.get(k), list) else r[k])
                    for k in GROUPED_COLUMNS})
    return buf.getvalue()


def grouped_table(rows: Sequence[Mapping[str, Any]]):
    """A Rich table: one row per seed group, numbers as 'mean ± std'."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False,
                  caption="mean ± sample std over the seeds; test metric at the best-validation checkpoint")
    for head in ("task", "recipe", "opt", "lr", "damping", "seeds", "train loss", "best val", "test @best", "wall s"):
        table.add_column(head, justify="left" if head in ("task", "recipe", "opt") else "right")
    for r in rows:
        table.add_row(
            str(r.get("task")), str(r.get("recipe")), str(r.get("optimizer")),
            "-" if r.get("lr") is None else f"{r['lr']:g}", "-" if r.get("damping") is None else f"{r['damping']:g}",
            ",".join(str(s) for s in r.get("seeds") or []),
            format_mean_std(r.get("final_train_loss"), r.get("final_train_loss_std")),
            format_mean_std(r.get("best_val_metric"), r.get("best_val_metric_std"), ".4f"),
            format_mean_std(r.get("test_metric"), r.get("test_metric_std"), ".4f"),
            format_mean_std(r.get("wall_time_s"), r.get("wall_time_s_std"), ".1f"),
        )
    return table

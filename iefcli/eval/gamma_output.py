"""What `ief eval-gamma` shows and writes: the table, the CSV of every row and the --out directory.

The figures themselves are drawn by :func:`iefcli.eval.figures.gamma_figures`
(the house style); here they are only named and saved.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

from iefcli.errors import UsageError
from iefcli.eval.gamma_eval import IMBALANCE_KEYS

JSON_FILE = "eval_gamma.json"
CSV_FILE = "eval_gamma_rows.csv"
CSV_COLUMNS = (
    "stage", "checkpoint", "batch", "method", "damping", "gamma", "gamma_ratio", "cos_to_ngd",
    "cos_to_grad", "sanity", *IMBALANCE_KEYS,
)
BAD_MARK = "!"


def figure_file(stem: str, figure_format: str = "png") -> str:
    """The --out file name of an eval-gamma figure: ratio_vs_damping.png, ... .svg."""
    return f"{stem}.{figure_format}"


def check_figure_format(figure_format: str) -> str:
    from iefcli.eval.figures import FIGURE_FORMATS

    fmt = figure_format.lower().lstrip(".")
    if fmt not in FIGURE_FORMATS:
        raise UsageError(f"--figures {figure_format}: choose {', '.join(FIGURE_FORMATS)}")
    return fmt


# ----------------------------------------------------------------------------- text


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3g}"


def render_table(doc: dict[str, Any]):
    """A Rich table: one row per damping, one column per method, median ratio [IQR].

    SGD's column is left out when other methods are shown (its ratio is 1 by definition);
    its median gamma goes into the caption instead. A method with directions that failed
    the sanity check is flagged in its header, and each affected cell carries "!k" (k rows
    left out of the median/IQR).
    """
    from rich.table import Table

    from iefcli.eval.figures import method_label

    shown = [m for m in doc["methods"] if m != "sgd"] or ["sgd"]
    by = {(r["method"], r["damping"]): r for r in doc["results"]}
    table = Table(
        title=f"gamma / gamma(SGD) at step {doc['step']}: median [IQR] over {doc['n_batches']} "
        f"{doc['split']} batches of {doc['batch_size']} (below 1 beats SGD)",
        title_justify="left",
        caption_justify="left",
    )
    caption = []
    if "sgd" in doc["methods"] and shown != ["sgd"]:
        caption.append(f"gamma(SGD) median {_fmt(by[('sgd', doc['dampings'][0])]['gamma_median'])}")
    flagged = [m for m in doc["methods"] if any(by[(m, lam)].get("n_bad", 0) for lam in doc["dampings"])]
    if flagged:
        caption.append(
            f"{BAD_MARK}k: k of {doc['n_batches']} directions of {', '.join(method_label(m) for m in flagged)} were "
            "non-finite or not descent directions (d^T g <= 0); left out of the median/IQR (bad_rows in --json)"
        )
    table.caption = "\n".join(caption) or None
    table.add_column("damping", justify="right", style="bold")
    for m in shown:
        table.add_column(method_label(m) + (f" {BAD_MARK}" if m in flagged else ""), justify="right")
    for lam in doc["dampings"]:
        cells = []
        for m in shown:
            r = by[(m, lam)]
            q25, q75 = r["gamma_ratio_iqr"]
            cell = f"{_fmt(r['gamma_ratio_median'])} [{_fmt(q25)}, {_fmt(q75)}]"
            if r.get("n_bad", 0):
                cell += f" {BAD_MARK}{r['n_bad']}"
            cells.append(cell)
        table.add_row(f"{lam:g}", *cells)
    return table


def imbalance_line(doc: dict[str, Any]) -> str:
    i = doc["imbalance"]
    return (
        f"imbalance (median over batches): per-sample gradient norm max/min {_fmt(i['grad_norm_max_min'])}, "
        f"top10%/bottom10% {_fmt(i['grad_norm_top10_bottom10'])}; logit-gradient norm max/min "
        f"{_fmt(i['logit_grad_norm_max_min'])}, top10%/bottom10% {_fmt(i['logit_grad_norm_top10_bottom10'])}"
    )


def rows_csv(results: Sequence[Any]) -> str:
    """Every row of every stage (StageResult.rows) as CSV with the CSV_COLUMNS header."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for st in results:
        for r in st.rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()


# ----------------------------------------------------------------------------- the --out directory


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise UsageError(f"--out {out_dir}: directory exists and is not empty (use --overwrite to replace it)")
        # As `ief train --overwrite`: only ever replace what this command wrote.
        if not (out_dir / JSON_FILE).is_file():
            raise UsageError(f"--out {out_dir}: not an eval-gamma output directory (no {JSON_FILE}); refusing to overwrite it")
    from iefcli.train.rundir import check_writable

    check_writable(out_dir, "--out")


def build_figures(results: Sequence[Any]):
    """{stem: Figure} for the results' documents (see :func:`iefcli.eval.figures.gamma_figures`)."""
    from iefcli.eval.figures import gamma_figures

    return gamma_figures([r.doc for r in results])


def write_out_dir(
    out_dir: Path, results: Sequence[Any], json_text: str, *, overwrite: bool, figure_format: str = "png"
) -> list[Path]:
    """Write JSON, CSV and the figures (as ``figure_format``) into a hidden sibling
    directory, then move it into place (an existing DIR is replaced only with
    ``overwrite``): never a half-written result. Returns the files, sorted."""
    from iefcli.eval.figures import save_figure
    from iefcli.train.rundir import atomic_dir, atomic_write_text

    fmt = check_figure_format(figure_format)
    check_out_dir(out_dir, overwrite)
    with atomic_dir(out_dir) as tmp:
        atomic_write_text(tmp / JSON_FILE, json_text + "\n")
        atomic_write_text(tmp / CSV_FILE, rows_csv(results))
        for stem, fig in build_figures(results).items():
            save_figure(fig, tmp / figure_file(stem, fmt))
    return sorted(out_dir.iterdir())

"""The eval-gamma outputs as a library: table, CSV, figures (one house style) and the figure files.

Documents are built here by hand with a distinct number in every cell, so a
value shown under the wrong method, damping or stage is caught.
"""

from __future__ import annotations

import csv
import io
import os

import pytest
from rich.console import Console

from iefcli.eval import figures, gamma_output as go
from iefcli.eval.gamma_run import StageResult

METHODS = ["sgd", "ef", "ief", "sf", "ngd"]
LAMS = [1e-8, 1e-2]


def _value(step: int, m: str, lam: float) -> float:
    """A distinct, positive ratio per (stage, method, damping)."""
    return round(0.1 + 0.01 * METHODS.index(m) + (0.3 if lam == 1e-2 else 0.0) + 0.001 * step, 6)


def _doc(step: int, bad: dict[tuple[str, float], int] | None = None) -> dict:
    bad = bad or {}
    results = []
    for m in METHODS:
        for lam in LAMS:
            v = 1.0 if m == "sgd" else _value(step, m, lam)
            results.append({"method": m, "damping": lam, "gamma_ratio_median": v, "gamma_ratio_mean": v,
                            "gamma_ratio_iqr": [v - 0.0001, v + 0.0001], "gamma_median": 7.0 + v,
                            "cos_to_ngd_median": None, "n_batches": 4, "n_bad": bad.get((m, lam), 0)})
    imb = {k: 2.0 + i + step for i, k in enumerate(figures.IMBALANCE_LABELS)}
    return {"checkpoint": f"run/checkpoints/step-{step}", "step": step, "split": "train", "batch_size": 8,
            "n_batches": 4, "seed": 0, "sf_samples": 1, "methods": METHODS, "dampings": LAMS,
            "results": results, "imbalance": imb, "bad_rows": []}


def _text(renderable) -> str:
    console = Console(record=True, width=200, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_table_puts_every_number_under_its_method_and_damping():
    text = _text(go.render_table(_doc(5)))
    lines = text.splitlines()
    header = next(ln for ln in lines if "damping" in ln)
    cols = [c.strip() for c in header.strip("┃│ ").split("┃" if "┃" in header else "│")]
    assert cols == ["damping", "EF", "iEF", "SF", "NGD"]  # SGD (ratio 1 by definition) is in the caption
    for lam in LAMS:
        row = next(ln for ln in lines if ln.strip("│ ").startswith(f"{lam:g} "))
        cells = [c.strip() for c in row.strip("│ ").split("│")]
        assert cells[0] == f"{lam:g}"
        for m, cell in zip(cols[1:], cells[1:]):
            want = _value(5, {"iEF": "ief"}.get(m, m.lower()), lam)
            assert cell.split(" [")[0] == f"{want:.3g}", (m, lam, cell)
    assert "gamma(SGD) median 8" in text
    assert "!" not in text  # nothing flagged


def test_table_flags_methods_with_bad_rows():
    text = _text(go.render_table(_doc(5, bad={("sf", 1e-8): 3})))
    header = next(ln for ln in text.splitlines() if "damping" in ln)
    assert "SF !" in header and "iEF !" not in header and "EF !" not in header
    row = next(ln for ln in text.splitlines() if ln.strip("│ ").startswith("1e-08 "))
    assert "!3" in row.strip("│ ").split("│")[-2] and "!" not in row.replace("!3", "")  # the SF cell only
    assert "!k: k of 4 directions of SF" in text.replace("\n", " ")


def test_csv_has_every_row_in_the_column_order():
    rows = [{"stage": 0, "checkpoint": "c", "batch": b, "method": m, "damping": 1e-8, "gamma": 1.5, "gamma_ratio": 0.5,
             "cos_to_ngd": None, "cos_to_grad": 0.25, "sanity": "ok", **{k: 3.0 for k in figures.IMBALANCE_LABELS}}
            for b in range(2) for m in ("ef", "ief")]
    rows[1]["sanity"], rows[1]["cos_to_grad"] = "not-descent", -0.5
    text = go.rows_csv([StageResult(doc={}, rows=rows)])
    got = list(csv.DictReader(io.StringIO(text)))
    assert tuple(got[0].keys()) == go.CSV_COLUMNS
    assert [(g["batch"], g["method"], g["sanity"]) for g in got] == [
        ("0", "ef", "ok"), ("0", "ief", "not-descent"), ("1", "ef", "ok"), ("1", "ief", "ok")]
    assert got[1]["cos_to_grad"] == "-0.5" and got[0]["cos_to_ngd"] == ""


def test_gamma_figures_follow_the_data_and_the_house_style():
    docs = [_doc(s) for s in (0, 10, 20)]
    figs = figures.gamma_figures(docs)
    assert list(figs) == list(figures.GAMMA_FIGURES)
    panels = [a for a in figs["ratio_vs_damping"].axes if a.get_visible()]
    assert [a.get_title() for a in panels] == ["step 0", "step 10", "step 20"]
    for ax, doc in zip(panels, docs):
        lines = ax.get_lines()
        assert [ln.get_label() for ln in lines] == ["SGD", "EF", "iEF", "SF", "NGD"]
        for ln, m in zip(lines, METHODS):
            assert list(ln.get_xdata()) == LAMS
            assert list(ln.get_ydata()) == [1.0 if m == "sgd" else _value(doc["step"], m, lam) for lam in LAMS]
            assert ln.get_color() == figures.method_style(m)[0]
        # the house style's font sizes, not the builder's own
        assert ax.title.get_fontsize() == figures.STYLE["axes.titlesize"]
        assert ax.xaxis.label.get_fontsize() in (figures.STYLE["axes.labelsize"],)
    stage_panels = [a for a in figs["ratio_vs_stage"].axes if a.get_visible()]
    assert [a.get_title() for a in stage_panels] == [f"λ = {lam:g}" for lam in LAMS]
    for ax, lam in zip(stage_panels, LAMS):
        ief = ax.get_lines()[METHODS.index("ief")]
        assert ief.get_label() == "iEF" and list(ief.get_xdata()) == [0, 10, 20]
        assert list(ief.get_ydata()) == [_value(s, "ief", lam) for s in (0, 10, 20)]
    imb = figs["imbalance_vs_stage"].axes[0]
    assert [ln.get_label() for ln in imb.get_lines()] == list(figures.IMBALANCE_LABELS.values())
    assert list(imb.get_lines()[1].get_ydata()) == [3.0, 13.0, 23.0]
    assert imb.title.get_fontsize() == figures.STYLE["axes.titlesize"]
    # one palette: every line colour of every gamma figure is a palette colour
    for fig in figs.values():
        for ax in fig.axes:
            assert all(ln.get_color() in figures.PALETTE for ln in ax.get_lines())


def test_one_colour_per_method_in_every_figure():
    from iefcli.eval.reports import RunInfo

    def run(opt):
        recs = [{"step": s, "split": "train", "loss": 1.0 / s} for s in (1, 2)]
        return RunInfo(path=f"r-{opt}", recipe={"name": opt, "data": {"kind": "digits"}, "model": {"kind": "mlp"},
                                                 "optimizer": {"name": opt}}, summary={}, records=recs)

    curves = figures.runs_figure([run("ef"), run("ief"), run("sgd"), run("mine")])
    colours = {ln.get_label(): ln.get_color() for ln in curves.axes[0].get_lines()}
    gamma_fig = figures.gamma_ratio_vs_damping(_doc(0))
    gamma_colours = {ln.get_label(): ln.get_color() for ln in gamma_fig.axes[0].get_lines()}
    assert colours["ief"] == gamma_colours["iEF"] and colours["ef"] == gamma_colours["EF"]
    assert colours["sgd"] == gamma_colours["SGD"]
    assert colours["mine"] in figures.PALETTE and colours["mine"] not in gamma_colours.values()


@pytest.mark.parametrize("fmt, magic", [("png", b"\x89PNG\r\n\x1a\n"), ("pdf", b"%PDF-"), ("svg", b"<?xml")])
def test_save_figure_by_suffix(tmp_path, fmt, magic):
    fig = figures.gamma_ratio_vs_damping(_doc(0))
    path = figures.save_figure(fig, tmp_path / f"f.{fmt.upper() if fmt == 'svg' else fmt}")
    data = path.read_bytes()
    assert data.startswith(magic) and len(data) > 2000
    if fmt == "svg":
        assert b"<svg" in data[:2000]
    if fmt in ("pdf", "svg"):  # no creation date: the same figure gives the same bytes
        assert figures.figure_bytes(fig, fmt) == data
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporaries left


def test_save_figure_refuses_other_suffixes(tmp_path):
    fig = figures.gamma_ratio_vs_damping(_doc(0))
    with pytest.raises(ValueError, match=r"must end in \.png, \.pdf, \.svg"):
        figures.save_figure(fig, tmp_path / "f.jpg")
    assert list(tmp_path.iterdir()) == []


def test_write_out_dir_writes_the_chosen_figure_format(tmp_path):
    results = [StageResult(doc=_doc(s), rows=[]) for s in (0, 10)]
    written = go.write_out_dir(tmp_path / "ev", results, "{}", overwrite=False, figure_format="svg")
    assert sorted(p.name for p in written) == sorted(
        [go.JSON_FILE, go.CSV_FILE, *(f"{stem}.svg" for stem in figures.GAMMA_FIGURES)])
    mask = os.umask(0)
    os.umask(mask)
    assert ((tmp_path / "ev").stat().st_mode & 0o777) == 0o777 & ~mask  # as mkdir, not mkdtemp's 0700
    assert all((p.stat().st_mode & 0o777) == 0o666 & ~mask for p in written)  # as open(), not 0600
    from iefcli.errors import UsageError

    with pytest.raises(UsageError, match="--figures jpg"):
        go.write_out_dir(tmp_path / "ev2", results, "{}", overwrite=False, figure_format="jpg")

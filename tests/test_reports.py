"""`ief compare` and `ief plot` on tiny run directories made once per session by
short REAL `ief train` runs (two optimisers on digits, one on the 2x2 toy)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from iefcli.cli import app
from iefcli.commands.plot import run_plot
from iefcli.eval import reports

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

DIGITS = ["quickstart", "--set", "model.sizes=[8]", "--set", "train.steps=6", "--set", "train.batch_size=32",
          "--set", "train.eval_every=3", "--set", "train.log_every=1", "--set", "train.checkpoint_every=100",
          "--set", "train.eval_batch_size=1024"]


def _train(args: list[str], out: Path) -> Path:
    res = runner.invoke(app, ["train", *args, "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    lsq = root / "lsq.yaml"
    lsq.write_text(
        "name: lsq\nmodel: {kind: linear}\ndata: {kind: toy_lsq}\n"
        "optimizer: {name: ief, lr: 0.5, damping: 1.0e-10}\n"
        "train: {steps: 6, batch_size: 2, eval_every: 2, log_every: 1, checkpoint_every: 100}\n"
    )
    return {
        "ief": _train([*DIGITS, "--set", "name=d-ief"], root / "d-ief"),
        "lsq": _train([str(lsq)], root / "lsq"),
        "sgd": _train([*DIGITS, "--set", "name=d-sgd", "--set", "optimizer.name=sgd", "--set", "optimizer.lr=0.5"],
                      root / "d-sgd"),
    }


def _records(run: Path) -> list[dict]:
    # Independent of the code under test: read the files with json directly.
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _one_line_error(res, *needles: str) -> None:
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("ief: error: ") and "\n" not in err, err
    assert "Traceback" not in res.output
    for n in needles:
        assert n in err, err


# ------------------------------------------------------------------ compare ---


def test_compare_json_rows_grouped_and_checked_against_files(runs):
    order = [runs["ief"], runs["lsq"], runs["sgd"]]
    res = runner.invoke(app, ["compare", *map(str, order), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["columns"] == list(reports.COLUMNS)
    rows = doc["rows"]
    # Grouped by task (first appearance), given order kept within a task.
    assert [r["recipe"] for r in rows] == ["d-ief", "d-sgd", "lsq"]
    assert [r["task"] for r in rows] == ["digits / mlp", "digits / mlp", "toy_lsq / linear"]
    for r in rows:
        run = Path(r["run_dir"])
        s, recs = _summary(run), _records(run)
        val = [x for x in recs if x["split"] == "val"]
        metric = s["metric"]
        pick = max if s["metric_mode"] == "max" else min
        best = pick(v[metric] for v in val)
        assert r["metric"] == metric
        assert r["best_val_metric"] == pytest.approx(best)
        assert any(v["step"] == r["best_val_step"] and v[metric] == best for v in val)
        test_line = [x for x in recs if x["split"] == "test"][-1]
        assert r["test_metric"] == pytest.approx(test_line[metric])
        assert r["steps"] == 6 == max(x["step"] for x in recs if x["split"] == "train")
        assert r["optimizer"] == s["optimizer"] and r["lr"] == s["lr"]
        assert r["final_train_loss"] == pytest.approx(s["final_train_loss"])
        assert r["wall_time_s"] > 0 and r["steps_per_s"] == pytest.approx(6 / r["wall_time_s"])
        assert r["status"] == "completed"
    # the run's own damping (its resolved recipe), and none for sgd
    assert rows[0]["damping"] == yaml.safe_load((Path(rows[0]["run_dir"]) / "recipe.yaml").read_text())["optimizer"]["damping"]
    assert isinstance(rows[0]["damping"], float) and rows[1]["damping"] is None
    # Best per column, recomputed here, within the digits group only (the toy run is alone in its group).
    d = rows[:2]
    lo = min(range(2), key=lambda i: d[i]["final_train_loss"])
    assert "final_train_loss" in rows[lo]["best"] and "final_train_loss" not in rows[1 - lo]["best"]
    hi = [i for i in range(2) if d[i]["best_val_metric"] == max(x["best_val_metric"] for x in d)]
    assert all(("best_val_metric" in rows[i]["best"]) == (i in hi) for i in range(2))
    fast = max(range(2), key=lambda i: d[i]["steps_per_s"])
    assert "steps_per_s" in rows[fast]["best"] and "wall_time_s" in rows[fast]["best"]
    assert rows[2]["best"] == []


def test_compare_csv_and_table(runs):
    paths = [str(runs[k]) for k in ("ief", "sgd", "lsq")]
    res = runner.invoke(app, ["compare", *paths, "--csv"])
    assert res.exit_code == 0, res.output
    table = list(csv.reader(io.StringIO(res.stdout)))
    assert table[0] == list(reports.COLUMNS) and len(table) == 4
    by = [dict(zip(table[0], row)) for row in table[1:]]
    assert [r["recipe"] for r in by] == ["d-ief", "d-sgd", "lsq"]
    assert float(by[0]["final_train_loss"]) == _summary(runs["ief"])["final_train_loss"]  # full precision
    assert by[1]["damping"] == ""

    res = runner.invoke(app, ["compare", *paths])
    assert res.exit_code == 0, res.output
    for needle in ("digits / mlp", "toy_lsq / linear", "d-ief", "d-sgd", "lsq", "best val", "test @best"):
        assert needle in res.stdout
    assert "status" not in res.stdout  # only shown when some run did not complete


def test_compare_out_file_and_overwrite(runs, tmp_path):
    out = tmp_path / "cmp.json"
    args = ["compare", str(runs["ief"]), str(runs["sgd"]), "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert len(json.loads(out.read_text())["rows"]) == 2
    before = out.read_text()
    _one_line_error(runner.invoke(app, ["compare", str(runs["ief"]), "--out", str(out)]), "already exists", "--overwrite")
    assert out.read_text() == before
    res = runner.invoke(app, ["compare", str(runs["ief"]), "--out", str(out), "--overwrite"])
    assert res.exit_code == 0 and len(json.loads(out.read_text())["rows"]) == 1
    _one_line_error(runner.invoke(app, ["compare", str(runs["ief"]), "--out", str(tmp_path / "x.txt")]), "x.txt")
    _one_line_error(runner.invoke(app, ["compare", str(runs["ief"]), "--json", "--csv"]), "--json", "--csv")
    assert not (tmp_path / "x.txt").exists()


def test_compare_bad_directories(runs, tmp_path):
    missing = tmp_path / "nope"
    _one_line_error(runner.invoke(app, ["compare", str(runs["ief"]), str(missing)]), str(missing), "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(runner.invoke(app, ["compare", str(empty)]), str(empty), "not a run directory")
    _one_line_error(runner.invoke(app, ["compare", str(runs["ief"] / "checkpoints")]), "not a run directory")
    f = tmp_path / "file.txt"
    f.write_text("x")
    _one_line_error(runner.invoke(app, ["compare", str(f)]), str(f), "not a directory")
    _one_line_error(runner.invoke(app, ["compare", str(runs["ief"]), str(runs["ief"])]), "given twice")
    broken = tmp_path / "broken"
    shutil.copytree(runs["lsq"], broken)
    (broken / "summary.json").write_text("{not json")
    _one_line_error(runner.invoke(app, ["compare", str(broken)]), "summary.json")


def test_compare_run_in_progress_reads_metrics(runs, tmp_path):
    live = tmp_path / "live"
    shutil.copytree(runs["ief"], live)
    (live / "summary.json").unlink()
    res = runner.invoke(app, ["compare", str(live), "--json"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)["rows"]
    recs = _records(live)
    train = [x for x in recs if x["split"] == "train"]
    val = [x for x in recs if x["split"] == "val"]
    assert row["status"] == "running" and row["test_metric"] is None
    assert row["steps"] == train[-1]["step"] and row["final_train_loss"] == pytest.approx(train[-1]["loss"])
    assert row["metric"] == "accuracy" and row["best_val_metric"] == pytest.approx(max(v["accuracy"] for v in val))


# --------------------------------------------------------------------- plot ---


def test_plot_figure_lines_match_metrics(runs, tmp_path):
    out = tmp_path / "curves.png"
    fig = run_plot(run_dirs=[runs["ief"], runs["lsq"], runs["sgd"]], out_file=out)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    axes = fig.axes
    assert len(axes) == 4  # one row of (train loss, validation metric) per task
    (d_loss, d_val, l_loss, l_val) = axes
    assert d_loss.get_yscale() == "log" and l_loss.get_yscale() == "log"
    assert [len(ax.get_lines()) for ax in axes] == [2, 2, 1, 1]
    assert [t.get_text() for t in d_val.get_legend().get_texts()] == ["ief", "sgd"]
    assert "accuracy" in d_val.get_title() and "loss" in l_val.get_title()
    for ax_loss, ax_val, run in ((d_loss, d_val, runs["ief"]), (l_loss, l_val, runs["lsq"])):
        recs = _records(run)
        train = [x for x in recs if x["split"] == "train"]
        val = [x for x in recs if x["split"] == "val"]
        line = ax_loss.get_lines()[0]
        assert list(line.get_xdata()) == [x["step"] for x in train]
        assert list(line.get_ydata()) == pytest.approx([x["loss"] for x in train])
        metric = _summary(run)["metric"]
        assert list(ax_val.get_lines()[0].get_ydata()) == pytest.approx([x[metric] for x in val])


def test_plot_cli_time_axis_overwrite_and_errors(runs, tmp_path):
    out = tmp_path / "t.png"
    res = runner.invoke(app, ["plot", str(runs["ief"]), str(runs["sgd"]), "--out", str(out), "--x", "time"])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == PNG_MAGIC
    fig = run_plot(run_dirs=[runs["sgd"]], out_file=tmp_path / "t2.png", x="time")
    train = [x for x in _records(runs["sgd"]) if x["split"] == "train"]
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == pytest.approx([x["time"] for x in train])
    assert "wall time" in fig.axes[0].get_xlabel()

    before = out.read_bytes()
    _one_line_error(runner.invoke(app, ["plot", str(runs["ief"]), "--out", str(out)]), "already exists")
    assert out.read_bytes() == before
    res = runner.invoke(app, ["plot", str(runs["ief"]), "--out", str(out), "--overwrite"])
    assert res.exit_code == 0 and out.read_bytes() != before
    new = tmp_path / "n.png"
    _one_line_error(runner.invoke(app, ["plot", str(runs["ief"]), "--out", str(new), "--x", "epoch"]), "--x")
    _one_line_error(runner.invoke(app, ["plot", str(runs["ief"]), "--out", str(tmp_path / "n.jpg")]), ".png")
    _one_line_error(runner.invoke(app, ["plot", str(tmp_path / "gone"), "--out", str(new)]), "not found")
    _one_line_error(runner.invoke(app, ["plot", str(tmp_path), "--out", str(new)]), "not a run directory")
    _one_line_error(runner.invoke(app, ["plot", str(runs["ief"]), "--out", str(tmp_path / "no" / "n.png")]),
                    "does not exist")
    assert not new.exists()


def test_labels_tell_runs_with_the_same_optimiser_apart(tmp_path):
    from iefcli.eval.figures import run_labels, runs_figure

    def run(name, opt, lr, damping):
        recs = [{"step": s, "split": "train", "loss": 1.0 / s, "time": 0.1 * s} for s in (1, 2, 3)]
        recs.append({"step": 3, "split": "val", "loss": 0.5, "accuracy": 0.9, "time": 0.4})
        recipe = {"name": name, "data": {"kind": "digits"}, "model": {"kind": "mlp"},
                  "optimizer": {"name": opt, "lr": lr, "damping": damping}}
        return reports.RunInfo(path=tmp_path / name, recipe=recipe, summary={}, records=recs)

    runs = [run("a", "ief", 50.0, 1e-7), run("b", "ief", 10.0, 1e-7), run("c", "sgd", 0.1, None),
            run("d", "ef", 0.1, 1e-3), run("e", "ef", 0.1, 1e-2)]
    assert run_labels(runs) == ["ief, lr 50.0", "ief, lr 10.0", "sgd", "ef, lr 0.1, damping 0.001",
                                "ef, lr 0.1, damping 0.01"]
    assert runs[0].metric == "accuracy" and runs[0].metric_mode == "max"
    fig = runs_figure(runs)
    loss_ax, val_ax = fig.axes
    lines = loss_ax.get_lines()
    assert len(lines) == 5 and len(val_ax.get_lines()) == 5
    # Same optimiser -> same colour, told apart by line style.
    assert lines[0].get_color() == lines[1].get_color() and lines[0].get_linestyle() != lines[1].get_linestyle()
    assert lines[0].get_color() != lines[2].get_color()

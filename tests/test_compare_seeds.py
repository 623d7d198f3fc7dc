"""Seed grouping for `ief compare --group-seeds` (iefcli.eval.seeds)."""

from __future__ import annotations

import json
import statistics

import pytest

from iefcli.eval.reports import load_runs
from iefcli.eval.seeds import format_mean_std, group_by_seed, grouped_compare_rows, mean_std, recipe_key
from iefcli.train.recipe import load_recipe_file


def _write_run(path, recipe_name, seed, lr, loss, test, name=None):
    sets = [f"seed={seed}", f"optimizer.lr={lr}"]
    if name:
        sets.append(f"name={name}")
    r = load_recipe_file(recipe_name, sets)
    path.mkdir(parents=True)
    (path / "recipe.yaml").write_text(r.to_yaml())
    (path / "metrics.jsonl").write_text(json.dumps({"step": 10, "split": "train", "loss": loss}) + "\n")
    (path / "summary.json").write_text(json.dumps({
        "recipe": r["name"], "status": "completed", "optimizer": r["optimizer"]["name"], "lr": lr,
        "metric": "accuracy", "metric_mode": "max", "final_train_loss": loss, "best_val_metric": test,
        "best_val_step": 10, "test_metric": test, "total_steps": 10, "wall_time_s": 1.0, "steps_per_s": 10.0,
    }))
    return path


def test_mean_std():
    assert mean_std([]) == (None, None, 0)
    assert mean_std([2.0, None, float("nan")]) == (2.0, None, 1)
    m, s, n = mean_std([1.0, 2.0, 4.0])
    assert n == 3 and m == pytest.approx(7 / 3) and s == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))
    assert format_mean_std(0.5, 0.25, ".2f") == "0.50 ± 0.25" and format_mean_std(None, None) == "-"


def test_groups_runs_differing_only_by_seed(tmp_path):
    a = [_write_run(tmp_path / f"ief-s{k}", "digits-ief", k, 50.0, 0.1 * (k + 1), 0.9 + 0.01 * k, name=f"ief-s{k}")
         for k in range(3)]
    b = [_write_run(tmp_path / f"ief-lr-s{k}", "digits-ief", k, 20.0, 0.5, 0.8) for k in range(2)]
    c = [_write_run(tmp_path / "sgd-s0", "digits-sgd", 0, 0.5, 0.3, 0.95)]
    runs = load_runs([a[0], b[0], c[0], a[1], b[1], a[2]])
    groups = group_by_seed(runs)
    assert [g.seeds for g in groups] == [[0, 1, 2], [0, 1], [0]]
    rows = grouped_compare_rows(runs)
    assert [r["n_seeds"] for r in rows] == [3, 2, 1]
    r0 = rows[0]
    assert r0["seeds"] == [0, 1, 2] and r0["lr"] == 50.0
    assert r0["final_train_loss"] == pytest.approx(0.2)
    assert r0["final_train_loss_std"] == pytest.approx(statistics.stdev([0.1, 0.2, 0.3]))
    assert r0["test_metric"] == pytest.approx(0.91) and r0["test_metric_std"] == pytest.approx(0.01)
    assert rows[1]["final_train_loss_std"] == 0.0
    assert rows[2]["test_metric_std"] is None and rows[2]["test_metric"] == 0.95
    assert r0["run_dir"].count(",") == 2


def test_any_other_difference_splits_a_group(tmp_path):
    base = load_recipe_file("digits-ief")
    other = load_recipe_file("digits-ief", ["train.batch_size=32", "seed=4"])
    assert recipe_key(base) != recipe_key(other)
    assert recipe_key(base) == recipe_key(load_recipe_file("digits-ief", ["seed=4", "name=x", "output.dir=elsewhere"]))


def test_grouped_outputs(tmp_path):
    import csv
    import io

    from rich.console import Console

    from iefcli.eval.seeds import GROUPED_COLUMNS, grouped_table, grouped_to_csv, grouped_to_json

    runs = load_runs([_write_run(tmp_path / f"s{k}", "digits-ief", k, 50.0, 0.1 * (k + 1), 0.9) for k in range(2)])
    rows = grouped_compare_rows(runs)
    doc = json.loads(grouped_to_json(rows))
    assert doc["columns"] == list(GROUPED_COLUMNS) and doc["rows"][0]["seeds"] == [0, 1]
    assert doc["rows"][0]["final_train_loss_std"] == pytest.approx(statistics.stdev([0.1, 0.2]))
    got = list(csv.DictReader(io.StringIO(grouped_to_csv(rows))))
    assert got[0]["seeds"] == "0 1" and float(got[0]["final_train_loss"]) == pytest.approx(0.15)
    con = Console(width=200, no_color=True, file=io.StringIO())
    con.print(grouped_table(rows))
    text = con.file.getvalue()
    assert "0.15 ± 0.07071" in text and "0,1" in text


def test_compare_group_seeds_through_the_cli(tmp_path):
    """`ief compare --group-seeds --json`: one row for two seeds of one recipe, its mean and std
    recomputed here from the runs' own summary.json."""
    import json
    import statistics

    from typer.testing import CliRunner

    from iefcli.cli import app
    from iefcli.train.launch import train_recipe

    runs = []
    for seed in (0, 1):
        d = tmp_path / f"s{seed}"
        train_recipe("quickstart", sets=[f"seed={seed}", "train.steps=3", "train.eval_every=3"], out=d)
        runs.append(d)
    res = CliRunner().invoke(app, ["compare", "--group-seeds", "--json", *map(str, runs)])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert len(rows) == 1 and sorted(rows[0]["seeds"]) == [0, 1]
    losses = [json.loads((d / "summary.json").read_text())["final_train_loss"] for d in runs]
    assert rows[0]["final_train_loss"] == pytest.approx(statistics.mean(losses), rel=1e-12)
    assert rows[0]["final_train_loss_std"] == pytest.approx(statistics.stdev(losses), rel=1e-12)

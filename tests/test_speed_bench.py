"""`ief bench`'s model zoo, fell-back parameter listing, CPU time, float64 reference check on all N
rows, and --loop wiring. Timings are never asserted (the machine is shared)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from iefcli.cli import app
from iefcli.eval import bench

runner = CliRunner()


@pytest.mark.parametrize("spec, fell", [
    ("conv1d", {}), ("resnet-gn", {}), ("cnn-bn", {}),
    ("mha", {}),  # nn.MultiheadAttention has a rule (the attention rule)
    ("tied", {}),  # the tied weight has a rule: the sum of its two holders' columns
])
def test_zoo_runs_and_lists_what_fell_back(spec, fell):
    rows = bench.run_bench(model=spec, batch_sizes=[3], methods=["sgd", "ief"], repeats=1, warmup=0,
                           memory=False, threads=1)
    ief = rows[1]
    assert ief["optimizer"] == "ief" and ief["cpu_ms_median"] > 0 and ief["cpu_ratio_to_sgd"] is not None
    listed = ief["fallback_params"]
    assert {p: v.split(":")[0] for p, v in listed.items() if p in fell} == fell
    if not fell:
        assert listed == {}
    assert ief["max_rel_diff_vs_float64"] < 1e-5  # float32 against the float64 model, every row
    assert ief["max_rel_diff_fast_vs_plain"] < 1e-5


def test_float64_check_covers_all_rows_beyond_the_plain_prefix():
    rows = bench.run_bench(model="mlp:8-16-3", batch_sizes=[12], methods=["sgd", "ief"], repeats=1, warmup=0,
                           memory=False, threads=1, check_max_numbers=3 * 195)
    assert rows[1]["check_n"] == 3 and rows[1]["max_rel_diff_vs_float64"] < 1e-5


def test_cli_loop_json_and_fallback_caption():
    res = runner.invoke(app, ["bench", "--loop", "--model", "mlp:8-16-3", "-n", "4", "--repeats", "1",
                              "--warmup", "0", "--no-memory", "--json", "-q"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert {r["path"] for r in rows} == {"sgd_loop", "precond_loop", "cli_fast"}
    res = runner.invoke(app, ["bench", "--model", "lstm", "-n", "3", "--repeats", "1", "--warmup", "0",
                              "--no-memory", "--no-check", "--methods", "sgd,ief", "-q"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "0.rnn.weight_ih_l0 -> vmap" in res.stdout


def test_cli_unknown_model_lists_the_zoo():
    res = runner.invoke(app, ["bench", "--model", "nope", "--no-memory", "-q"])
    assert res.exit_code == 2 and "resnet-gn" in res.output

"""`ief bench`: wiring, JSON shape, the fast-vs-plain check, memory worker, and bad input.

Timings are never asserted (the machine is shared); only structure and the
correctness figures the benchmark reports.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from iefcli import bench
from iefcli.cli import app

TINY = "mlp:8-16-3"
KEYS = {"optimizer", "batch_size", "ms_median", "ratio_to_sgd", "peak_mb", "max_rel_diff_fast_vs_plain"}

runner = CliRunner()


def test_run_bench_rows_and_check():
    rows = bench.run_bench(model=TINY, batch_sizes=[4, 6], repeats=1, warmup=0, memory=False, threads=1)
    assert [(r["batch_size"], r["optimizer"]) for r in rows] == [(n, m) for n in (4, 6) for m in bench.METHODS]
    for r in rows:
        assert KEYS <= set(r)
        assert r["ms_median"] > 0 and r["peak_mb"] is None
        assert r["n_params"] == 8 * 16 + 16 + 16 * 3 + 3
        if r["optimizer"] == "sgd":
            assert r["ratio_to_sgd"] == 1.0 and r["max_rel_diff_fast_vs_plain"] is None
        else:
            assert r["max_rel_diff_fast_vs_plain"] < 1e-5 and r["check_n"] == r["batch_size"]


def test_check_uses_a_prefix_when_n_times_p_is_large():
    wl = bench.build_workload(TINY, 10)
    diffs, n = bench.check_fast_vs_plain(wl, ["ief"], damping=1e-4, seed=0, max_numbers=3 * wl.n_params)
    assert n == 3 and diffs["ief"] < 1e-5


def test_steps_update_the_model_and_agree_with_sgd_direction():
    """One ief step moves the parameters by -lr * d; one sgd step by -lr * g (vs autograd)."""
    wl = bench.build_workload(TINY, 5, dtype=torch.float64)
    before = [p.detach().clone() for p in wl.model.parameters()]
    z = wl.model(wl.inputs)
    g = torch.autograd.grad(torch.nn.functional.cross_entropy(z, wl.targets), list(wl.model.parameters()))
    bench.make_step("sgd", wl, lr=0.5)()
    for p, b, gi in zip(wl.model.parameters(), before, g):
        assert torch.allclose(p.detach(), b - 0.5 * gi, rtol=0, atol=1e-12)
    d, bg = bench._direction("ief", wl, jacobian="vmap", damping=1e-3, seed=0)
    snap = [p.detach().clone() for p in wl.model.parameters()]
    bench.make_step("ief", wl, lr=0.25, damping=1e-3)()
    moved = torch.cat([(s - p.detach()).reshape(-1) for p, s in zip(wl.model.parameters(), snap)])
    assert torch.allclose(moved, 0.25 * d, rtol=1e-9, atol=1e-14)


@pytest.mark.skipif(not bench.cpu_peak_supported(), reason="needs Linux /proc peak-RSS reset")
def test_memory_worker_reports_every_method():
    mem = bench.measure_cpu_memory(model=TINY, batch_sizes=[4], methods=["sgd", "ief"], jacobian="auto",
                                   damping=1e-4, seed=0, threads=1)
    # at least the model and batch, which every step holds
    floor = (8 * 16 + 16 + 16 * 3 + 3 + 4 * 8) * 4 / 2**20
    assert set(mem["4"]) == {"sgd", "ief"} and all(v >= floor for v in mem["4"].values())


def test_cli_json():
    res = runner.invoke(app, ["bench", "--model", TINY, "-n", "4", "--repeats", "1", "--warmup", "0",
                              "--no-memory", "--json", "-q", "--methods", "sgd,ief"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["optimizer"] for r in rows] == ["sgd", "ief"] and KEYS <= set(rows[0])


def test_cli_table():
    res = runner.invoke(app, ["bench", "--model", TINY, "-n", "4", "--repeats", "1", "--warmup", "0",
                              "--no-memory", "--no-check", "-q", "--jacobian", "vmap"])
    assert res.exit_code == 0, res.output
    assert "ief bench" in res.stdout and "vmap" in res.stdout and "ief" in res.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "resnet"], "--model"),
        (["--model", "mlp:8-x"], "--model"),
        (["-n", "0"], "--batch-sizes"),
        (["-n", "a,b"], "--batch-sizes"),
        (["--methods", "sgd,adam"], "--methods"),
        (["--jacobian", "dense"], "--jacobian"),
        (["--damping", "0"], "--damping"),
        (["--repeats", "0"], "--repeats"),
        (["--device", "gpu"], "--device"),
    ],
)
def test_cli_bad_input_exit_2(args, needle):
    res = runner.invoke(app, ["bench", "--no-memory", "-q", *args])
    assert res.exit_code == 2
    assert f"ief: error: {needle}" in res.stderr and "Traceback" not in res.stderr


def test_cli_recipe():
    res = runner.invoke(app, ["bench", "--recipe", "quickstart", "-n", "8", "--repeats", "1", "--warmup", "0",
                              "--no-memory", "--json", "-q", "--methods", "sgd,ief"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert rows[0]["model"] == "recipe:quickstart" and rows[1]["max_rel_diff_fast_vs_plain"] < 1e-5


def test_cli_bad_recipe_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    res = runner.invoke(app, ["bench", "--recipe", str(bad), "-q"])
    assert res.exit_code == 2 and "ief: error:" in res.stderr and "Traceback" not in res.stderr


def test_without_sgd_no_ratios():
    rows = bench.run_bench(model=TINY, batch_sizes=[4], methods=["ief"], repeats=1, warmup=0, memory=False,
                           check=False)
    assert rows[0]["ratio_to_sgd"] is None and rows[0]["max_rel_diff_fast_vs_plain"] is None

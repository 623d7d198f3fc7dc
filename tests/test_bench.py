"""`ief bench`: wiring, JSON shape, the fast-vs-plain check, memory worker, and bad input.

Timings are never asserted (the machine is shared); only structure and the
correctness figures the benchmark reports.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from iefcli.eval import bench
from iefcli.optim import REGISTRY
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


def test_steps_are_the_training_optimisers_update():
    """A bench step IS the registry optimiser's update: sgd moves by -lr * g (autograd), ief by -lr * d
    with d the method table's direction on the plain path; state carries over between calls."""
    wl = bench.build_workload(TINY, 5, dtype=torch.float64)
    before = {k: p.detach().clone() for k, p in wl.model.named_parameters()}
    z = wl.model(wl.inputs)
    g = torch.autograd.grad(torch.nn.functional.cross_entropy(z, wl.targets), list(wl.model.parameters()))
    step = bench.make_step("sgd", wl, lr=0.5)
    assert isinstance(step.opt, REGISTRY["sgd"])
    step()
    for (k, b), gi in zip(before.items(), g):
        assert torch.allclose(step.params[k], b - 0.5 * gi, rtol=0, atol=1e-12)
    d, bg = bench._direction("ief", wl, jacobian="vmap", damping=1e-3, seed=0)
    step = bench.make_step("ief", wl, lr=0.25, damping=1e-3)
    assert isinstance(step.opt, REGISTRY["ief"]) and step.opt.config.damping == 1e-3
    step()
    moved = torch.cat([(before[k] - v).reshape(-1) for k, v in step.params.items()])
    assert torch.allclose(moved, 0.25 * d, rtol=1e-9, atol=1e-14)
    # The next call starts from the new params (the module itself is left alone).
    first = {k: v.clone() for k, v in step.params.items()}
    step()
    assert step.steps == 2 and not all(torch.equal(first[k], step.params[k]) for k in first)
    assert all(torch.equal(p.detach(), before[k]) for k, p in wl.model.named_parameters())


MEM_MODEL = "mlp:256-512-10"  # P = 136,842: every weight matrix above the worker's 64 KiB mmap threshold


@pytest.mark.skipif(not bench.cpu_peak_supported(), reason="needs Linux /proc peak-RSS reset")
def test_memory_worker_measures_what_a_step_allocates():
    """Each peak = model + batch (held) + what the step allocates. A step makes a new copy of the
    parameters (the pure update returns new tensors) besides the gradient or direction, so the measured growth
    must be well above P floats (2P allocated; small tensors may reuse freed heap pages, so the bound is 1.5P);
    and it is far below the worker's whole resident set (torch alone is > 100 MiB)."""
    n = 16
    mem = bench.measure_cpu_memory(model=MEM_MODEL, batch_sizes=[n], methods=["sgd", "ief"], jacobian="auto",
                                   damping=1e-4, seed=0, threads=1)
    p = 256 * 512 + 512 + 512 * 10 + 10
    held = (p + n * 256) * 4 + n * 8  # float32 params and inputs, int64 targets
    assert set(mem[str(n)]) == {"sgd", "ief"}
    for m, peak in mem[str(n)].items():
        grown = peak * 2**20 - held
        assert grown >= 1.5 * p * 4, (m, grown)  # a gradient / direction and the new params
        assert grown < 64 * 2**20, (m, grown)


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
        (["--methods", "sgd,kfac-x"], "--methods"),
        (["--jacobian", "dense"], "--jacobian"),
        (["--damping", "0"], "--damping"),
        (["--repeats", "0"], "--repeats"),
        (["--device", "gpu"], "--device"),
        (["--threads", "0"], "--threads"),
        (["--loop", "--threads", "0", "--model", TINY], "--threads"),
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
    assert res.exit_code == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"ief: error: --recipe: {bad}") and res.stderr.count("\n") == 1
    res = runner.invoke(app, ["bench", "--recipe", "no-such-recipe", "-q"])
    assert res.exit_code == 2 and res.stderr.startswith("ief: error: --recipe: no-such-recipe")


def test_any_training_optimiser_can_be_timed():
    rows = bench.run_bench(model=TINY, batch_sizes=[4], methods=["sgd", "adamw", "ngd"], repeats=1, warmup=0,
                           memory=False, check=False)
    assert [r["optimizer"] for r in rows] == ["sgd", "adamw", "ngd"]
    assert [r["jacobian"] for r in rows] == ["n/a", "n/a", "auto"]


def test_without_sgd_no_ratios():
    rows = bench.run_bench(model=TINY, batch_sizes=[4], methods=["ief"], repeats=1, warmup=0, memory=False,
                           check=False)
    assert rows[0]["ratio_to_sgd"] is None and rows[0]["max_rel_diff_fast_vs_plain"] is None


def test_cli_table_fits_80_columns_and_wide_keeps_the_checks():
    """The default output fits an 80-column terminal without rich squeezing it (rendered 200 wide, no
    line is longer than 80): the timing table, then the direction checks; --wide puts them in one table."""
    args = ["bench", "--model", TINY, "-n", "4,128", "--repeats", "1", "--warmup", "0", "--no-memory", "-q",
            "--methods", "sgd,adafactor,ief"]
    res = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    assert any("CPU ms" in line for line in lines) and any("vs float64" in line for line in lines)
    checks = [line for line in lines if line.startswith("│") and "ief" in line and "e-" in line]
    assert len(checks) == 2  # N = 4 and 128, in the check table
    wide = runner.invoke(app, [*args, "--wide"], env={"COLUMNS": "200"})
    assert wide.exit_code == 0, wide.output
    assert max(len(line) for line in wide.stdout.splitlines()) > 80
    assert sum("direction check" in line for line in wide.stdout.splitlines()) == 0
    header = next(line for line in wide.stdout.splitlines() if "optimizer" in line)
    assert "fast vs plain" in header and "vs float64" in header and "CPU ms" in header


def test_cli_json_is_complete():
    res = runner.invoke(app, ["bench", "--model", TINY, "-n", "4", "--repeats", "1", "--warmup", "0",
                              "--no-memory", "--json", "-q", "--methods", "sgd,ief"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)[1]
    for k in ("ms_median", "ratio_to_sgd", "cpu_ms_median", "cpu_ratio_to_sgd", "peak_mb", "peak_ratio_to_sgd",
              "max_rel_diff_fast_vs_plain", "check_n", "max_rel_diff_vs_float64", "fallback_params"):
        assert k in row, k
    assert row["max_rel_diff_vs_float64"] < 1e-5 and row["check_n"] == 4


@pytest.mark.parametrize("method", ["sgd", "ief", "ef"])
def test_bench_times_the_step_between_log_lines_by_default(method):
    """diagnostics=False (run_bench's default) is the step `ief train` runs between log lines: the
    same new params bit for bit, without the logging step's diagnostics."""
    wl = bench.build_workload(TINY, 6, dtype=torch.float64)
    lean, full = (bench.make_step(method, wl, lr=0.1, damping=1e-3, diagnostics=d) for d in (False, True))
    for _ in range(2):
        lean(), full()
    assert all(torch.equal(lean.params[k], full.params[k]) for k in full.params)
    assert "grad_norm" in full.metrics and "grad_norm" not in lean.metrics
    res = runner.invoke(app, ["bench", "--model", TINY, "-n", "4", "--repeats", "1", "--warmup", "0",
                              "--no-memory", "--no-check", "--json", "-q", "--methods", f"sgd,{method}"])
    assert res.exit_code == 0 and all(r["diagnostics"] is False for r in json.loads(res.stdout))
    res = runner.invoke(app, ["bench", "--model", TINY, "-n", "4", "--repeats", "1", "--warmup", "0",
                              "--no-memory", "--no-check", "--json", "-q", "--methods", "sgd", "--diagnostics"])
    assert res.exit_code == 0 and all(r["diagnostics"] is True for r in json.loads(res.stdout))


@pytest.mark.skipif(not bench.cpu_peak_supported(), reason="needs /proc peak RSS (Linux)")
def test_loop_bench_honours_threads_and_sees_the_steps_memory():
    """`ief bench --loop`, in a fresh process as a user runs it (the allocator tuned at start-up): one
    thread means one thread (process CPU time within wall time), and the peaks are measured after the
    timing on a trimmed heap, so the preconditioner's captured layer tensors show (an untrimmed heap
    served them from freed pages: every path read as the model and batch alone)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "iefcli", "bench", "--loop", "--model", "mlp", "-n", "32",
                           "--threads", "1", "--repeats", "2", "--warmup", "1", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["path"]: r for r in json.loads(proc.stdout)}
    for r in rows.values():
        assert r["cpu_ms"] <= 1.05 * r["wall_ms"] + 0.5, r  # one thread cannot use more CPU than wall time
    # the iEF paths allocate ~8 MiB more than an SGD step during the step on the bench MLP (the layer
    # blocks, the Gram, J^T x); on an untrimmed heap the three mostly read the same (model and batch)
    peaks = {k: r["peak_mib"] for k, r in rows.items()}
    assert peaks["precond_loop"] > peaks["sgd_loop"] + 4 and peaks["cli_fast"] > peaks["sgd_loop"] + 4, peaks

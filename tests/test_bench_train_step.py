"""tools/bench_train_step.py: the loop's step timed beside the bench's step and a plain torch loop, in
one real training run. Structure only: timings are never asserted (the machine is shared)."""

from __future__ import annotations


import pytest
from tool_scripts import load_tool

def _tool():
    return load_tool("bench_train_step")


@pytest.mark.parametrize("optimizer, plain", [("sgd", True), ("ief", False)])
def test_measure_pairs_every_loop_step_with_a_bench_step(optimizer, plain):
    r = _tool().measure("quickstart", optimizer, steps=4, skip=1, tensorboard="off")
    assert r["steps"] == 4 and r["loop_steps"] == r["bench_steps"] == 6  # 1 skipped + 4 + the last one
    assert r["batch_size"] == 64 and r["n_params"] == 64 * 64 + 64 + 64 * 10 + 10
    for k in ("loop", "bench", "loop_cpu", "bench_cpu"):
        assert r[f"{k}_ms_mean"] > 0 and r[f"{k}_ms_median"] > 0
    assert r["loop_over_bench"] > 0 and r["loop_over_bench_cpu"] > 0
    assert ("plain_ms_mean" in r) == plain and ("loop_over_plain" in r) == plain


def test_main_prints_a_markdown_table(capsys):
    assert _tool().main(["--recipes", "quickstart", "--optimizers", "adamw", "--steps", "3", "--skip", "1",
                         "--tensorboard", "off"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| recipe | optimizer | bench ms | loop ms |") and out[2].startswith("| quickstart | adamw |")

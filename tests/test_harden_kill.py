"""SIGKILL at seeded random moments, then resume: the finished run is identical to an
uninterrupted one (issue 17). Kills land either at a random time or exactly at the K-th
``os.replace`` of the run (before or after it: inside a checkpoint, best/ or metrics write),
K drawn from a seeded RNG over the replaces an uninterrupted run makes. After each kill the
run continues with ``--resume`` (or starts again with ``--overwrite`` when no checkpoint
was complete yet). Compared at the end: every parameter and optimiser tensor of the last
checkpoint and of best/, and metrics.jsonl without its wall-clock fields.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from iefcli.cli import app
from iefcli.train import rundir

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

RECIPE = {
    "name": "kill", "seed": 3, "device": "cpu", "model": {"kind": "mlp", "sizes": [8]}, "data": {"kind": "digits"},
    "optimizer": {"name": "ief", "lr": 0.5},
    "train": {"steps": 8, "batch_size": 16, "eval_every": 2, "checkpoint_every": 1, "log_every": 1},
}
CLOCK_FIELDS = ("time", "step_time_s")

WRAPPER = r'''
import os, signal, sys, threading
mode, arg, after = sys.argv[1], sys.argv[2], sys.argv[3] == "after"
from iefcli.cli import app
if mode == "replace":
    k, real, seen = int(arg), os.replace, [0]
    def replace(a, b, *r, **kw):
        seen[0] += 1
        if seen[0] == k and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(a, b, *r, **kw)
        if seen[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    os.replace = replace
else:
    t = threading.Timer(float(arg), lambda: os.kill(os.getpid(), signal.SIGKILL))
    t.daemon = True
    t.start()
app(sys.argv[4:], prog_name="ief")
'''


def _state(run: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    last = rundir.list_checkpoints(run)[-1][1]
    for where in (last, run / rundir.BEST_DIR):
        for f in (rundir.PARAMS_FILE, rundir.OPTIMIZER_FILE):
            for k, v in load_file(str(where / f)).items():
                out[f"{where.name}/{f}/{k}"] = v
    return out


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in CLOCK_FIELDS} for r in rundir.read_metrics(run)]


def test_random_sigkills_then_resume_give_the_uninterrupted_run(tmp_path):
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump(RECIPE))
    ref = tmp_path / "ref"
    count = [0]
    real = os.replace

    def counting(a, b, *r, **kw):
        count[0] += 1
        return real(a, b, *r, **kw)

    os.replace = counting
    try:
        assert CliRunner().invoke(app, ["train", str(rp), "-o", str(ref), "-q"]).exit_code == 0
    finally:
        os.replace = real
    n_replace = count[0]
    assert n_replace > 20  # every checkpoint, best/ and the summary go through os.replace

    wrapper = tmp_path / "wrap.py"
    wrapper.write_text(WRAPPER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    rng = random.Random(17)
    kills = [("replace", rng.randrange(1, n_replace // 2), rng.choice(["before", "after"])) for _ in range(4)]
    kills += [("time", round(rng.uniform(0.2, 1.5), 2), "-") for _ in range(1)]
    rng.shuffle(kills)
    killed = 0
    for mode, arg, when in [*kills, ("none", 3600, "-")]:
        if rundir.list_checkpoints(run) if run.is_dir() else False:
            args = ["train", "--resume", str(run), "-q"]
        else:
            args = ["train", str(rp), "-o", str(run), "-q", "--overwrite"]
        proc = subprocess.run([sys.executable, str(wrapper), mode, str(arg), when, *args], env=env,
                              capture_output=True, text=True, timeout=120)
        if proc.returncode == -signal.SIGKILL:
            killed += 1
            continue
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        if mode == "none":
            break
    assert killed >= 4, killed  # most kills must land (the run has not finished before them)
    assert json.loads((run / rundir.SUMMARY_FILE).read_text())["status"] == "completed"
    a, b = _state(ref), _state(run)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and bool((a[k] == b[k]).all()), k
    assert _metrics(run) == _metrics(ref)
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []

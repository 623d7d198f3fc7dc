"""Nothing on disk is lost to a failed `ief train`, and no checkpoint holds a diverged model
(issue 17, points 1-2). Everything goes through the real CLI; "unchanged" is checked by
checksums of every file that was there before."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from iefcli.cli import app
from iefcli.train import rundir

RECIPE = {
    "name": "safe", "seed": 0, "device": "cpu", "model": {"kind": "mlp", "sizes": [8]}, "data": {"kind": "digits"},
    "optimizer": {"name": "sgd", "lr": 0.1},
    "train": {"steps": 3, "batch_size": 64, "eval_every": 2, "checkpoint_every": 2},
}


def _checksums(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _train(*args: str):
    return CliRunner().invoke(app, ["train", *args])


def _one_line_error(res, code: int, *needles: str) -> None:
    assert res.exit_code == code, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ief: error: "), res.stderr
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def old_run(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(RECIPE))
    run = tmp_path / "runs" / "q"
    assert _train(str(p), "-o", str(run), "-q").exit_code == 0
    return p, run, _checksums(run)


def _siblings(run: Path) -> list[str]:
    return sorted(p.name for p in run.parent.iterdir())


@pytest.mark.parametrize("override, needle", [
    ("train.batch_size=100000", "train.batch_size: larger than the training split"),
    ("loss.kind=mse", "loss.kind: mse needs floating targets"),
    ("loss.kind=token_cross_entropy", "loss.kind: token_cross_entropy needs"),
    ("schedule.warmup_steps=50000", "schedule.warmup_steps"),
    ("data.val_fraction=0.8", "data.test_fraction"),
    ("model.sizes=[0]", "model.sizes"),
])
def test_overwrite_with_a_bad_override_changes_nothing(old_run, override, needle):
    p, run, before = old_run
    res = _train(str(p), "-o", str(run), "-q", "--overwrite", "--set", override)
    _one_line_error(res, 2, needle)
    assert _checksums(run) == before
    assert _siblings(run) == ["q"]


def test_without_overwrite_a_failed_check_leaves_no_directory(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(RECIPE))
    res = _train(str(p), "-o", str(tmp_path / "new"), "-q", "--set", "loss.kind=mse")
    _one_line_error(res, 2, "loss.kind")
    assert not (tmp_path / "new").exists()


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(old_run, monkeypatch):
    """A failure after the directory was prepared but before the first checkpoint
    (here: the initial validation) puts the old run back, bit for bit."""
    from iefcli.errors import UsageError
    from iefcli.train.task import Task

    p, run, before = old_run

    def broken(self, *a, **k):
        raise UsageError("val split unreadable (simulated)")

    monkeypatch.setattr(Task, "evaluate", broken)
    res = _train(str(p), "-o", str(run), "-q", "--overwrite", "--set", "train.steps=2")
    _one_line_error(res, 2, "simulated")
    assert _checksums(run) == before
    assert _siblings(run) == ["q"]
    monkeypatch.undo()
    # and a good --overwrite replaces it, leaving nothing aside
    res = _train(str(p), "-o", str(run), "-q", "--overwrite", "--set", "train.steps=2", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["total_steps"] == 2
    assert _checksums(run) != before and _siblings(run) == ["q"]


def test_overwrite_keeps_the_old_run_aside_while_the_new_one_starts(old_run, monkeypatch):
    """Between preparing the directory and the first checkpoint the old run is only moved
    (a kill there leaves it whole in a hidden sibling), and it is gone once the new run
    has its first checkpoint."""
    p, run, before = old_run
    seen = {}
    real = rundir.write_checkpoint

    def spy(ckpt, **kw):
        if "aside" not in seen:
            aside = [q for q in run.parent.iterdir() if q.name.startswith(".q.overwritten-")]
            seen["aside"] = [_checksums(q) for q in aside]
        out = real(ckpt, **kw)
        return out

    monkeypatch.setattr(rundir, "write_checkpoint", spy)
    assert _train(str(p), "-o", str(run), "-q", "--overwrite").exit_code == 0
    assert seen["aside"] == [before]
    assert _siblings(run) == ["q"]


def test_a_diverging_step_never_reaches_a_checkpoint_or_best(tmp_path):
    """sgd at lr 1e30 blows the parameters up in one step (still finite, loss inf after):
    no checkpoint and no best/ may hold them, and the error names the last good checkpoint."""
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({**RECIPE, "optimizer": {"name": "sgd", "lr": 1e30},
                                 "train": {"steps": 10, "batch_size": 64, "eval_every": 1, "checkpoint_every": 1}}))
    run = tmp_path / "d"
    res = _train(str(p), "-o", str(run), "-q")
    _one_line_error(res, 1, "consecutive steps with NaN/Inf", f"the last good checkpoint is {run / 'checkpoints' / 'step-0'}")
    assert [s for s, _ in rundir.list_checkpoints(run)] == [0]
    from iefcli.train.recipe import load_recipe_file
    from iefcli.train.task import build_task

    task = build_task(load_recipe_file(run / rundir.RECIPE_FILE), "cpu")
    for ck in [c for _, c in rundir.list_checkpoints(run)] + [run / rundir.BEST_DIR]:
        params = rundir.load_params(task.params(), ck)
        assert all(torch.isfinite(v).all() for v in params.values()), ck
        assert torch.isfinite(torch.tensor(task.evaluate(params, "val")["loss"])), ck
    meta = rundir.checkpoint_meta(run / rundir.BEST_DIR)
    assert meta["step"] == 0 and meta["metrics"]["val"]["loss"] is not None
    skipped = [r for r in rundir.read_metrics(run) if r.get("event") == "checkpoint_skipped"]
    assert skipped and skipped[0]["step"] == 1
    assert rundir.read_summary(run)["status"] == "failed"


def test_a_validation_with_a_non_finite_loss_is_never_best(tmp_path, monkeypatch):
    """A diverged model can still score a good metric (here: accuracy 1.0 with a NaN loss):
    it must not become best/, nor a checkpoint."""
    from iefcli.train.task import Task

    real = Task.evaluate
    calls = []

    def evaluate(self, params=None, split="val", batch_size=None):
        out = real(self, params, split, batch_size)
        if split == "val":
            calls.append(1)
            if len(calls) == 2:  # the validation at step 2
                out = dict(out, loss=float("nan"), accuracy=1.0)
        return out

    monkeypatch.setattr(Task, "evaluate", evaluate)
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(RECIPE))
    run = tmp_path / "run"
    assert _train(str(p), "-o", str(run), "-q").exit_code == 0
    val = [r for r in rundir.read_metrics(run) if r["split"] == "val"]
    assert [(r["step"], r["loss"] is None, r["accuracy"]) for r in val][1] == (2, True, 1.0)
    s = rundir.read_summary(run)
    assert s["best_val_step"] != 2 and s["best_val_metric"] < 1.0
    assert rundir.checkpoint_meta(run / rundir.BEST_DIR)["step"] == s["best_val_step"]
    assert 2 not in [st for st, _ in rundir.list_checkpoints(run)]

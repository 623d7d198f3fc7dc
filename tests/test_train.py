"""`ief train`: real short runs on tiny recipes (run dir, JSON schema, each optimiser
lowers the loss, resume equivalence, Ctrl-C, NaN handling, atomic checkpoints, overwrite)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import iefcli.train.loop as loop
from iefcli.cli import app
from iefcli.errors import UsageError
from iefcli.train import rundir
from iefcli.train.recipe import builtin_recipes

runner = CliRunner()

TINY = {
    "name": "tiny",
    "seed": 1,
    "device": "cpu",
    "model": {"kind": "mlp", "sizes": [16]},
    "data": {"kind": "digits"},
    "optimizer": {"name": "ief", "lr": 50.0, "damping": 1e-7},
    "train": {"steps": 12, "batch_size": 32, "eval_every": 4, "log_every": 2, "checkpoint_every": 5},
}

SUMMARY_KEYS = {
    "recipe", "status", "optimizer", "lr", "damping", "metric", "final_train_loss", "best_val_metric",
    "best_val_step", "test_metric", "total_steps", "wall_time_s", "steps_per_s",
}


def _recipe(tmp_path: Path, **changes) -> Path:
    r = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        sec, _, k = key.partition("__")
        if k:
            r.setdefault(sec, {})[k] = value
        else:
            r[sec] = value
    p = tmp_path / f"r{len(list(tmp_path.glob('r*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def _train(args: list[str]):
    return runner.invoke(app, ["train", *args])


def test_quickstart_reaches_95_percent(tmp_path):
    """The README's first command: quickstart with its defaults, test accuracy >= 0.95."""
    res = _train(["quickstart", "--out", str(tmp_path / "qs"), "--json", "-q", "--set", "device=cpu"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["status"] == "completed" and s["optimizer"] == "ief"
    assert s["test_metric"] >= 0.95, s


def test_run_dir_contents_and_schema(tmp_path):
    out = tmp_path / "run"
    res = _train([str(_recipe(tmp_path)), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert SUMMARY_KEYS <= set(s) and s == rundir.read_summary(out)
    assert s["total_steps"] == 12 and s["status"] == "completed" and s["metric"] == "accuracy"
    # recipe.yaml is the resolved recipe: it rebuilds the same task
    r = rundir.load_recipe(out)
    assert r["optimizer"]["lr"] == 50.0 and r["train"]["steps"] == 12 and r["schedule"]["kind"] == "constant"
    recs = rundir.read_metrics(out)
    for rec in recs:
        assert {"step", "epoch", "split", "loss", "lr", "time"} <= set(rec), rec
    train = [r for r in recs if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
    for r in train:  # iEF diagnostics
        assert {"solve_residual", "rows_kept", "grad_norm_max_min", "grad_norm_top10_bottom10",
                "cos_update_grad"} <= set(r)
        assert r["solve_residual"] < 1e-6 and 1 <= r["rows_kept"] <= 32
        assert 0 < r["mean_target_prob"] < 1
    val = [r for r in recs if r["split"] == "val"]
    assert [r["step"] for r in val] == [0, 4, 8, 12] and all("accuracy" in r for r in val)
    test = [r for r in recs if r["split"] == "test"]
    assert len(test) == 1 and test[0]["accuracy"] == s["test_metric"]
    assert [st for st, _ in rundir.list_checkpoints(out)] == [0, 5, 10, 12]
    # best/ holds the best validation step, and the test metric was taken there
    best_step = max(val, key=lambda r: (r["accuracy"], -r["step"]))["step"]
    assert s["best_val_step"] == best_step == rundir.checkpoint_meta(out)["step"]
    assert rundir.resolve_checkpoint(out) == out / "best"
    params = rundir.load_checkpoint_params(out)
    assert set(params) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    ck12 = rundir.checkpoint_dir(out, 12)
    meta = rundir.checkpoint_meta(ck12)
    assert meta["step"] == 12 and "epoch" in meta and "metrics" in meta
    ts = rundir.read_trainer_state(ck12)
    assert ts["step"] == 12 and "data_order" in ts and "rng" in ts


@pytest.mark.parametrize("opt", ["sgd", "adamw", "adafactor", "ef", "sf", "ief", "ngd"])
def test_each_optimizer_reduces_training_loss(tmp_path, opt):
    """The shipped digits-<opt> recipe, 24 steps: the training loss falls well below its start."""
    out = tmp_path / opt
    sets = ["train.steps=24", "train.log_every=1", "train.eval_every=24", "train.checkpoint_every=24",
            "device=cpu", "model.sizes=[32]"]
    res = _train([f"digits-{opt}", "--out", str(out), "-q", *sum((["--set", s] for s in sets), [])])
    assert res.exit_code == 0, res.output
    losses = [r["loss"] for r in rundir.read_metrics(out) if r["split"] == "train"]
    assert len(losses) == 24
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.75 * first, (opt, first, last)
    assert rundir.read_summary(out)["optimizer"] == opt


class _Stopper:
    """Wraps the optimiser factory: the update raises/returns NaN on chosen calls."""

    def __init__(self, monkeypatch, *, interrupt_at=None, nan_at=()):
        self.calls = 0
        real = loop.make_optimizer
        stopper = self

        def factory(cfg, **kw):
            opt = real(cfg, **kw)
            inner = opt.update

            def update(params, state, batch, *, key, lr):
                stopper.calls += 1
                if stopper.calls == interrupt_at:
                    raise KeyboardInterrupt
                new, st, m = inner(params, state, batch, key=key, lr=lr)
                if nan_at == "all" or stopper.calls in nan_at:
                    m = dict(m, loss=torch.tensor(float("nan")))
                return new, st, m

            opt.update = update
            return opt

        monkeypatch.setattr(loop, "make_optimizer", factory)


@pytest.mark.parametrize(
    "changes",
    [
        {"optimizer__momentum": 0.5},
        {"optimizer": {"name": "adamw", "lr": 0.003}, "schedule": {"kind": "cosine", "warmup_steps": 3}},
        {"optimizer": {"name": "sf", "lr": 2.0, "damping": 1.0, "mc_samples": 2}},
    ],
    ids=["ief-momentum", "adamw-cosine", "sf-sampling"],
)
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, changes):
    """Interrupted at step 7 (Ctrl-C), resumed from the last checkpoint -> bit-for-bit the same params."""
    p = _recipe(tmp_path, **changes)
    full = tmp_path / "full"
    assert _train([str(p), "--out", str(full), "-q"]).exit_code == 0

    part = tmp_path / "part"
    _Stopper(monkeypatch, interrupt_at=8)  # the 8th update call: 7 steps done
    res = _train([str(p), "--out", str(part), "-q"])
    assert res.exit_code == 130, res.output
    assert "interrupted at step 7" in res.stderr and "--resume" in res.stderr
    assert rundir.read_summary(part)["status"] == "interrupted"
    assert [s for s, _ in rundir.list_checkpoints(part)] == [0, 5, 7]
    monkeypatch.undo()

    res = _train(["--resume", str(part), "-q", "--json"])
    assert res.exit_code == 0, res.output
    a = rundir.load_checkpoint_params(rundir.checkpoint_dir(full, 12))
    b = rundir.load_checkpoint_params(rundir.checkpoint_dir(part, 12))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = rundir.read_summary(full), rundir.read_summary(part)
    assert sb["status"] == "completed" and sb["best_val_step"] == sa["best_val_step"]
    assert sb["test_metric"] == sa["test_metric"]
    # the metrics log reads as one run (no duplicated steps)
    steps_a = [(r["split"], r["step"]) for r in rundir.read_metrics(full)]
    steps_b = [(r["split"], r["step"]) for r in rundir.read_metrics(part)]
    assert steps_a == steps_b


def test_resume_from_older_checkpoint(tmp_path, monkeypatch):
    """Resuming after a crash that left only step-5: the log after step 5 is dropped, the result matches."""
    p = _recipe(tmp_path)
    full = tmp_path / "full"
    assert _train([str(p), "--out", str(full), "-q"]).exit_code == 0
    part = tmp_path / "part"
    _Stopper(monkeypatch, interrupt_at=9)
    assert _train([str(p), "--out", str(part), "-q"]).exit_code == 130
    monkeypatch.undo()
    import shutil

    shutil.rmtree(rundir.checkpoint_dir(part, 8))
    assert _train(["--resume", str(part), "-q"]).exit_code == 0
    a = rundir.load_checkpoint_params(rundir.checkpoint_dir(full, 12))
    b = rundir.load_checkpoint_params(rundir.checkpoint_dir(part, 12))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in rundir.read_metrics(part) if r["split"] == "train"] == [2, 4, 6, 8, 10, 12]
    # resuming a finished run changes nothing but re-tests: still one test line, same result
    before = rundir.read_summary(part)
    assert _train(["--resume", str(part), "-q"]).exit_code == 0
    assert len([r for r in rundir.read_metrics(part) if r["split"] == "test"]) == 1
    assert rundir.read_summary(part)["test_metric"] == before["test_metric"]


def test_nan_steps_skipped_then_fail_with_exit_1(tmp_path, monkeypatch):
    p = _recipe(tmp_path, train__max_bad_steps=3)
    # one bad step: skipped, logged, the run completes
    _Stopper(monkeypatch, nan_at=(3,))
    out = tmp_path / "once"
    assert _train([str(p), "--out", str(out), "-q"]).exit_code == 0
    bad = [r for r in rundir.read_metrics(out) if r.get("event") == "bad_step"]
    assert len(bad) == 1 and bad[0]["step"] == 3 and bad[0]["loss"] is None
    monkeypatch.undo()
    # every step bad: stops after 3 with exit 1; the step-0 checkpoint is intact and unchanged
    _Stopper(monkeypatch, nan_at="all")
    out = tmp_path / "always"
    res = _train([str(p), "--out", str(out), "-q"])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("ief: error: 3 consecutive steps with NaN/Inf")
    assert rundir.read_summary(out)["status"] == "failed"
    assert [s for s, _ in rundir.list_checkpoints(out)] == [0]
    init = rundir.load_checkpoint_params(rundir.checkpoint_dir(out, 0))
    assert all(torch.isfinite(v).all() for v in init.values())


def test_atomic_checkpoint_survives_failed_write(tmp_path, monkeypatch):
    ck = tmp_path / "checkpoints" / "step-1"
    good = {"w": torch.arange(6.0).reshape(2, 3)}
    rundir.write_checkpoint(ck, params=good, optimizer_state={"m": {"w": torch.ones(2, 3)}},
                            trainer_state={"step": 1}, meta={"step": 1, "epoch": 0, "metrics": {}})
    # 1) the writer dies while moving the new params file into place
    real_replace = os.replace

    def failing(src, dst):
        if str(dst).endswith(rundir.PARAMS_FILE):
            raise OSError("disk full (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        rundir.write_checkpoint(ck, params={"w": torch.zeros(2, 3)}, optimizer_state={},
                                trainer_state={"step": 2}, meta={"step": 2, "epoch": 0, "metrics": {}})
    monkeypatch.setattr(os, "replace", real_replace)
    assert torch.equal(rundir.load_checkpoint_params(ck)["w"], good["w"])
    assert rundir.checkpoint_meta(ck)["step"] == 1
    assert [p.name for p in ck.parent.iterdir()] == ["step-1"], "no temporary left behind"

    # 2) best/ replaced: crash between "old best -> .best-old" and "new -> best"
    run = tmp_path
    (run / rundir.RECIPE_FILE).write_text("{}\n")
    rundir.write_checkpoint(run / "best", params=good, optimizer_state={}, trainer_state={},
                            meta={"step": 4, "epoch": 0, "metrics": {}})
    calls = []

    def second_fails(src, dst):
        calls.append(dst)
        if Path(dst).name == "best" and len([c for c in calls if Path(c).name in ("best", ".best-old")]) == 2:
            raise OSError("killed (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError):
        rundir.write_checkpoint(run / "best", params={"w": torch.zeros(2, 3)}, optimizer_state={},
                                trainer_state={}, meta={"step": 8, "epoch": 0, "metrics": {}})
    monkeypatch.setattr(os, "replace", real_replace)
    assert rundir.resolve_checkpoint(run) == run / ".best-old"
    assert torch.equal(rundir.load_checkpoint_params(run)["w"], good["w"])
    assert rundir.checkpoint_meta(run)["step"] == 4


def test_corrupt_files_raise_usage_errors(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.METRICS_FILE).write_text('{"step": 1, "split": "train"}\n{"step": 2, "spl')
    assert rundir.read_metrics(run) == [{"step": 1, "split": "train"}]  # torn last line skipped
    (run / rundir.METRICS_FILE).write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(UsageError, match="metrics.jsonl: corrupt metrics file"):
        rundir.read_metrics(run)
    (run / rundir.SUMMARY_FILE).write_text("{")
    with pytest.raises(UsageError, match="summary.json: corrupt summary"):
        rundir.read_summary(run)
    ck = run / "checkpoints" / "step-3"
    ck.mkdir(parents=True)
    (ck / rundir.PARAMS_FILE).write_bytes(b"garbage")
    with pytest.raises(UsageError, match="params.safetensors: corrupt"):
        rundir.load_checkpoint_params(ck)
    with pytest.raises(UsageError, match="not found"):
        rundir.read_summary(tmp_path / "none")


def test_overwrite_refusal(tmp_path):
    p = _recipe(tmp_path, train__steps=2)
    out = tmp_path / "run"
    assert _train([str(p), "--out", str(out), "-q"]).exit_code == 0
    before = (out / rundir.SUMMARY_FILE).read_bytes()
    res = _train([str(p), "--out", str(out), "-q"])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "not empty" in res.stderr and "--overwrite" in res.stderr
    assert (out / rundir.SUMMARY_FILE).read_bytes() == before
    res = _train([str(p), "--out", str(out), "-q", "--overwrite", "--set", "train.steps=3", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["total_steps"] == 3
    # --overwrite never deletes a directory that is not a run directory
    other = tmp_path / "docs"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    res = _train([str(p), "--out", str(other), "-q", "--overwrite"])
    assert res.exit_code == 2 and "not a run directory" in res.stderr
    assert (other / "keep.txt").read_text() == "mine"


def test_quiet_prints_only_the_summary_line(tmp_path):
    res = _train([str(_recipe(tmp_path, train__steps=2)), "--out", str(tmp_path / "q"), "-q"])
    assert res.exit_code == 0
    assert res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("completed: tiny")


def test_progress_mode_and_json(tmp_path):
    """Without --quiet the progress bar runs on stderr and ends showing the last step's
    numbers (steps done, epoch, training loss, val metric, lr) within 80 columns;
    --json puts only the summary on stdout."""
    import re

    out = tmp_path / "p"
    res = _train([str(_recipe(tmp_path, train__steps=3)), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["total_steps"] == 3
    bar, summary = res.stderr.strip().splitlines()
    assert summary.startswith("completed: tiny")
    recs = rundir.read_metrics(out)
    last_train = [r for r in recs if r["split"] == "train"][-1]
    last_val = [r for r in recs if r["split"] == "val"][-1]
    assert last_train["step"] == last_val["step"] == 3
    m = re.fullmatch(r"train \S+ 3/3 ep (\S+) loss (\S+) val acc (\S+) lr (\S+) (\d+)ms/step \S+", bar)
    assert m, bar
    spe = 1797 * (1 - 0.15 - 0.2) // 32  # digits' training split in batches of 32
    assert m.group(1) == f"{3 / spe:.1f}"
    assert m.group(2) == f"{last_train['loss']:.4g}" and m.group(3) == f"{last_val['accuracy']:.4g}"
    assert float(m.group(4)) == 50.0
    assert len(bar) <= 80


def test_init_from_loads_saved_params(tmp_path):
    """model.init_from (a run dir -> best/) puts the saved parameters into the new model by name."""
    from iefcli.train.recipe import load_recipe_file
    from iefcli.train.task import build_task

    src = tmp_path / "src"
    assert _train([str(_recipe(tmp_path, train__steps=4)), "--out", str(src), "-q"]).exit_code == 0
    p = _recipe(tmp_path, model={"kind": "mlp", "sizes": [16], "init_from": str(src)})
    task = build_task(load_recipe_file(p), "cpu")
    saved = rundir.load_checkpoint_params(src)
    assert all(torch.equal(task.params()[k], saved[k]) for k in saved)
    bad = _recipe(tmp_path, model={"kind": "mlp", "sizes": [8], "init_from": str(src)})
    with pytest.raises(UsageError, match="model.init_from: .* has shape"):
        build_task(load_recipe_file(bad), "cpu")


FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("name", [n for n, _, _ in builtin_recipes()])
def test_every_builtin_recipe_runs(tmp_path, name):
    """Each shipped recipe trains for a couple of steps (sizes cut down with --set)."""
    from iefcli.train.recipe import load_recipe_file

    r = load_recipe_file(name)
    if r["data"]["kind"] == "fashion_mnist" and r["data"].get("path") is None and not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    if r["data"]["kind"] not in ("digits", "fashion_mnist", "toy_lsq") or r["model"]["kind"] not in ("mlp", "linear"):
        pytest.skip(f"{name}: {r['model']['kind']} model / {r['data']['kind']} data run in tests/test_hf_recipes.py")
    sets = ["train.steps=2", "train.eval_every=1", "train.checkpoint_every=1", "device=cpu",
            "schedule.warmup_steps=0"]
    if r["data"]["kind"] == "fashion_mnist":
        sets += ["data.n_train=256", "data.n_val=64", "data.n_test=64", "train.eval_batch_size=64"]
    out = tmp_path / name
    res = _train([name, "--out", str(out), "-q", "--json", *sum((["--set", s] for s in sets), [])])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["status"] == "completed" and s["total_steps"] == 2 and s["recipe"] == name


def test_unused_trainable_parameter_is_named_before_training(tmp_path, monkeypatch):
    """A trainable parameter the forward never uses would get zero per-sample gradients from
    torch.func without a word: a curvature run refuses it up front, naming it (exit 2)."""
    from torch import nn

    from iefcli.train import models

    real = models.build_mlp

    def with_unused(section, ctx):
        net = real(section, ctx)
        net.register_parameter("orphan", nn.Parameter(torch.zeros(3)))
        return net

    monkeypatch.setattr(models, "build_mlp", with_unused)
    res = _train([str(_recipe(tmp_path)), "--out", str(tmp_path / "run"), "-q"])
    assert res.exit_code == 2
    assert "orphan" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # first-order optimisers need no per-sample gradients: the same model trains
    res = _train([str(_recipe(tmp_path, optimizer={"name": "sgd", "lr": 0.1})), "--out", str(tmp_path / "sgd"), "-q"])
    assert res.exit_code == 0, res.output

"""TensorBoard event files beside metrics.jsonl, written by the real training loop; the same numbers."""

from __future__ import annotations

import time

import pytest

from iefcli.errors import UsageError
from iefcli.train import rundir, tblog
from iefcli.train.recipe import recipe_from_dict

RECIPE = {"name": "tb", "device": "cpu", "model": {"kind": "mlp", "sizes": [4]}, "optimizer": {"name": "ief"},
          "train": {"steps": 6, "batch_size": 64, "eval_every": 3, "log_every": 2, "checkpoint_every": 3}}


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / tblog.TB_DIR))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _train(tmp_path, mode="auto"):
    """A real run with output.tensorboard = mode."""
    from iefcli.train.launch import prepare_run_dir
    from iefcli.train.loop import train

    run = tmp_path / "run"
    prepare_run_dir(run, False)
    train(recipe=recipe_from_dict({**RECIPE, "output": {"tensorboard": mode}}), run_dir=run)
    return run


def test_event_file_matches_metrics_jsonl(tmp_path, monkeypatch):
    if not tblog.tensorboard_available():
        pytest.skip("optional package tensorboard not installed (pip install tensorboard)")
    run = _train(tmp_path)
    assert list((run / tblog.TB_DIR).glob("events.out.tfevents.*"))
    sc = _scalars(run)
    records = rundir.read_metrics(run)
    want_train = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
    want_val = [(r["step"], r["accuracy"]) for r in records if r["split"] == "val"]
    assert [s for s, _ in sc["train/loss"]] == [s for s, _ in want_train] == [2, 4, 6]
    assert all(v == pytest.approx(w, rel=1e-6) for (_, v), (_, w) in zip(sc["train/loss"], want_train))
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in sc["val/accuracy"]] == want_val
    assert "test/accuracy" in sc and "train/lr" in sc
    assert not any(t.endswith(("/step", "/epoch", "/time")) for t in sc)


def test_off_writes_no_event_file_and_on_needs_the_package(tmp_path, monkeypatch):
    run = _train(tmp_path, mode="off")
    assert not (run / tblog.TB_DIR).exists() and rundir.read_metrics(run)
    monkeypatch.setattr(tblog, "tensorboard_available", lambda: False)
    with pytest.raises(UsageError, match=r"output.tensorboard: on needs the tensorboard package: pip install"):
        tblog.open_metrics_writer(tmp_path / "x", mode="on")
    (tmp_path / "y").mkdir()
    w = tblog.open_metrics_writer(tmp_path / "y", mode="auto")  # absent + auto: metrics only, no error
    assert isinstance(w, rundir.MetricsWriter)
    w.close()


def test_resume_purges_steps_after_the_checkpoint(tmp_path):
    if not tblog.tensorboard_available():
        pytest.skip("optional package tensorboard not installed (pip install tensorboard)")
    run = tmp_path / "run"
    run.mkdir()
    w = tblog.open_metrics_writer(run)
    for s in (1, 2, 3, 4):
        w.write({"step": s, "split": "train", "loss": float(s)})
    w.close()
    # Event files are read in name order and the name holds the second it was made, then a
    # per-process counter compared as text (".9" after ".10"): a resume is a new second.
    time.sleep(max(0.0, 1.05 - (time.time() % 1.0)))
    w = tblog.open_metrics_writer(run, truncate_after_step=2)
    for s in (3, 4):
        w.write({"step": s, "split": "train", "loss": 10.0 * s})
    w.close()
    assert _scalars(run)["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert [r["loss"] for r in rundir.read_metrics(run)] == [1.0, 2.0, 30.0, 40.0]

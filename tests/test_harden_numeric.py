"""Numerical faults (issue 17): NaN/Inf in the data, in a loss, in a Gram; duplicate and
all-converged batches; zero-norm per-sample gradients. The Gram solve never raises, and the
optimiser never writes a non-finite parameter: a step either gives finite parameters or
reports a non-finite loss / update norm, which the training loop rejects (bad_step) while
keeping the old parameters; no checkpoint ever holds a non-finite value."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from iefcli import directions
from iefcli.core.solve import solve_gram
from iefcli.optim import config_from_recipe, make_optimizer
from iefcli.train import rundir
from iefcli.train.launch import prepare_run_dir
from iefcli.train.loop import plan_run, train
from iefcli.train.recipe import recipe_from_dict
from iefcli.train.task import Batch, build_task

METHODS = ("sgd", "ef", "ief", "sf", "ngd", "adamw")


def _finite(params) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in params.values())


# ----------------------------------------------------------------------------- the Gram solve


@pytest.mark.parametrize("m", [3, 5, 8, 16])
@pytest.mark.parametrize("where", ["nan-row", "inf-entry", "nan-rhs", "inf-diag"])
@pytest.mark.parametrize("branch_free", [False, True])
def test_non_finite_gram_never_raises_and_gives_a_nan_solution(m, where, branch_free):
    g = torch.Generator().manual_seed(m)
    r = torch.randn(m, 2 * m, dtype=torch.float64, generator=g)
    c, b = r @ r.T, torch.randn(m, dtype=torch.float64, generator=g)
    if where == "nan-row":
        c[1, :] = float("nan")
        c[:, 1] = float("nan")
    elif where == "inf-entry":
        c[0, 2] = c[2, 0] = float("inf")
    elif where == "nan-rhs":
        b[m - 1] = float("nan")
    else:
        c[0, 0] = float("inf")
    x, info = solve_gram(c, b, 1e-3, branch_free=branch_free)
    assert x.shape == (m,) and bool(torch.isnan(x).all())
    info.as_floats()  # diagnostics readable, no exception


def test_finite_gram_solve_is_unchanged_by_the_guard():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(6, 4, dtype=torch.float64, generator=g)  # rank 4 < 6: the eigen fallback at lam 0
    b = torch.randn(6, dtype=torch.float64, generator=g)
    for lam in (0.0, 1e-3):
        x, _ = solve_gram(r @ r.T, b, lam, dup_threshold=None)
        ref = torch.linalg.pinv(r @ r.T + lam * torch.eye(6, dtype=torch.float64)) @ b
        assert torch.allclose(x, ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n", [3, 7, 16])
def test_nan_per_sample_gradients_do_not_crash_ef_ief_sf(n):
    from iefcli.core.jacobian import DenseRows

    g = torch.Generator().manual_seed(n)
    rows = torch.randn(n, 5, dtype=torch.float64, generator=g)
    rows[n // 2] = float("nan")
    j = DenseRows(rows)
    s = torch.rand(n, dtype=torch.float64, generator=g)
    for d in (directions.ef(j, 1e-4), directions.ief(j, s, 1e-4), directions.sf(j, rows.nan_to_num().mean(0), 1e-4)):
        assert d.shape == (5,) and not bool(torch.isfinite(d).all())


# ----------------------------------------------------------------------------- one optimiser step


def _task(loss="cross_entropy"):
    data = {"kind": "toy_lsq"} if loss == "mse" else {"kind": "digits"}
    model = {"kind": "linear"} if loss == "mse" else {"kind": "mlp", "sizes": [6]}
    r = recipe_from_dict({"seed": 0, "model": model, "data": data, "optimizer": {"name": "sgd", "lr": 0.1}})
    return r, build_task(r)


def _batch(task, kind: str) -> Batch:
    b = next(iter(task.batches("train", 8)))
    x, y = b.inputs.clone(), b.targets.clone()
    if kind == "nan-input":
        x[2] = float("nan")
    elif kind == "inf-input":
        x[0, 0] = float("inf")
    elif kind == "huge-input":  # finite data, overflowing logits: an Inf/NaN loss
        x[1] = 3e38
    elif kind == "duplicates":
        x[:] = x[0]
        y[:] = y[0]
    elif kind == "single-repeated-pair":
        x[1::2] = x[0]
        y[1::2] = y[0]
    elif kind == "zero-input":  # a zero row: its per-sample gradient has only bias parts
        x[:] = 0
    return Batch(x, y)


def _converged(task, params):
    """A batch the model already fits perfectly: per-sample CE gradients exactly zero in float32."""
    b = next(iter(task.batches("train", 8)))
    with torch.no_grad():
        big = {k: v * 0 for k, v in params.items()}
    last_b = [k for k in big if k.endswith("bias")][-1]
    big[last_b] = torch.zeros_like(big[last_b])
    big[last_b][3] = 1e4  # every sample predicts class 3 with probability exactly 1.0
    return big, Batch(b.inputs, torch.full_like(b.targets, 3))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["nan-input", "inf-input", "huge-input", "duplicates", "single-repeated-pair",
                                  "zero-input", "converged"])
def test_one_step_never_gives_non_finite_params_unless_it_says_so(method, kind):
    r, task = _task()
    sec = {**r["optimizer"], "name": method, "lr": 0.1, "damping": 1e-3 if method != "sgd" else None}
    cfg = config_from_recipe(sec)
    opt = make_optimizer(cfg, model=task.model, loss_fn=task.loss_fn, forward=task.forward)
    params = task.params()
    if kind == "converged":
        params, batch = _converged(task, params)
    else:
        batch = _batch(task, kind)
    new, _, m = opt.update(params, opt.init(params), batch, key=0, lr=0.1)
    loss, norm = float(m["loss"]), float(m["update_norm"])
    reported_ok = torch.isfinite(torch.tensor([loss, norm])).all()
    # The contract the loop relies on: a step it would keep (finite loss and update norm) has finite params.
    assert _finite(new) or not reported_ok, (kind, loss, norm)
    if kind in ("nan-input", "inf-input"):
        assert not reported_ok, (loss, norm)  # NaN in the data: a NaN loss, rejected by the loop
    elif kind != "huge-input":
        assert _finite(new) and reported_ok, kind
        if kind == "converged" and method != "adamw":
            assert norm == 0.0  # zero per-sample gradients: no update (all rows dropped, no 0/0)


# ----------------------------------------------------------------------------- through the loop


@pytest.mark.parametrize("method", ["ief", "ef", "sf", "sgd"])
def test_training_on_poisoned_batches_never_checkpoints_a_non_finite_value(tmp_path, method):
    """Every other training sample is NaN / Inf / huge: most batches are rejected as bad
    steps; the parameters that survive and every checkpoint and best/ stay finite."""
    r = recipe_from_dict({"seed": 0, "model": {"kind": "mlp", "sizes": [6]}, "data": {"kind": "digits"},
                          "optimizer": {"name": method, "lr": 0.05},
                          "train": {"steps": 8, "batch_size": 4, "eval_every": 2, "checkpoint_every": 1,
                                    "max_bad_steps": 100}})
    task = build_task(r)
    x = task.splits["train"].inputs
    n = x.shape[0]
    x[torch.arange(0, n, 9)] = float("nan")
    x[torch.arange(3, n, 9), 0] = float("inf")
    x[torch.arange(5, n, 9)] = 3e38
    run = tmp_path / "run"
    prepare_run_dir(run, False)
    train(recipe=r, run_dir=run, plan=plan_run(r, task))
    recs = rundir.read_metrics(run)
    assert any(rec.get("event") == "bad_step" for rec in recs)
    for _, ck in rundir.list_checkpoints(run):
        assert _finite(rundir.load_checkpoint_params(ck))
        from safetensors.torch import load_file

        assert all(bool(torch.isfinite(v).all()) for v in load_file(str(ck / rundir.OPTIMIZER_FILE)).values()
                   if v.is_floating_point())
    assert _finite(rundir.load_checkpoint_params(run / rundir.BEST_DIR))
    meta = json.loads((run / rundir.BEST_DIR / rundir.META_FILE).read_text())
    assert meta["metrics"]["val"]["loss"] is not None


def test_a_second_ctrl_c_while_saving_neither_raises_nor_skips_the_summary(tmp_path, monkeypatch):
    """Ctrl-C at step 2, then another Ctrl-C (a real SIGINT) while the interrupted run writes
    its checkpoint: the run still ends with Interrupted, a checkpoint and summary.json."""
    import os
    import signal

    from iefcli.errors import Interrupted

    r = recipe_from_dict({"seed": 0, "model": {"kind": "mlp", "sizes": [6]}, "data": {"kind": "digits"},
                          "optimizer": {"name": "sgd", "lr": 0.05},
                          "train": {"steps": 6, "batch_size": 8, "eval_every": 10, "checkpoint_every": 10}})
    run = tmp_path / "run"
    prepare_run_dir(run, False)
    real_write = rundir.write_checkpoint
    sent = []

    def write_with_second_ctrl_c(path, **kw):
        if sent:  # the first Ctrl-C has happened: press it again during the save
            os.kill(os.getpid(), signal.SIGINT)
        return real_write(path, **kw)

    monkeypatch.setattr(rundir, "write_checkpoint", write_with_second_ctrl_c)

    def on_event(kind, payload):
        if kind == "step" and payload["step"] == 2 and not sent:
            sent.append(1)
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        train(recipe=r, run_dir=run, on_event=on_event)
    assert json.loads((run / rundir.SUMMARY_FILE).read_text())["status"] == "interrupted"
    assert [s for s, _ in rundir.list_checkpoints(run)] == [0, 2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("method", ["sgd", "ef", "ief", "sf", "ngd"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_is_reported_not_applied(method, bad):
    """MSE on the 2x2 toy with one target NaN / Inf: a non-finite loss, so the loop rejects it."""
    r, task = _task("mse")
    sec = {**r["optimizer"], "name": method, "lr": 0.1, "damping": 1e-3 if method != "sgd" else None}
    cfg = config_from_recipe(sec)
    opt = make_optimizer(cfg, model=task.model, loss_fn=task.loss_fn, forward=task.forward)
    params = task.params()
    b = next(iter(task.batches("train", 2)))
    y = b.targets.clone()
    y[0] = bad
    new, _, m = opt.update(params, opt.init(params), Batch(b.inputs, y), key=0, lr=0.1)
    assert not bool(torch.isfinite(torch.stack([m["loss"].double(), m["update_norm"].double()])).all())

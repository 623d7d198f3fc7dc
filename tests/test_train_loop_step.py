"""The training loop's step: diagnostics (grad norm, cosine, imbalance, target probability) only on
steps that write a log line, with new params and state bitwise the same as with them; the run does not
depend on log_every."""

from __future__ import annotations

import pytest
import torch
import yaml

import iefcli.train.loop as loop
from iefcli.core.losses import CrossEntropy
from iefcli.optim import make_optimizer
from iefcli.optim.base import update_step
from iefcli.train import rundir
from iefcli.train.launch import train_recipe
from test_optim import _cfg, _problem

CONFIGS = {
    "sgd": dict(name="sgd", lr=0.1, momentum=0.9),
    "adamw": dict(name="adamw", lr=0.01, weight_decay=0.1),
    "adafactor": dict(name="adafactor", lr=0.01),
    "sgd-clip": dict(name="sgd", lr=0.1, clip_update_norm=1e-3),
    "ef": dict(name="ef", lr=1e-3, damping=1e-3),
    "ief": dict(name="ief", lr=0.5, damping=1e-6),
    "ief-momentum": dict(name="ief", lr=0.5, damping=1e-6, momentum=0.5),
    "ief-clip": dict(name="ief", lr=0.5, damping=1e-6, clip_update_norm=1e-3),
    "sf": dict(name="sf", lr=1e-3, damping=1e-2),
    "ngd": dict(name="ngd", lr=1e-3, damping=1e-2),
}
GRAD_KEYS = {"grad_norm", "cos_update_grad"}


@pytest.mark.parametrize("case", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_without_diagnostics_the_step_is_bitwise_the_same(case, dtype):
    kw = dict(CONFIGS[case])
    name = kw.pop("name")
    model, params, batch = _problem(dtype)
    opt = make_optimizer(_cfg(name, **kw), model=model, loss_fn=CrossEntropy())
    p_on, s_on = params, opt.init(params)
    p_off, s_off = params, opt.init(params)
    for t in range(3):  # momentum / moments carried over
        p_on, s_on, m_on = update_step(opt, p_on, s_on, batch, key=t, lr=kw["lr"], diagnostics=True)
        p_off, s_off, m_off = update_step(opt, p_off, s_off, batch, key=t, lr=kw["lr"], diagnostics=False)
        assert all(torch.equal(p_on[k], p_off[k]) for k in params), (case, t)
        assert set(s_on) == set(s_off)
        flat_on = [v for d in s_on.values() for v in (d.values() if isinstance(d, dict) else [d])]
        flat_off = [v for d in s_off.values() for v in (d.values() if isinstance(d, dict) else [d])]
        assert all(torch.equal(a, b) for a, b in zip(flat_on, flat_off))
        assert torch.equal(m_on["loss"], m_off["loss"]) and torch.equal(m_on["update_norm"], m_off["update_norm"])
        assert GRAD_KEYS <= set(m_on) and not GRAD_KEYS & set(m_off), (case, set(m_off))
        if name in ("ef", "ief", "sf", "ngd"):
            assert "mean_target_prob" in m_on and "mean_target_prob" not in m_off


def test_an_update_without_the_keyword_gets_every_diagnostic():
    model, params, batch = _problem(torch.float64)
    opt = make_optimizer(_cfg("ief", lr=0.5, damping=1e-6), model=model, loss_fn=CrossEntropy())
    inner = opt.update
    opt.update = lambda p, s, b, *, key, lr: inner(p, s, b, key=key, lr=lr)  # a wrapper (tests, K-FAC)
    _, _, m = update_step(opt, params, opt.init(params), batch, key=0, lr=0.5, diagnostics=False)
    assert GRAD_KEYS <= set(m)


TINY = {
    "name": "tiny", "seed": 1, "device": "cpu",
    "model": {"kind": "mlp", "sizes": [16]}, "data": {"kind": "digits"},
    "train": {"steps": 12, "batch_size": 32, "eval_every": 6, "checkpoint_every": 12},
}


def _run(tmp_path, tag, optimizer, log_every):
    r = dict(TINY, optimizer=optimizer, train=dict(TINY["train"], log_every=log_every))
    p = tmp_path / f"{tag}.yaml"
    p.write_text(yaml.safe_dump(r))
    out = tmp_path / tag
    train_recipe(p, out=out)
    return rundir.load_checkpoint_params(rundir.checkpoint_dir(out, 12)), list(rundir.read_metrics(out))


@pytest.mark.parametrize("optimizer", [{"name": "sgd", "lr": 0.5}, {"name": "ief", "lr": 50.0, "damping": 1e-7},
                                       {"name": "ief", "lr": 20.0, "damping": 1e-7, "momentum": 0.5}],
                         ids=["sgd", "ief", "ief-momentum"])
def test_log_every_does_not_change_the_run_and_log_lines_keep_their_diagnostics(tmp_path, monkeypatch, optimizer):
    flags = []
    real = loop.update_step

    def spy(*a, diagnostics, **kw):
        flags.append(diagnostics)
        return real(*a, diagnostics=diagnostics, **kw)

    monkeypatch.setattr(loop, "update_step", spy)
    a, lines_a = _run(tmp_path, "a", optimizer, 1)
    assert flags == [True] * 12
    flags.clear()
    b, lines_b = _run(tmp_path, "b", optimizer, 5)
    assert flags == [(t + 1) % 5 == 0 or t + 1 == 12 for t in range(12)]
    assert all(torch.equal(a[k], b[k]) for k in a)
    train_b = [r for r in lines_b if r["split"] == "train"]
    assert [r["step"] for r in train_b] == [5, 10, 12]
    by_step = {r["step"]: r for r in lines_a if r["split"] == "train"}
    for r in train_b:
        assert GRAD_KEYS <= set(r) and math_equal(r, by_step[r["step"]]), r
        if optimizer["name"] == "ief":
            assert "mean_target_prob" in r and "solve_residual" in r


def math_equal(a: dict, b: dict) -> bool:
    """The same numbers on the same step's line (times aside)."""
    skip = {"time", "step_time_s"}
    return {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}

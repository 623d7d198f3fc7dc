"""The lean training-step tail: torch.optim baselines built once and stepped in place behind the pure
contract (interleaved trajectories, untouched inputs, exact resume through safetensors), and the
ef/ief diagnostics from the Gram matrix (no second J^T w) equal to the ones from g."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from iefcli.core.losses import CrossEntropy
from iefcli.optim import make_optimizer
from test_optim import _cfg, _flat, _loop_grads, _problem

KW = {"sgd": dict(momentum=0.9, nesterov=True, weight_decay=1e-2), "adamw": dict(weight_decay=0.1),
      "adafactor": {}}


def _run(opt, p, s, batch, lrs, start=0):
    for t, lr in enumerate(lrs, start):
        p, s, _ = opt.update(p, s, batch, key=t, lr=lr)
    return p, s


@pytest.mark.parametrize("name", sorted(KW))
def test_one_instance_interleaved_trajectories_and_untouched_inputs(name):
    model, params, batch = _problem(torch.float64)
    _, params_b, batch_b = _problem(torch.float64, seed=1)
    cfg = _cfg(name, lr=0.05, **KW[name])
    shared = make_optimizer(cfg, model=model, loss_fn=CrossEntropy())
    a = (params, shared.init(params))
    b = (params_b, shared.init(params_b))
    history = []
    for t in range(3):  # A and B alternate on ONE optimiser object
        history.append({k: v.clone() for k, v in a[0].items()})
        a = shared.update(*a, batch, key=t, lr=0.05)[:2]
        b = shared.update(*b, batch_b, key=t, lr=0.04)[:2]
    for name_, want in (("a", _run(make_optimizer(cfg, model=model, loss_fn=CrossEntropy()), params,
                                   shared.init(params), batch, [0.05] * 3)),
                        ("b", _run(make_optimizer(cfg, model=model, loss_fn=CrossEntropy()), params_b,
                                   shared.init(params_b), batch_b, [0.04] * 3))):
        got = a if name_ == "a" else b
        assert torch.equal(_flat(got[0]), _flat(want[0])), name_
        for k in got[1]:
            for key in got[1][k]:
                assert torch.equal(got[1][k][key], want[1][k][key]), (name_, k, key)
    assert torch.equal(_flat(params), _flat(history[0]))  # the first input params were never written


@pytest.mark.parametrize("name", sorted(KW))
def test_resume_through_safetensors_is_exact(name, tmp_path):
    model, params, batch = _problem(torch.float64)
    cfg = _cfg(name, lr=0.05, **KW[name])
    straight = _run(make_optimizer(cfg, model=model, loss_fn=CrossEntropy()), params,
                    make_optimizer(cfg, model=model, loss_fn=CrossEntropy()).init(params), batch, [0.05] * 4)
    opt = make_optimizer(cfg, model=model, loss_fn=CrossEntropy())
    p, s = _run(opt, params, opt.init(params), batch, [0.05] * 2)
    save_file({f"{n}/{k}": v.contiguous() for n, d in s.items() for k, v in d.items()}, tmp_path / "s.safetensors")
    save_file({n: v.contiguous() for n, v in p.items()}, tmp_path / "p.safetensors")
    flat = load_file(tmp_path / "s.safetensors")
    s2 = {n: {} for n in p}
    for key, v in flat.items():
        n, _, k = key.rpartition("/")
        s2[n][k] = v
    fresh = make_optimizer(cfg, model=model, loss_fn=CrossEntropy())  # a new process: a new instance
    resumed = _run(fresh, load_file(tmp_path / "p.safetensors"), s2, batch, [0.05] * 2, start=2)
    assert set(resumed[0]) == set(straight[0])
    assert all(torch.equal(resumed[0][k], straight[0][k]) for k in straight[0])


@pytest.mark.parametrize("name", ["ef", "ief"])
@pytest.mark.parametrize("jacobian", ["fast", "vmap"])
def test_gram_diagnostics_equal_gradient_ones(name, jacobian):
    model, params, batch = _problem(torch.float64, n=6)
    opt = make_optimizer(_cfg(name, lr=0.3, damping=1e-3, jacobian=jacobian), model=model, loss_fn=CrossEntropy())
    new, _, m = opt.update(params, opt.init(params), batch, key=0, lr=0.3)
    g = _loop_grads(model, params, batch.inputs, batch.targets).mean(0)
    step = _flat(params) - _flat(new)
    assert abs(float(m["grad_norm"]) - float(g.norm())) < 1e-12 * float(g.norm())
    cos = float(step @ g / (step.norm() * g.norm()))
    assert abs(float(m["cos_update_grad"]) - cos) < 1e-10
    assert abs(float(m["update_norm"]) - float(step.norm())) < 1e-12


def test_lean_curvature_step_reports_an_overflowing_update_as_non_finite():
    """The lean tail computes update_norm from ||d||: new params that overflow float32 must still make it
    non-finite (the loop skips such a step), as the norm of theta - new did."""
    model, params, batch = _problem(torch.float32, n=6)
    opt = make_optimizer(_cfg("ef", lr=1.0, damping=1e-3), model=model, loss_fn=CrossEntropy())
    new, _, m = opt.update(params, opt.init(params), batch, key=0, lr=3.3e38)  # max |d| ~ 3: overflows
    assert not all(torch.isfinite(v).all() for v in new.values())
    assert not torch.isfinite(m["update_norm"])
    _, _, m = opt.update(params, opt.init(params), batch, key=0, lr=1e-3)
    assert torch.isfinite(m["update_norm"])

"""The optimiser registry: one contract for all, and each step checked in float64
against slow references (loops of torch.autograd.grad, dense matrices, stateful torch.optim)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import reference
from iefcli.core.losses import CrossEntropy
from iefcli.optim import DEFAULTS, REGISTRY, OptimConfig, make_optimizer
from iefcli.train.schedule import lr_at


def _problem(dtype=torch.float64, n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
    x = torch.randn(n, 5, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=gen)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return model, params, SimpleNamespace(inputs=x, targets=y)


def _cfg(name: str, **kw) -> OptimConfig:
    base = dict(name=name, lr=DEFAULTS[name]["lr"], damping=DEFAULTS[name]["damping"],
                weight_decay=0.0, cg_maxiter=200)
    base.update(kw)
    return OptimConfig(**base)


# Learning rates for the 12-sample problem (paper scale: ef/sf/ngd directions are N^2 = 144 times
# the mean-loss-scale ones, so their lr is that much smaller).
SMALL_LR = {"sgd": 0.5, "adamw": 0.02, "adafactor": 0.05, "ef": 0.5 / 144, "sf": 0.5 / 144, "ief": 2.0,
            "ngd": 1.0 / 144, "kfac": 0.01, "ekfac": 0.01, "iekfac": 1.0}


def _mean_loss(model, params, batch):
    z = torch.func.functional_call(model, params, (batch.inputs,))
    return CrossEntropy().per_sample(z, batch.targets).mean()


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_contract(name, dtype):
    """Finite output, same names/shapes/dtypes, inputs untouched, deterministic per key, loss decreases."""
    model, params, batch = _problem(dtype)
    opt = make_optimizer(_cfg(name, lr=SMALL_LR[name]), model=model, loss_fn=CrossEntropy())
    state = opt.init(params)
    before = {k: v.clone() for k, v in params.items()}
    p1, s1, m1 = opt.update(params, state, batch, key=3, lr=SMALL_LR[name])
    assert all(torch.equal(params[k], before[k]) for k in params), "update modified its input params"
    assert list(p1) == list(params)
    for k in params:
        assert p1[k].shape == params[k].shape and p1[k].dtype == params[k].dtype
        assert torch.isfinite(p1[k]).all()
    assert not all(torch.equal(p1[k], params[k]) for k in params)
    for k in ("loss", "grad_norm", "update_norm", "cos_update_grad"):
        assert torch.isfinite(torch.as_tensor(m1[k], dtype=torch.float64)), k
    assert torch.allclose(m1["loss"].to(torch.float64), _mean_loss(model, params, batch).to(torch.float64))
    # Same key, same inputs -> same step (also for SF's sampling).
    p1b, _, _ = opt.update(params, opt.init(params), batch, key=3, lr=SMALL_LR[name])
    assert all(torch.equal(p1[k], p1b[k]) for k in params)
    # Minimises: 25 steps on the fixed batch lower the loss.
    p, s = params, state
    for t in range(25):
        p, s, _ = opt.update(p, s, batch, key=t, lr=SMALL_LR[name])
    assert float(_mean_loss(model, p, batch)) < 0.7 * float(_mean_loss(model, params, batch))


def _flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def _loop_grads(model, params, x, y):
    """Per-sample gradients by a loop of torch.autograd.grad: (N, P)."""
    rows = []
    for n in range(x.shape[0]):
        live = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        z = torch.func.functional_call(model, live, (x[n : n + 1],))
        loss = torch.nn.functional.cross_entropy(z, y[n : n + 1], reduction="sum")
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(live.values()))]))
    return torch.stack(rows)


def _dense_ggn(model, params, x, y):
    """G = sum_n Jz_n^T H_n Jz_n from dense per-sample logit Jacobians (autograd.functional)."""
    names = list(params)
    flat = _flat(params)
    sizes = [params[k].numel() for k in names]

    def f(vec, xn):
        ps = {k: c.view(params[k].shape) for k, c in zip(names, torch.split(vec, sizes))}
        return torch.func.functional_call(model, ps, (xn,)).squeeze(0)

    G = torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype)
    for n in range(x.shape[0]):
        Jz = torch.autograd.functional.jacobian(lambda v: f(v, x[n : n + 1]), flat)  # (C, P)
        p = torch.softmax(f(flat, x[n : n + 1]), -1)
        H = torch.diag(p) - torch.outer(p, p)
        G += Jz.T @ H @ Jz
    return G


@pytest.mark.parametrize("name", ["ef", "ief", "sf", "ngd"])
def test_curvature_step_matches_reference(name):
    """The optimiser's direction == the authors' formula (paper-scale damping; rows of the MEAN loss
    J_a = J / N, s_a = s / N^2, dense float64 solves), and theta_new = theta - lr * d."""
    model, params, batch = _problem(torch.float64, n=6)
    lam = {"ef": 1e-3, "ief": 1e-9, "sf": 0.1, "ngd": 1e-2}[name]
    # sf with the default filter on: its duplicate sampled rows must still be kept.
    cfg = _cfg(name, lr=0.3, damping=lam, dup_threshold=0.99 if name == "sf" else None, cg_tol=1e-12, cg_maxiter=500, mc_samples=2)
    opt = make_optimizer(cfg, model=model, loss_fn=CrossEntropy())
    _, d_opt, _ = opt.direction(params, batch, 11)
    new, _, m = opt.update(params, opt.init(params), batch, key=11, lr=0.3)
    J = _loop_grads(model, params, batch.inputs, batch.targets)
    n = J.shape[0]
    Ja = J / n
    g = Ja.sum(0)
    eye_n = torch.eye(n, dtype=torch.float64)
    z = torch.func.functional_call(model, params, (batch.inputs,))
    if name == "ef":
        d = Ja.T @ torch.linalg.solve(Ja @ Ja.T + lam * eye_n, torch.ones(n, dtype=torch.float64))
    elif name == "ief":
        s_a = ((torch.softmax(z, -1) - nn.functional.one_hot(batch.targets, 3)) / n).pow(2).sum(-1)
        d = Ja.T @ torch.linalg.solve(Ja @ Ja.T + lam * eye_n, s_a)
    elif name == "sf":
        gen = torch.Generator().manual_seed(11)
        yhat = CrossEntropy().sample(z.detach(), batch.targets, 2, gen)  # (k, N)
        Jh_a = torch.cat([_loop_grads(model, params, batch.inputs, yhat[i]) for i in range(2)]) / (n * math.sqrt(2))
        d = torch.linalg.solve(Jh_a.T @ Jh_a + lam * torch.eye(g.shape[0], dtype=torch.float64), g)
    else:
        G = _dense_ggn(model, params, batch.inputs, batch.targets)
        d = torch.linalg.solve(G / n**2 + lam * torch.eye(G.shape[0], dtype=G.dtype), g)
    assert reference.rel_err(d_opt, d) < 1e-10, reference.rel_err(d_opt, d)
    # The step applies exactly that direction (up to one rounding of theta - lr * d).
    assert torch.allclose(_flat(new), _flat(params) - 0.3 * d_opt, rtol=0, atol=1e-15 * float(_flat(params).abs().max()) * 4)
    p_true = torch.softmax(z, -1)[torch.arange(n), batch.targets].mean()
    assert abs(float(m["mean_target_prob"]) - float(p_true)) < 1e-12
    cos = float(torch.dot(d, g) / (d.norm() * g.norm()))
    assert abs(float(m["cos_update_grad"]) - cos) < 1e-8


@pytest.mark.parametrize("name", ["sgd", "adamw", "adafactor"])
def test_torch_optims_match_stateful_torch_optim(name):
    """Three pure steps (state carried through our dicts) == three steps of an ordinary torch.optim loop."""
    model, params, batch = _problem(torch.float64)
    kw = {"sgd": dict(momentum=0.9, nesterov=True, weight_decay=1e-2), "adamw": dict(weight_decay=0.1),
          "adafactor": dict(weight_decay=0.0)}[name]
    cfg = _cfg(name, lr=0.05, **kw)
    opt = make_optimizer(cfg, model=model, loss_fn=CrossEntropy())
    p, s = params, opt.init(params)
    lrs = [0.05, 0.04, 0.03]
    for t, lr in enumerate(lrs):
        p, s, _ = opt.update(p, s, batch, key=t, lr=lr)

    ref_model, _, _ = _problem(torch.float64)
    ctor = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
            "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
            "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=0.05)}[name]
    o = ctor(list(ref_model.parameters()))
    for lr in lrs:
        for grp in o.param_groups:
            grp["lr"] = lr
        o.zero_grad()
        nn.functional.cross_entropy(ref_model(batch.inputs), batch.targets).backward()
        o.step()
    for k, v in ref_model.named_parameters():
        assert torch.allclose(p[k], v.detach(), rtol=1e-10, atol=1e-12), k


def test_momentum_weight_decay_and_clipping():
    model, params, batch = _problem(torch.float64)
    base = _cfg("ief", lr=1.0, damping=1e-8)
    plain = make_optimizer(base, model=model, loss_fn=CrossEntropy())
    d0 = (_flat(params) - _flat(plain.update(params, {}, batch, key=0, lr=1.0)[0]))  # lr*d at theta0

    mom = make_optimizer(_cfg("ief", lr=1.0, damping=1e-8, momentum=0.5), model=model, loss_fn=CrossEntropy())
    s = mom.init(params)
    p1, s, _ = mom.update(params, s, batch, key=0, lr=1.0)
    assert torch.allclose(_flat(params) - _flat(p1), d0)
    d1 = _flat(p1) - _flat(plain.update(p1, {}, batch, key=1, lr=1.0)[0])
    p2, s, _ = mom.update(p1, s, batch, key=1, lr=1.0)
    assert torch.allclose(_flat(p1) - _flat(p2), 0.5 * d0 + d1)

    wd = make_optimizer(_cfg("ief", lr=1.0, damping=1e-8, weight_decay=0.1), model=model, loss_fn=CrossEntropy())
    pw, _, _ = wd.update(params, {}, batch, key=0, lr=1.0)
    assert torch.allclose(_flat(params) - _flat(pw), d0 + 0.1 * _flat(params))

    clip = make_optimizer(_cfg("ief", lr=1.0, damping=1e-8, clip_update_norm=1e-3), model=model, loss_fn=CrossEntropy())
    pc, _, mc = clip.update(params, {}, batch, key=0, lr=1.0)
    step = _flat(params) - _flat(pc)
    assert abs(float(step.norm()) - 1e-3) < 1e-12
    assert torch.allclose(step / step.norm(), d0 / d0.norm())
    assert bool(mc["update_clipped"])


def test_schedules():
    assert lr_at(5, 10, 2.0) == 2.0
    assert lr_at(0, 10, 2.0, "constant", warmup_steps=4) == pytest.approx(0.5)
    assert lr_at(3, 10, 2.0, "constant", warmup_steps=4) == pytest.approx(2.0)
    # linear: from lr at the first post-warm-up step to min_lr_ratio*lr at the last step (total-1)
    assert lr_at(0, 11, 1.0, "linear") == pytest.approx(1.0)
    assert lr_at(10, 11, 1.0, "linear", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(5, 11, 1.0, "linear") == pytest.approx(0.5)
    assert lr_at(5, 11, 1.0, "cosine") == pytest.approx(0.5)
    assert lr_at(10, 11, 1.0, "cosine", min_lr_ratio=0.2) == pytest.approx(0.2)
    assert lr_at(2, 12, 1.0, "cosine", warmup_steps=2) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        lr_at(0, 10, 1.0, "exp")

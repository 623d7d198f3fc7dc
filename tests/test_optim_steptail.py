"""The training step's tail: the torch.optim baselines' diagnostics (grad_norm, update_norm,
cos_update_grad) against float64 references, a float32 overflow that is not an infinite step, and the
host reads of one optimiser update counted on CPU (every one of them is a CPU-only branch)."""

from __future__ import annotations

import collections
import sys

import pytest
import torch
from torch import nn

from iefcli.core.losses import CrossEntropy
from iefcli.optim import make_optimizer
from test_optim import _cfg, _flat, _loop_grads, _problem

KW = {"sgd": dict(momentum=0.9, nesterov=True, weight_decay=1e-2), "adamw": dict(weight_decay=0.1),
      "adafactor": {}}


@pytest.mark.parametrize("name", sorted(KW))
def test_torch_optim_metrics_equal_float64_references(name):
    model, params, batch = _problem(torch.float64)
    opt = make_optimizer(_cfg(name, lr=0.05, **KW[name]), model=model, loss_fn=CrossEntropy())
    p, s = params, opt.init(params)
    for t in range(2):  # the second step has state (momentum, moments)
        new, s, m = opt.update(p, s, batch, key=t, lr=0.05)
        g = _loop_grads(model, p, batch.inputs, batch.targets).mean(0)
        step = _flat(p) - _flat(new)
        assert abs(float(m["grad_norm"]) - float(g.norm())) <= 1e-12 * float(g.norm())
        assert abs(float(m["update_norm"]) - float(step.norm())) <= 1e-12 * float(step.norm())
        cos = float(step @ g / (step.norm() * g.norm()))
        assert abs(float(m["cos_update_grad"]) - cos) < 1e-10
        p = new


def test_float32_norm_overflow_is_not_an_infinite_step():
    """A step of ~1e20 per entry is finite in float32 but its squared norm is not: update_norm and
    cos_update_grad must come out finite (float64 over chunks); an overflowing step stays infinite."""
    model, params, batch = _problem(torch.float32)
    opt = make_optimizer(_cfg("sgd", lr=1.0), model=model, loss_fn=CrossEntropy())
    new, _, m = opt.update(params, opt.init(params), batch, key=0, lr=1e21)
    assert all(torch.isfinite(v).all() for v in new.values())
    step = _flat(params).double() - _flat(new).double()
    assert torch.isfinite(m["update_norm"]) and torch.isfinite(m["cos_update_grad"])
    assert abs(float(m["update_norm"]) / float(step.norm()) - 1) < 1e-6
    assert 0.99 < float(m["cos_update_grad"]) <= 1 + 1e-6  # plain SGD: the step is lr * g
    lin = nn.Linear(5, 3)  # no tanh to saturate: inputs of ~1e3 give gradients of ~1e2
    opt = make_optimizer(_cfg("sgd", lr=1.0), model=lin, loss_fn=CrossEntropy())
    params = {k: v.detach().clone() for k, v in lin.named_parameters()}
    loud = type(batch)(inputs=batch.inputs * 1e3, targets=batch.targets)
    new, _, m = opt.update(params, opt.init(params), loud, key=0, lr=3e38)  # beyond float32: infinite params
    assert not all(torch.isfinite(v).all() for v in new.values())
    assert not torch.isfinite(m["update_norm"])


def test_unused_parameter_gets_a_zero_gradient():
    """sgd/adamw on a model with a parameter the loss never reads: no error, that parameter unchanged
    (ordinary autograd materialises its gradient as zeros, as torch.func.grad did)."""
    model = nn.ModuleDict({"used": nn.Linear(4, 3), "unused": nn.Linear(4, 3)}).double()

    def forward(m, p, x):
        return nn.functional.linear(x, p["used.weight"], p["used.bias"])

    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    batch = type("B", (), {"inputs": x, "targets": y})()
    for name in ("sgd", "adamw"):
        opt = make_optimizer(_cfg(name, lr=0.1), model=model, loss_fn=CrossEntropy(), forward=forward)
        new, _, m = opt.update(params, opt.init(params), batch, key=0, lr=0.1)
        assert torch.equal(new["unused.weight"], params["unused.weight"])
        assert not torch.equal(new["used.weight"], params["used.weight"])


READS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__")
# The host reads one update may make on CPU, each in a branch that only runs on CPU (on an accelerator
# the same code takes a branch-free path): step_metrics' / _norm's float32 overflow test, the Gram
# solve's Cholesky-failure test. torch.optim's own CPU step reads (Adam's step count) are torch's.
CPU_ONLY = {("optim/base.py", "step_metrics"), ("optim/base.py", "_norm"), ("core/solve.py", "solve_gram")}
ALLOWED = {"sgd": 1, "adamw": 1, "adafactor": 1, "ef": 2, "ief": 2}


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_host_reads_of_one_update_are_the_cpu_only_ones(name, monkeypatch):
    model, params, batch = _problem(torch.float32)
    opt = make_optimizer(_cfg(name, lr=0.01, damping=1e-3), model=model, loss_fn=CrossEntropy())
    p, s, _ = opt.update(params, opt.init(params), batch, key=0, lr=0.01)  # lazy initialisation first
    seen: collections.Counter = collections.Counter()

    def counting(attr):
        original = getattr(torch.Tensor, attr)

        def read(self, *a, **k):
            f = sys._getframe(1)
            path = f.f_code.co_filename.replace("\\", "/")
            if "/iefcli/" in path:
                seen[(path.split("/iefcli/")[-1], f.f_code.co_name)] += 1
            return original(self, *a, **k)

        return read

    for attr in READS:
        monkeypatch.setattr(torch.Tensor, attr, counting(attr))
    opt.update(p, s, batch, key=1, lr=0.01)
    monkeypatch.undo()
    assert set(seen) <= CPU_ONLY, seen
    assert sum(seen.values()) <= ALLOWED[name], seen


def _forward_by_functional_call(model, params, inputs):
    from iefcli.core.jacobian import default_forward

    return default_forward(model, params, inputs)  # not `default_forward` itself: the functional path


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_module_call_gradient_equals_the_functional_one_and_leaves_the_module_alone(dtype):
    """With the default forward the module's own Parameters read the params for the call: the same loss
    and gradient, bit for bit, as functional_call, and afterwards the module holds its own tensors."""
    from iefcli.optim.base import ModelFn

    model, params, batch = _problem(dtype)
    params = {k: v + 0.25 for k, v in params.items()}  # not the module's values
    own = {k: (p, p.data_ptr(), p.detach().clone()) for k, p in model.named_parameters()}
    fast = ModelFn(model, CrossEntropy())
    loss, g = fast.mean_loss_and_grad(params, batch.inputs, batch.targets)
    assert fast._held(params) is not None  # the module-call path ran
    loss_f, g_f = ModelFn(model, CrossEntropy(), _forward_by_functional_call).mean_loss_and_grad(
        params, batch.inputs, batch.targets)
    assert torch.equal(loss, loss_f) and all(torch.equal(g[k], g_f[k]) for k in g)
    for k, p in model.named_parameters():
        assert p is own[k][0] and p.data_ptr() == own[k][1] and torch.equal(p.detach(), own[k][2])
    with pytest.raises(RuntimeError):  # a failing forward: the module gets its tensors back all the same
        fast.mean_loss_and_grad(params, batch.inputs[:, :3], batch.targets)
    assert all(p.data_ptr() == own[k][1] for k, p in model.named_parameters())


def test_module_call_path_falls_back_for_names_the_module_does_not_hold():
    from iefcli.optim.base import ModelFn

    model, params, batch = _problem(torch.float64)
    fn = ModelFn(model, CrossEntropy())
    partial = {k: v for k, v in list(params.items())[:2]}  # a subset: the rest are the module's own
    assert fn._held(partial) is not None
    _, g = fn.mean_loss_and_grad(partial, batch.inputs, batch.targets)
    _, g_f = ModelFn(model, CrossEntropy(), _forward_by_functional_call).mean_loss_and_grad(
        partial, batch.inputs, batch.targets)
    assert set(g) == set(partial) and all(torch.equal(g[k], g_f[k]) for k in g)
    assert fn._held({"no.such": params["0.weight"]}) is None
    assert fn._held({"0.weight": params["0.weight"].float()}) is None  # another dtype

"""K-FAC, eK-FAC and ieK-FAC from the drop-in preconditioner (iefcli.Preconditioner(method="kfac"...),
iefcli.KFAC): the direction equals the registry optimiser's on the same model / batch / state, the
factors equal explicit sums, the trajectory with intervals > 1 equals the registry's, resume is
bit-exact, micro-batches equal one batch, and a user loop lowers the loss. float64, tiny models."""

from __future__ import annotations

import copy
import dataclasses
import io
import warnings

import pytest
import torch
from torch import nn

import iefcli
import iefcli.kfac as K
from iefcli.core.losses import CrossEntropy, TokenCrossEntropy
from iefcli.errors import ModelError
from iefcli.optim import OptimConfig, make_optimizer
from iefcli.precond import IEF, KFAC, KFACPreconditioner, Preconditioner
from test_kfac import ConvNet

DT = torch.float64


@dataclasses.dataclass
class Batch:
    inputs: torch.Tensor
    targets: torch.Tensor


class Scale(nn.Module):
    """A module without any rule (K-FAC's or the fast path's): replayed per sample, diagonal fallback."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.w


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 4)
        self.norm = nn.LayerNorm(4)  # fast-path rule, no K-FAC rule: diagonal fallback from its dense block
        self.scale = Scale(4)  # no rule at all: diagonal fallback from the replayed block
        self.l2 = nn.Linear(4, 3)

    def forward(self, x):
        return self.l2(self.scale(torch.tanh(self.norm(self.l1(x)))))


class EmbSeq(nn.Module):
    """Token ids -> Embedding (padding_idx 0) -> Linear on the sequence -> per-token logits."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 3, padding_idx=0)
        self.l1 = nn.Linear(3, 4)
        self.l2 = nn.Linear(4, 3)

    def forward(self, ids):
        return self.l2(torch.tanh(self.l1(self.emb(ids))))


def _case(kind, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # test-local init
    if kind == "mlp":
        return MLP().to(DT), torch.randn(n, 5, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g), "cross_entropy"
    if kind == "conv":
        return ConvNet().to(DT), torch.randn(n, 2, 5, 5, generator=g, dtype=DT), torch.randint(0, 4, (n,), generator=g), "cross_entropy"
    if kind == "seq":
        y = torch.randint(0, 3, (n, 4), generator=g)
        y[0, -1] = -100  # one ignored token
        return EmbSeq().to(DT), torch.randint(0, 6, (n, 4), generator=g), y, TokenCrossEntropy()
    raise ValueError(kind)


def _registry(model, name, damping, momentum=0.0, weight_decay=0.0, **opts):
    cfg = OptimConfig(name=name, lr=1.0, damping=damping, momentum=momentum, weight_decay=weight_decay, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the registry optimiser announces its fallback list
        return make_optimizer(cfg, model=model, loss_fn=_loss_fn_for(model))


def _loss_fn_for(model):
    return TokenCrossEntropy() if isinstance(model, EmbSeq) else CrossEntropy()


def _params(m):
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def _pre_direction(pre, model, x, y):
    model.zero_grad()
    loss = pre.loss(model(x), y)
    loss.backward()
    info = pre.step()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}, info


CASES = ["mlp", "conv", "seq"]


@pytest.mark.parametrize("fisher", [None, "empirical", "sampled"])
@pytest.mark.parametrize("method", K.METHODS)
@pytest.mark.parametrize("kind", CASES)
def test_direction_equals_the_registry_optimiser(kind, method, fisher):
    """One step from a fresh state: p.grad after pre.step() == (theta - update) / lr of the registry's
    optimiser on a copy of the model, same batch, sampled labels from key = seed."""
    model, x, y, loss = _case(kind)
    twin = copy.deepcopy(model)
    pre = iefcli.Preconditioner(model, method=method, damping=1e-3, loss=loss, seed=7, fisher_type=fisher)
    assert isinstance(pre, KFACPreconditioner)
    d, info = _pre_direction(pre, model, x, y)
    opt = _registry(twin, method, 1e-3, fisher_type=fisher)
    p0 = _params(twin)
    p1, st, met = opt.update(p0, opt.init(p0), Batch(x, y), key=7, lr=1.0)
    ref = {k: p0[k] - p1[k] for k in p0}
    assert set(d) == set(ref)
    for k in ref:
        torch.testing.assert_close(d[k], ref[k], rtol=1e-10, atol=1e-13, msg=f"{kind} {method} {k}")
    torch.testing.assert_close(info["loss"], met["loss"], rtol=1e-12, atol=0)
    assert max(float(v.abs().max()) for v in ref.values()) > 1e-3  # not a vacuous zero direction
    flat = lambda t: flatten_tree(t)  # noqa: E731
    fs, fr = flat(pre.kfac_state), flat(st)
    assert set(fs) == set(fr)
    for k in fs:
        torch.testing.assert_close(fs[k], fr[k], rtol=1e-10, atol=1e-12, msg=k)


def flatten_tree(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten_tree(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_factors_equal_explicit_sums_and_the_fallback_is_listed():
    """MLP, true labels: the last layer's G = 1/N sum_n (p_n - y_n)(p_n - y_n)^T, the first layer's
    A = 1/N sum_n [x_n 1][x_n 1]^T; LayerNorm and the rule-less Scale are in ``fallback`` (an attribute:
    nothing printed, no warning) and their diagonal is 1/N sum_n (j_n / sqrt(s_n))^2 from a loop."""
    model, x, y, _ = _case("mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pre = Preconditioner(model, method="iekfac", damping=1e-3)
    assert set(pre.fallback) == {"norm.weight", "norm.bias", "scale.w"}
    assert [r.name for r in pre.rules] == ["l1", "l2"]
    assert "scale.w: diagonal fallback (no K-FAC rule for its module)" in pre.describe()
    _pre_direction(pre, model, x, y)
    st = pre.kfac_state["layers"]
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=DT)], 1)
    torch.testing.assert_close(st["l1"]["A"], xb.T @ xb / len(x), rtol=1e-12, atol=0)
    p = torch.softmax(model(x), 1).detach()
    r = p - torch.nn.functional.one_hot(y, 3).to(DT)
    torch.testing.assert_close(st["l2"]["G"], r.T @ r / len(x), rtol=1e-12, atol=0)
    s = r.pow(2).sum(1)
    ps = [model.norm.weight, model.scale.w]
    want = [torch.zeros_like(q) for q in ps]
    for n in range(len(x)):
        gs = torch.autograd.grad(CrossEntropy().per_sample(model(x[n:n + 1]), y[n:n + 1]).sum(), ps)
        for w, g in zip(want, gs):
            w += g.pow(2) / s[n] / len(x)
    torch.testing.assert_close(pre.kfac_state["fallback"]["norm.weight"], want[0], rtol=1e-10, atol=0)
    torch.testing.assert_close(pre.kfac_state["fallback"]["scale.w"], want[1], rtol=1e-10, atol=0)


@pytest.mark.parametrize("method", K.METHODS)
def test_trajectory_with_intervals_equals_the_registry_optimiser(method):
    """6 steps of KFAC (torch.optim) with stat_interval 2, inv_interval 3, momentum and weight decay ==
    the registry optimiser's 6 updates with keys seed + step (sampled labels for kfac/ekfac)."""
    model, x, y, loss = _case("mlp", n=24)
    twin = copy.deepcopy(model)
    opts = dict(stat_interval=2, inv_interval=3, stat_decay=0.8)
    lr = 0.05
    opt = KFAC(model, lr=lr, damping=1e-2, method=method, momentum=0.5, weight_decay=0.01, seed=3, **opts)
    reg = _registry(twin, method, 1e-2, momentum=0.5, weight_decay=0.01, **opts)
    p = _params(twin)
    st = reg.init(p)
    for i in range(6):
        xb, yb = x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]
        opt.zero_grad()
        opt.loss(model(xb), yb).backward()
        opt.step()
        p, st, _ = reg.update(p, st, Batch(xb, yb), key=3 + i, lr=lr)
    for k, q in model.named_parameters():
        torch.testing.assert_close(q.detach(), p[k], rtol=1e-10, atol=1e-12, msg=k)
    assert not torch.allclose(model.l1.weight, _case("mlp")[0].l1.weight)  # it moved


def _loop(model, opt, data):
    for xb, yb in data:
        opt.zero_grad()
        opt.loss(model(xb), yb).backward()
        opt.step()


@pytest.mark.parametrize("method", K.METHODS)
def test_resume_from_state_dict_is_bit_exact(method):
    model, x, y, loss = _case("conv", n=24)
    data = [(x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]) for i in range(6)]
    start = copy.deepcopy(model)
    kw = dict(lr=0.05, damping=1e-2, method=method, momentum=0.5, stat_interval=2, inv_interval=3)
    straight = copy.deepcopy(start)
    _loop(straight, KFAC(straight, **kw), data)
    half = copy.deepcopy(start)
    opt = KFAC(half, **kw)
    _loop(half, opt, data[:3])
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = copy.deepcopy(start)
    resumed.load_state_dict(saved["model"])
    opt2 = KFAC(resumed, **kw)
    opt2.load_state_dict(saved["opt"])
    assert opt2.preconditioner.steps == 3
    _loop(resumed, opt2, data[3:])
    for (k, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), k
    ref = KFAC(copy.deepcopy(start), **kw)
    _loop(ref.preconditioner.model, ref, data)
    fa, fb = flatten_tree(ref.preconditioner.kfac_state), flatten_tree(opt2.preconditioner.kfac_state)
    assert set(fa) == set(fb) and int(fb["step"]) == 6
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


@pytest.mark.parametrize("method", K.METHODS)
def test_micro_batches_equal_one_batch(method):
    """accumulate(): 3 micro-batches of 4 (each loss divided by 3) == one batch of 12, over 2 steps
    (true labels: sampled draws have the same distribution but not the same values)."""
    model, x, y, loss = _case("seq", n=12)
    one = copy.deepcopy(model)
    pa = Preconditioner(model, method=method, damping=1e-3, loss=loss, fisher_type="empirical")
    pb = Preconditioner(one, method=method, damping=1e-3, loss=loss, fisher_type="empirical")
    for step in range(2):
        model.zero_grad()
        for i in range(3):
            (pa.loss(model(x[4 * i:4 * i + 4]), y[4 * i:4 * i + 4]) / 3).backward()
            assert pa.accumulate() == i + 1
        pa.step()
        one.zero_grad()
        pb.loss(one(x), y).backward()
        pb.step()
        for (k, a), b in zip(model.named_parameters(), one.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-13, msg=k)
        with torch.no_grad():
            for a, b in zip(model.parameters(), one.parameters()):
                a -= 0.1 * a.grad
                b -= 0.1 * b.grad


def test_own_loss_any_constant_reduction_gives_the_same_direction():
    model, x, y, _ = _case("mlp")
    twin = copy.deepcopy(model)
    d1, _ = _pre_direction(Preconditioner(model, method="ekfac", damping=1e-3), model, x, y)
    pre = Preconditioner(twin, method="ekfac", damping=1e-3)
    logits = twin(x)
    pre.watch_loss(logits, y)
    (7.0 * nn.functional.cross_entropy(logits, y, reduction="sum")).backward()
    pre.step()
    for k, q in twin.named_parameters():
        torch.testing.assert_close(q.grad, d1[k], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("method", K.METHODS)
def test_a_user_loop_lowers_the_loss(method):
    """float32, a plain loop with torch.optim.SGD stepping the direction the preconditioner writes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    x_all = torch.randn(256, 10)
    y_all = (x_all[:, :3] + 0.1 * torch.randn(256, 3)).argmax(1)
    pre = Preconditioner(model, method=method, damping=K.DEFAULTS[method]["damping"])
    opt = torch.optim.SGD(model.parameters(), lr=K.DEFAULTS[method]["lr"])
    with torch.no_grad():
        before = float(nn.functional.cross_entropy(model(x_all), y_all))
    for _ in range(3):
        for i in range(0, 256, 32):
            opt.zero_grad()
            pre.loss(model(x_all[i:i + 32]), y_all[i:i + 32]).backward()
            pre.step()
            opt.step()
    with torch.no_grad():
        after = float(nn.functional.cross_entropy(model(x_all), y_all))
    assert after < 0.7 * before, (before, after)


def test_ief_optimiser_with_a_kfac_method_is_the_kfac_optimiser():
    model, x, y, _ = _case("mlp")
    twin = copy.deepcopy(model)
    a = IEF(model, lr=0.1, damping=1e-3, method="iekfac")
    b = iefcli.KFAC(twin, lr=0.1, damping=1e-3, method="iekfac")
    assert isinstance(a.preconditioner, KFACPreconditioner)
    _loop(model, a, [(x, y)] * 2)
    _loop(twin, b, [(x, y)] * 2)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert KFAC(copy.deepcopy(model)).preconditioner.damping == K.DEFAULTS["kfac"]["damping"]
    assert KFAC(copy.deepcopy(model), method="ekfac").defaults["lr"] == K.DEFAULTS["ekfac"]["lr"]


def test_errors_are_one_line_model_errors():
    model, x, y, _ = _case("mlp")
    with pytest.raises(ModelError, match="inv_intervall"):
        Preconditioner(model, method="kfac", inv_intervall=3)
    with pytest.raises(ModelError, match="stat_decay"):
        KFAC(model, stat_decay=1.5)
    with pytest.raises(ModelError, match="not one of kfac"):
        KFAC(model, method="ief")
    with pytest.raises(ModelError, match="damping"):
        Preconditioner(model, method="ekfac", damping=-1.0)
    pre = Preconditioner(model, method="kfac", distributed=True)
    pre.loss(model(x), y).backward()
    with pytest.raises(ModelError, match="single-process"):
        pre.step()
    pre.remove()
    pre = Preconditioner(model, method="kfac")
    with pytest.raises(ModelError, match="no loss was recorded"):
        pre.step()
    m2 = EmbSeq().to(DT)
    pre = Preconditioner(m2, method="iekfac", loss=TokenCrossEntropy())
    ids = torch.randint(1, 6, (2, 5))
    (pre.loss(m2(ids[:, :4]), torch.zeros(2, 4, dtype=torch.long)) / 2).backward()
    pre.accumulate()
    (pre.loss(m2(ids), torch.zeros(2, 5, dtype=torch.long)) / 2).backward()
    pre.accumulate()
    with pytest.raises(ModelError, match="different lengths"):
        pre.step()


@pytest.mark.parametrize("lam", [1e-1, 1e-4])
@pytest.mark.parametrize("method", K.METHODS)
def test_batch_of_one_direction_is_the_damped_exact_block(method, lam):
    """One Linear layer (bias), one sample: K-FAC's and eK-FAC's matrix is exactly j j^T (paper scale,
    N = 1) and ieK-FAC's is j j^T / s, so the direction is (M + lam I)^{-1} j, dense, in float64: the
    damping means what the registry's does."""
    torch.manual_seed(1)
    model = nn.Linear(3, 2).to(DT)
    x, y = torch.randn(1, 3, dtype=DT), torch.tensor([1])
    d, _ = _pre_direction(Preconditioner(model, method=method, damping=lam, fisher_type="empirical"), model, x, y)
    z = model(x)
    j = torch.cat([torch.autograd.grad(CrossEntropy().per_sample(z, y).sum(), [model.weight, model.bias])[0],
                   torch.autograd.grad(CrossEntropy().per_sample(model(x), y).sum(), [model.bias])[0][:, None]], 1)
    j = j.reshape(-1)
    s = float((torch.softmax(z.detach(), 1) - nn.functional.one_hot(y, 2)).pow(2).sum())
    M = torch.outer(j, j) / (s if method == "iekfac" else 1.0)
    ref = torch.linalg.solve(M + lam * torch.eye(len(j), dtype=DT), j).reshape(2, 4)
    torch.testing.assert_close(torch.cat([d["weight"], d["bias"][:, None]], 1), ref, rtol=1e-9, atol=1e-12)


def test_running_averages_and_intervals_against_explicit_sums():
    """At fixed parameters (lr 0), true labels: after 4 steps with stat_interval 2 and decay 0.8 the first
    layer's A is 0.8 A(b0) + 0.2 A(b2) and the last layer's G likewise (A(b) = 1/N sum [x 1][x 1]^T,
    G(b) = 1/N sum (p - y)(p - y)^T); the basis is A's eigenbasis from step 3 (inv_interval 3)."""
    model, x, y, _ = _case("mlp", n=16)
    pre = Preconditioner(model, method="ekfac", damping=1e-3, stat_interval=2, inv_interval=3, stat_decay=0.8,
                         fisher_type="empirical")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    xb = [torch.cat([x[4 * i:4 * i + 4], torch.ones(4, 1, dtype=DT)], 1) for i in range(4)]
    bases = []
    for i in range(4):
        opt.zero_grad()
        pre.loss(model(x[4 * i:4 * i + 4]), y[4 * i:4 * i + 4]).backward()
        info = pre.step()
        opt.step()
        assert bool(info["stat_step"]) == (i % 2 == 0) and bool(info["inv_step"]) == (i % 3 == 0)
        bases.append(pre.kfac_state["layers"]["l1"]["UA"].clone())
    A = lambda b: b.T @ b / 4  # noqa: E731
    torch.testing.assert_close(pre.kfac_state["layers"]["l1"]["A"], 0.8 * A(xb[0]) + 0.2 * A(xb[2]), rtol=1e-12, atol=0)
    with torch.no_grad():
        r = [torch.softmax(model(x[4 * i:4 * i + 4]), 1) - nn.functional.one_hot(y[4 * i:4 * i + 4], 3) for i in (0, 2)]
    torch.testing.assert_close(pre.kfac_state["layers"]["l2"]["G"], 0.8 * A(r[0]) + 0.2 * A(r[1]), rtol=1e-12, atol=0)
    assert torch.equal(bases[0], bases[2]) and not torch.equal(bases[2], bases[3])
    lam, U = torch.linalg.eigh(0.8 * A(xb[0]) + 0.2 * A(xb[2]))
    torch.testing.assert_close(bases[3].abs(), U.abs(), rtol=1e-8, atol=1e-10)  # eigenvectors up to sign


def test_a_scaled_loss_needs_unscaled_gradients_and_then_gives_the_same_direction():
    """GradScaler's contract: a loss multiplied by 2^k is recognised (the direction is scale-free), and
    pre.step() on still-scaled .grad is refused (scaler.step would divide the direction afterwards)."""
    model, x, y, _ = _case("mlp")
    twin = copy.deepcopy(model)
    ref, _ = _pre_direction(Preconditioner(twin, method="iekfac", damping=1e-3), twin, x, y)
    pre = Preconditioner(model, method="iekfac", damping=1e-3)
    (1024.0 * pre.loss(model(x), y)).backward()
    with pytest.raises(ModelError, match="loss scale"):
        pre.step()
    for p in model.parameters():
        p.grad /= 1024.0  # scaler.unscale_(opt)
    pre.step()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[k], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("method", ["ekfac", "iekfac"])
def test_diagonal_is_the_projected_second_moment_from_a_loop(kind, method):
    """The preconditioner's S (first step) = 1/N sum_n w_n (U_G^T J_n U_A)^2, J_n from a loop of
    torch.autograd.grad (tests/test_kfac.py's reference), w_n = 1 (ekfac) or 1/s_n (iekfac), true labels."""
    from test_kfac import _projected_ref

    model, x, y, loss = _case(kind)
    loss_fn = _loss_fn_for(model)
    pre = Preconditioner(model, method=method, damping=1e-3, loss=loss, fisher_type="empirical")
    _pre_direction(pre, model, x, y)
    s = loss_fn.s(model(x).detach(), y)
    for r in pre.rules:
        st = pre.kfac_state["layers"][r.name]
        ref = _projected_ref(model, x, y, loss_fn, r, st.get("UA"), st["UG"], weights=1 / s if method == "iekfac" else None)
        torch.testing.assert_close(st["S"], ref, rtol=1e-9, atol=1e-13, msg=r.name)

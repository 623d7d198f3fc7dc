"""iefcli.eval.gamma_eval against a dense float64 reference built here.

The reference forms everything explicitly on tiny models: per-sample
gradients by a loop of torch.autograd.grad on a torch.nn.functional loss,
the GGN as sum_n Jz_n^T H_n Jz_n from autograd Jacobians/Hessians, and each
direction by a dense solve of the paper's formula; gamma = sqrt(d^T G d)/(d^T g).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

import iefcli.eval.gamma_eval as ge
from cases import make_case
from iefcli.core.losses import MSE
from iefcli.core.params import trainable_params

DAMPINGS = (1e-12, 1e-8, 1e-4, 1e-2, 1.0)


# ------------------------------------------------------------------ reference


def _flat_fn(model, params):
    names = list(params)
    shapes = [params[k].shape for k in names]
    numels = [params[k].numel() for k in names]

    def unflat(theta):
        return {k: c.view(s) for k, s, c in zip(names, shapes, torch.split(theta, numels))}

    theta0 = torch.cat([params[k].reshape(-1) for k in names]).detach().to(torch.float64)
    return theta0, unflat


def dense_reference(case, inputs, targets):
    """J (N,P), s (N,), g (P,), G_sum (P,P) by loops of autograd in float64."""
    theta0, unflat = _flat_fn(case.model, case.params)
    rows, s, G = [], [], torch.zeros(theta0.numel(), theta0.numel(), dtype=torch.float64)
    for n in range(targets.shape[0]):
        x_n, y_n = inputs[n : n + 1], targets[n]

        def z_of(theta):
            return functional_call(case.model, unflat(theta), (x_n,))[0]

        theta = theta0.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(case.ref_loss(z_of(theta), y_n), theta)
        rows.append(grad)
        z = z_of(theta0).detach().requires_grad_(True)
        (gz,) = torch.autograd.grad(case.ref_loss(z, y_n), z)
        s.append(gz.pow(2).sum())
        jz = jacobian(z_of, theta0).reshape(-1, theta0.numel())  # (C, P)
        h = hessian(lambda zz: case.ref_loss(zz, y_n), z.detach()).reshape(jz.shape[0], jz.shape[0])
        G += jz.T @ h @ jz
    J = torch.stack(rows)
    return J, torch.stack(s), J.mean(0), G


def ref_sampled_rows(case, inputs, yhat, k):
    """Per-sample gradients at the sampled labels yhat (k, N, ...), / sqrt(k), k-major."""
    theta0, unflat = _flat_fn(case.model, case.params)
    out = []
    for i in range(k):
        for n in range(inputs.shape[0]):
            theta = theta0.clone().requires_grad_(True)
            z = functional_call(case.model, unflat(theta), (inputs[n : n + 1],))[0]
            (grad,) = torch.autograd.grad(case.ref_loss(z, yhat[i, n]), theta)
            out.append(grad / math.sqrt(k))
    return torch.stack(out)


def ref_gamma(G_mean, g, d):
    return float(torch.sqrt(d @ G_mean @ d) / (d @ g))


def ref_directions(J, s, g, G, lam, Jhat=None):
    n, p = J.shape
    eye_n, eye_p = torch.eye(n, dtype=torch.float64), torch.eye(p, dtype=torch.float64)
    out = {
        "sgd": g,
        "ef": J.T @ torch.linalg.solve(J @ J.T + lam * eye_n, torch.ones(n, dtype=torch.float64)) / n,
        "ief": J.T @ torch.linalg.solve(J @ J.T + lam * eye_n, s) / n,
        "ngd": torch.linalg.solve(G + lam * eye_p, g),
    }
    if Jhat is not None:
        out["sf"] = torch.linalg.solve(Jhat.T @ Jhat + lam * eye_p, g)
    return out


def _imb_ref(norms):
    x = np.sort(np.asarray(norms, dtype=np.float64))
    k = max(1, math.ceil(0.1 * len(x)))
    return x[-1] / x[0], x[-k:].mean() / x[:k].mean()


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("case_name", ["mlp_ce", "mlp_mse"])
def test_ratios_match_dense_reference(case_name):
    case = make_case(case_name, torch.float64)
    x, y = case.inputs, case.targets
    batches = [(x, y), (x[1:5], y[1:5])]
    k, seed = 2, 123
    res = ge.evaluate_gamma(
        model=case.model, params=case.params, loss_fn=case.loss_fn, batches=batches,
        methods=("sgd", "ef", "ief", "sf", "ngd"), dampings=DAMPINGS, sf_samples=k,
        generator=torch.Generator().manual_seed(seed),
        # Default duplicate filter: with k=2 the same label can be drawn twice for one datum;
        # those exact duplicate SF rows must be KEPT (Monte-Carlo weight), as the reference does.
    )
    assert res.n_batches == 2
    assert len(res.rows) == 2 * 5 * len(DAMPINGS)
    gen = torch.Generator().manual_seed(seed)  # replays the SF label draws batch by batch
    for b, (xb, yb) in enumerate(batches):
        J, s, g, G = dense_reference(case, xb, yb)
        n = yb.shape[0]
        z = functional_call(case.model, case.params, (xb,)).detach()
        yhat = case.loss_fn.sample(z, yb, k, gen)
        Jhat = ref_sampled_rows(case, xb, yhat, k)
        g_sgd = ref_gamma(G / n, g, g)
        # imbalance of per-sample gradient norms and logit-gradient norms
        mm, tb = _imb_ref(J.norm(dim=1))
        lmm, ltb = _imb_ref(s.sqrt())
        imb = res.imbalance[b]
        assert imb["grad_norm_max_min"] == pytest.approx(mm, rel=1e-9)
        assert imb["grad_norm_top10_bottom10"] == pytest.approx(tb, rel=1e-9)
        assert imb["logit_grad_norm_max_min"] == pytest.approx(lmm, rel=1e-9)
        assert imb["logit_grad_norm_top10_bottom10"] == pytest.approx(ltb, rel=1e-9)
        for lam in DAMPINGS:
            ref = ref_directions(J, s, g, G, lam, Jhat)
            got = {r["method"]: r for r in res.rows if r["batch"] == b and r["damping"] == lam}
            assert set(got) == {"sgd", "ef", "ief", "sf", "ngd"}
            for m, d in ref.items():
                # Dense P x P solves lose digits at tiny damping (cond ~ 1/lam); the N x N ones do not.
                if m in ("sf", "ngd") and lam < 1e-4:
                    continue
                want = ref_gamma(G / n, g, d)
                assert got[m]["gamma"] == pytest.approx(want, rel=1e-6), (m, lam)
                assert got[m]["gamma_ratio"] == pytest.approx(want / g_sgd, rel=1e-6), (m, lam)
                cos = float(torch.nn.functional.cosine_similarity(d, ref["ngd"], dim=0))
                assert got[m]["cos_to_ngd"] == pytest.approx(cos, abs=1e-6), (m, lam)
                assert got[m]["grad_norm_max_min"] == imb["grad_norm_max_min"]
            assert got["sgd"]["gamma_ratio"] == 1.0
            # NG minimises gamma over all directions (undamped G): at small damping nothing beats it.
            if lam <= 1e-8:
                assert all(got["ngd"]["gamma"] <= r["gamma"] * (1 + 1e-9) for r in got.values())


def test_ngd_at_tiny_damping_matches_pseudo_inverse():
    case = make_case("mlp_ce", torch.float64)
    res = ge.evaluate_gamma(
        model=case.model, params=case.params, loss_fn=case.loss_fn, batches=[(case.inputs, case.targets)],
        methods=("sgd", "ngd"), dampings=(1e-12,), generator=None,
    )
    J, s, g, G = dense_reference(case, case.inputs, case.targets)
    d = torch.linalg.pinv(G, hermitian=True, rtol=1e-10) @ g  # g lies in range(G): the minimum-norm NG
    n = case.n
    want = ref_gamma(G / n, g, d) / ref_gamma(G / n, g, g)
    (row,) = [r for r in res.rows if r["method"] == "ngd"]
    assert row["gamma_ratio"] == pytest.approx(want, rel=1e-6)
    assert row["gamma_ratio"] < 1


def test_two_parameter_least_squares_ief_equals_ngd_and_ef_is_worse():
    # Figure 1 of the paper: 2 parameters, 2 data, 0.5 (x^T theta - y)^2. With J = diag(r) X
    # square, iEF = X^{-1} r = (X^T X)^{-1} X^T r = NG, while EF = X^{-1} diag(r)^{-1} 1.
    model = nn.Linear(2, 1, bias=False).to(torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.3, -0.4]], dtype=torch.float64))
    x = torch.tensor([[1.0, 0.2], [0.3, 2.0]], dtype=torch.float64)
    y = torch.tensor([[2.0], [-0.1]], dtype=torch.float64)
    res = ge.evaluate_gamma(
        model=model, params=trainable_params(model), loss_fn=MSE(), batches=[(x, y)],
        methods=("sgd", "ef", "ief", "ngd"), dampings=(1e-12, 1e-10, 1e-8), generator=None,
    )
    for lam in (1e-12, 1e-10, 1e-8):
        got = {r["method"]: r for r in res.rows if r["damping"] == lam}
        assert got["ief"]["gamma_ratio"] == pytest.approx(got["ngd"]["gamma_ratio"], rel=1e-7)
        assert got["ief"]["cos_to_ngd"] == pytest.approx(1.0, abs=1e-9)
        assert got["ef"]["gamma_ratio"] > got["ief"]["gamma_ratio"] * 1.05
        assert got["ngd"]["gamma_ratio"] < 1


def test_batch_grads_once_per_batch_and_sgd_is_damping_independent(monkeypatch):
    calls = []
    real = ge.batch_grads

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(ge, "batch_grads", counting)
    case = make_case("mlp_ce", torch.float64)
    x, y = case.inputs, case.targets
    res = ge.evaluate_gamma(
        model=case.model, params=case.params, loss_fn=case.loss_fn,
        batches=iter([(x, y), (x[:4], y[:4]), (x[2:], y[2:])]), max_batches=2,
        methods=("sgd", "ef", "ief", "sf"), dampings=DAMPINGS, generator=torch.Generator().manual_seed(0),
    )
    assert len(calls) == 2 == res.n_batches  # max_batches stops the iterator
    for b in range(2):
        sgd = [r["gamma"] for r in res.rows if r["batch"] == b and r["method"] == "sgd"]
        assert len(sgd) == len(DAMPINGS) and len(set(sgd)) == 1


def test_same_seed_same_results_other_seed_changes_only_sf():
    case = make_case("mlp_ce", torch.float64)
    x, y = case.inputs, case.targets

    def run(seed):
        return ge.evaluate_gamma(
            model=case.model, params=case.params, loss_fn=case.loss_fn, batches=[(x, y), (x[:5], y[:5])],
            methods=("sgd", "ef", "ief", "sf"), dampings=(1e-6, 1e-2), sf_samples=1,
            generator=torch.Generator().manual_seed(seed),
        )

    a, b, c = run(5), run(5), run(6)
    assert a.rows == b.rows and a.summary == b.summary
    for ra, rc in zip(a.rows, c.rows):
        if ra["method"] == "sf":
            continue
        assert ra == rc
    assert any(ra["gamma"] != rc["gamma"] for ra, rc in zip(a.rows, c.rows) if ra["method"] == "sf")


def test_aggregate_matches_numpy():
    rng = np.random.default_rng(0)
    rows = []
    vals = {}
    for m in ("ef", "ief"):
        for lam in (1e-8, 1.0):
            v = rng.lognormal(size=9)
            if m == "ef" and lam == 1.0:
                v[3] = np.nan  # left out of the statistics
            vals[(m, lam)] = v
            for b, r in enumerate(v):
                rows.append({"batch": b, "method": m, "damping": lam, "gamma": 2 * r, "gamma_ratio": r, "cos_to_ngd": None})
    summ = ge.aggregate(rows)
    assert [(s["method"], s["damping"]) for s in summ] == [("ef", 1e-8), ("ef", 1.0), ("ief", 1e-8), ("ief", 1.0)]
    for s in summ:
        v = vals[(s["method"], s["damping"])]
        assert s["gamma_ratio_mean"] == pytest.approx(np.nanmean(v), rel=1e-12)
        assert s["gamma_ratio_median"] == pytest.approx(np.nanmedian(v), rel=1e-12)
        assert s["gamma_ratio_iqr"] == pytest.approx(list(np.nanpercentile(v, [25, 75])), rel=1e-12)
        assert s["gamma_median"] == pytest.approx(np.nanmedian(2 * v), rel=1e-12)
        assert s["n_batches"] == 9
        assert s["cos_to_ngd_median"] is None
    per_batch = [{k: float(rng.lognormal()) for k in ge.IMBALANCE_KEYS} for _ in range(6)]
    agg = ge.aggregate_imbalance(per_batch)
    for k in ge.IMBALANCE_KEYS:
        assert agg[k] == pytest.approx(np.median([p[k] for p in per_batch]), rel=1e-12)


@pytest.mark.parametrize(
    "methods, dampings, match",
    [
        (["sgd", "kfac"], [1e-3], "unknown method"),
        (["ief"], [-1.0], "damping"),
        (["ief"], [float("nan")], "damping"),
        (["sf"], [0.0], "sf needs damping > 0"),
        ([], [1.0], "no methods"),
        (["ief"], [], "no damping"),
    ],
)
def test_check_methods_rejects_bad_input(methods, dampings, match):
    with pytest.raises(ValueError, match=match):
        ge.check_methods(methods, dampings)


def test_check_methods_dedupes_in_order():
    assert ge.check_methods(["IEF", "sgd", "ief"], [1.0, 1e-3, 1.0]) == (("ief", "sgd"), (1.0, 1e-3))


def test_sf_needs_an_explicit_generator():
    case = make_case("mlp_ce", torch.float64)
    with pytest.raises(ValueError, match="explicit torch.Generator"):
        ge.evaluate_gamma(model=case.model, params=case.params, loss_fn=case.loss_fn,
                          batches=[(case.inputs, case.targets)], methods=("sf",), generator=None)


def test_empty_batches_raise():
    case = make_case("mlp_ce", torch.float64)
    with pytest.raises(ValueError, match="no evaluation batches"):
        ge.evaluate_gamma(model=case.model, params=case.params, loss_fn=case.loss_fn, batches=[], methods=("sgd",))

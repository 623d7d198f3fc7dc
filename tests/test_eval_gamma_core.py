"""iefcli.eval.gamma_eval against a dense float64 reference (tests/reference_eval.py).

The reference forms everything explicitly on tiny models: per-sample
gradients by a loop of torch.autograd.grad on a torch.nn.functional loss,
the GGN as sum_n Jz_n^T H_n Jz_n from autograd Jacobians/Hessians, and each
direction by a dense solve of the AUTHORS' formula at the paper's damping;
gamma = sqrt(d^T G d)/(d^T g).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

import iefcli.eval.gamma_eval as ge
import reference_eval as ref
from cases import make_case
from iefcli.core.losses import MSE
from iefcli.core.params import trainable_params

DAMPINGS = (1e-12, 1e-8, 1e-4, 1e-2, 1.0)



def dense(case, x, y):
    return ref.dense_batch(case.model, case.params, case.ref_loss, x, y)


def _count_calls(monkeypatch, owner, name: str) -> list:
    """Wrap owner.name so that each call appends to the returned list."""
    calls, real = [], getattr(owner, name)

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(owner, name, counting)
    return calls


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
        J, s, g, G = dense(case, xb, yb)
        n = yb.shape[0]
        z = functional_call(case.model, case.params, (xb,)).detach()
        # The only library piece the reference replays: the SF label draw (the same generator
        # state gives the same labels; the sampler itself is checked by the core's loss tests).
        yhat = case.loss_fn.sample(z, yb, k, gen)
        Jhat = ref.sampled_grads(case.model, case.params, case.ref_loss, xb, yhat, k)
        g_sgd = ref.gamma(G, g, g, n)
        # imbalance of per-sample gradient norms and logit-gradient norms
        mm, tb = ref.imbalance(J.norm(dim=1))
        lmm, ltb = ref.imbalance(s.sqrt())
        imb = res.imbalance[b]
        assert imb["grad_norm_max_min"] == pytest.approx(mm, rel=1e-9)
        assert imb["grad_norm_top10_bottom10"] == pytest.approx(tb, rel=1e-9)
        assert imb["logit_grad_norm_max_min"] == pytest.approx(lmm, rel=1e-9)
        assert imb["logit_grad_norm_top10_bottom10"] == pytest.approx(ltb, rel=1e-9)
        for lam in DAMPINGS:
            want_d = ref.paper_directions(J, s, g, G, lam, Jhat)
            got = {r["method"]: r for r in res.rows if r["batch"] == b and r["damping"] == lam}
            assert set(got) == {"sgd", "ef", "ief", "sf", "ngd"}
            for m, d in want_d.items():
                assert got[m]["sanity"] == "ok" and got[m]["cos_to_grad"] == pytest.approx(ref.cos(d, g), abs=1e-6)
                assert got[m]["grad_norm_max_min"] == pytest.approx(mm, rel=1e-9)  # every row carries its batch's
                # Dense P x P solves lose digits at tiny damping (cond ~ 1/lam); the N x N ones do not.
                if m in ("sf", "ngd") and lam < 1e-4:
                    continue
                want = ref.gamma(G, g, d, n)
                assert got[m]["gamma"] == pytest.approx(want, rel=1e-6), (m, lam)
                assert got[m]["gamma_ratio"] == pytest.approx(want / g_sgd, rel=1e-6), (m, lam)
                assert got[m]["cos_to_ngd"] == pytest.approx(ref.cos(d, want_d["ngd"]), abs=1e-6), (m, lam)
            # NG minimises gamma over all directions (undamped G): at small damping nothing beats it.
            if lam <= 1e-8:
                assert all(got["ngd"]["gamma"] <= r["gamma"] * (1 + 1e-9) for r in got.values())


def test_ngd_at_tiny_damping_matches_pseudo_inverse():
    case = make_case("mlp_ce", torch.float64)
    res = ge.evaluate_gamma(
        model=case.model, params=case.params, loss_fn=case.loss_fn, batches=[(case.inputs, case.targets)],
        methods=("sgd", "ngd"), dampings=(1e-12,), generator=None,
    )
    J, s, g, G = dense(case, case.inputs, case.targets)
    d = torch.linalg.pinv(G, hermitian=True, rtol=1e-10) @ g  # g lies in range(G): the minimum-norm NG
    n = case.n
    want = ref.gamma(G, g, d, n) / ref.gamma(G, g, g, n)
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
    J, s, g, G = ref.linear_lsq(model.weight.detach(), x, y)
    for lam in (1e-12, 1e-10, 1e-8):
        got = {r["method"]: r for r in res.rows if r["damping"] == lam}
        want = ref.paper_directions(J, s, g, G, lam)
        for m in ("sgd", "ef", "ief", "ngd"):
            assert got[m]["gamma"] == pytest.approx(ref.gamma(G, g, want[m], 2), rel=1e-7), m
        assert got["ief"]["gamma_ratio"] == pytest.approx(got["ngd"]["gamma_ratio"], rel=1e-7)
        assert got["ief"]["cos_to_ngd"] == pytest.approx(1.0, abs=1e-9)
        assert got["ef"]["gamma_ratio"] > got["ief"]["gamma_ratio"] * 1.05
        assert got["ngd"]["gamma_ratio"] < 1


def test_batch_grads_once_per_batch_and_sgd_is_damping_independent(monkeypatch):
    calls = _count_calls(monkeypatch, ge, "batch_grads")
    case = make_case("mlp_ce", torch.float64)
    x, y = case.inputs, case.targets
    res = ge.evaluate_gamma(
        model=case.model, params=case.params, loss_fn=case.loss_fn,
        batches=iter([(x, y), (x[:4], y[:4]), (x[2:], y[2:])]), max_batches=2,
        methods=("sgd", "ef", "ief", "sf"), dampings=DAMPINGS, generator=torch.Generator().manual_seed(0),
    )
    assert len(calls) == 2 == res.n_batches  # max_batches stops the iterator
    for b, (xb, yb) in enumerate([(x, y), (x[:4], y[:4])]):
        J, s, g, G = dense(case, xb, yb)
        sgd = {r["damping"]: r for r in res.rows if r["batch"] == b and r["method"] == "sgd"}
        assert sorted(sgd) == sorted(DAMPINGS)  # SGD's row is repeated at every damping, with its own gamma
        for r in sgd.values():
            assert r["gamma"] == pytest.approx(ref.gamma(G, g, g, yb.shape[0]), rel=1e-9)


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


def test_sf_rows_are_drawn_once_per_batch_for_every_damping(monkeypatch):
    """The damping sweep reuses one SF draw per batch (one sampled backward), and the
    directions equal compute_direction's own draw from the same generator state."""
    import iefcli.core.jacobian as jac_mod
    from iefcli.core import methods as mt

    calls = _count_calls(monkeypatch, jac_mod, "sampled_rows")
    case = make_case("mlp_ce", torch.float64)
    x, y = case.inputs, case.targets
    res = ge.evaluate_gamma(
        model=case.model, params=case.params, loss_fn=case.loss_fn, batches=[(x, y), (x[:5], y[:5])],
        methods=("sgd", "ief", "sf"), dampings=DAMPINGS, sf_samples=2, generator=torch.Generator().manual_seed(3),
    )
    assert len(calls) == 2  # one draw per batch, not one per damping
    gen = torch.Generator().manual_seed(3)
    bg = ge.batch_grads(case.model, case.params, x, y, case.loss_fn)
    opts = mt.MethodOptions(mc_samples=2)
    start = gen.get_state()
    for lam in DAMPINGS:
        gen.set_state(start)
        d, _ = mt.compute_direction("sf", bg, lam, generator=gen, options=opts)
        (row,) = [r for r in res.rows if r["batch"] == 0 and r["method"] == "sf" and r["damping"] == lam]
        assert row["gamma"] == pytest.approx(float(ge.gamma(bg, d)), rel=1e-12), lam


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
        assert s["n_bad"] == int(np.isnan(v).sum())  # the NaN row is counted, not averaged
        assert s["cos_to_ngd_median"] is None
    per_batch = [{k: float(rng.lognormal()) for k in ge.IMBALANCE_KEYS} for _ in range(6)]
    agg = ge.aggregate_imbalance(per_batch)
    for k in ge.IMBALANCE_KEYS:
        assert agg[k] == pytest.approx(np.median([p[k] for p in per_batch]), rel=1e-12)


def _sabotaged(monkeypatch, bad):
    """Make _direction return a broken direction for the (method, batch-size) pairs in ``bad``:
    "ascent" -> -g (a valid number, the wrong way), "nan" -> a NaN entry."""
    real = ge._direction

    def direction(m, bg, lam, **kw):
        d, info = real(m, bg, lam, **kw)
        kind = bad.get((m, bg.n))
        if kind == "ascent":
            d = -bg.g
        elif kind == "nan":
            d = d.clone()
            d[0] = float("nan")
        return d, info

    monkeypatch.setattr(ge, "_direction", direction)


def test_bad_directions_are_reported_per_row_and_never_averaged(monkeypatch):
    case = make_case("mlp_ce", torch.float64)
    x, y = case.inputs, case.targets
    batches = [(x, y), (x[:4], y[:4]), (x[1:], y[1:])]
    kw = dict(model=case.model, params=case.params, loss_fn=case.loss_fn, methods=("sgd", "ef", "ief", "sf"),
              dampings=(1e-6, 1e-2))
    clean = ge.evaluate_gamma(batches=batches, generator=torch.Generator().manual_seed(0), **kw)
    assert not clean.bad_rows and all(r["sanity"] == "ok" for r in clean.rows)
    assert all(s["n_bad"] == 0 for s in clean.summary)
    n0 = x.shape[0]
    # ef goes uphill on every batch; iEF is NaN on the first batch only; SF is untouched.
    _sabotaged(monkeypatch, {("ef", n0): "ascent", ("ef", 4): "ascent", ("ef", n0 - 1): "ascent", ("ief", n0): "nan"})
    res = ge.evaluate_gamma(batches=batches, generator=torch.Generator().manual_seed(0), **kw)
    rows = {(r["batch"], r["method"], r["damping"]): r for r in res.rows}
    for b in range(3):
        for lam in (1e-6, 1e-2):
            ef = rows[(b, "ef", lam)]
            assert ef["sanity"] == "not-descent" and ef["cos_to_grad"] == pytest.approx(-1.0, abs=1e-12)
            assert rows[(b, "ief", lam)]["sanity"] == ("non-finite" if b == 0 else "ok")
            assert rows[(b, "sf", lam)]["sanity"] == "ok" and rows[(b, "sgd", lam)]["sanity"] == "ok"
    # every bad row is listed, with why
    assert sorted((r["batch"], r["method"], r["sanity"]) for r in res.bad_rows) == sorted(
        [(b, "ef", "not-descent") for b in range(3) for _ in range(2)] + [(0, "ief", "non-finite")] * 2
    )
    summ = {(s["method"], s["damping"]): s for s in res.summary}
    want = {(s["method"], s["damping"]): s for s in clean.summary}
    for lam in (1e-6, 1e-2):
        # no good row left: no statistic (NaN), 3 bad rows counted
        ef = summ[("ef", lam)]
        assert ef["n_bad"] == 3 and ef["n_batches"] == 3
        assert all(math.isnan(v) for v in (ef["gamma_ratio_median"], ef["gamma_ratio_mean"], *ef["gamma_ratio_iqr"]))
        # iEF: the statistics of batches 1 and 2 alone, as computed from the clean rows
        ief = summ[("ief", lam)]
        good = [r["gamma_ratio"] for r in clean.rows if r["method"] == "ief" and r["damping"] == lam and r["batch"] > 0]
        assert ief["n_bad"] == 1
        assert ief["gamma_ratio_median"] == pytest.approx(float(np.median(good)), rel=1e-12)
        assert ief["gamma_ratio_mean"] == pytest.approx(float(np.mean(good)), rel=1e-12)
        assert ief["gamma_ratio_iqr"] == pytest.approx(list(np.percentile(good, [25, 75])), rel=1e-12)
        for m in ("sgd", "sf"):  # the others are untouched
            assert summ[(m, lam)] == want[(m, lam)]


@pytest.mark.parametrize(
    "finite, cos_g, gam, want",
    [(True, 0.3, 1.2, "ok"), (True, -0.3, -1.2, "not-descent"), (True, 0.0, math.inf, "not-descent"),
     (False, math.nan, math.nan, "non-finite"), (True, 0.3, math.inf, "non-finite")],
)
def test_direction_sanity(finite, cos_g, gam, want):
    assert ge.direction_sanity(finite, cos_g, gam) == want


@pytest.mark.parametrize(
    "methods, dampings, match",
    [
        (["sgd", "nope"], [1e-3], "unknown method"),
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


def test_a_registered_method_is_scored_by_name(monkeypatch):
    from iefcli.core import methods

    def uphill_ief(bg, damping, generator, options):  # -iEF at the same (paper) damping
        d, info = methods.compute_direction("ief", bg, damping, options=options)
        return -3.0 * d, info

    monkeypatch.setitem(methods.METHODS, "uphill", methods.Method("uphill", uphill_ief))
    case = make_case("mlp_ce", torch.float64)
    res = ge.evaluate_gamma(model=case.model, params=case.params, loss_fn=case.loss_fn,
                            batches=[(case.inputs, case.targets)], methods=("ief", "uphill"), dampings=(1e-6,))
    ief, up = res.rows
    assert up["method"] == "uphill" and up["gamma"] == pytest.approx(-ief["gamma"], rel=1e-12)
    assert up["sanity"] == "not-descent" and up["cos_to_grad"] == pytest.approx(-ief["cos_to_grad"], rel=1e-12)
    assert [s["n_bad"] for s in res.summary] == [0, 1]

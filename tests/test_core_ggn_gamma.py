"""GGN products, the CG natural gradient, the gamma indicator, the paper's
2-parameter toy, and SF -> NG with many samples.

G is the GGN of the SUMMED loss (docs/DESIGN.md); gamma uses G / N.
"""

from __future__ import annotations

import math
from functools import lru_cache

import pytest
import torch
from torch import nn

import reference as ref
from cases import CASE_NAMES, DAMPINGS, make_case
from iefcli import directions
from iefcli.core import MSE, CrossEntropy, batch_grads, ggn_matrix, ggn_quadratic, ggn_vp, sampled_rows, trainable_params
from iefcli.gamma import gamma, gamma_from_matrix, gamma_ratio

EPS64 = torch.finfo(torch.float64).eps


@lru_cache(maxsize=None)
def _prepared(name: str):
    case = make_case(name, torch.float64)
    bg = batch_grads(case.model, case.params, case.inputs, case.targets, case.loss_fn, jacobian="vmap")
    return case, bg, ref.ggn(case)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_ggn_products_match_dense_reference(name):
    case, bg, G = _prepared(name)
    Gc = ggn_matrix(bg.jac, bg.loss_fn, bg.targets)
    assert ref.rel_err(Gc, G) < 1e-12
    assert torch.allclose(G, G.T, rtol=0, atol=1e-12 * float(G.abs().max()))
    gen = torch.Generator().manual_seed(31)
    for _ in range(2):
        v = torch.randn(case.n_params, dtype=torch.float64, generator=gen)
        assert ref.rel_err(ggn_vp(bg.jac, bg.loss_fn, bg.targets, v), G @ v) < 1e-12
        assert float(ggn_quadratic(bg.jac, bg.loss_fn, bg.targets, v)) == pytest.approx(float(v @ G @ v), rel=1e-12)


# CG on the transformer case needs hundreds of iterations at small damping
# (G has rank 84 of 551 and CG loses orthogonality): too slow for the suite,
# so that case runs only at lam = 1 (the maths is the same code path).
_CG_PARAMS = [(n, lam) for n in CASE_NAMES for lam in (0.0, *DAMPINGS) if n != "transformer_tokce"]
_CG_PARAMS += [("transformer_tokce", 1.0)]


@pytest.mark.parametrize("name,lam", _CG_PARAMS)
def test_cg_ngd_matches_dense_solve(name, lam):
    case, bg, G = _prepared(name)
    expect = ref.ngd(G, bg.g, lam)  # eigen form, accurate for every lam (see reference.ngd)
    d, info = directions.ngd(bg, lam, method="cg", return_info=True)  # the exact path: test_core_ngd.py
    assert bool(info.converged) and int(info.iterations) > 0
    assert d.shape == bg.g.shape and d.dtype == bg.g.dtype
    # CG stops at relative residual 1e-10; the error is at most that times cond on range(G).
    assert ref.rel_err(d, expect) < 1e-8
    # The dense path: a plain solve of G + lam I, only well-conditioned for lam >= 1e-4
    # (and the pseudo-inverse at lam = 0).
    if lam == 0 or lam >= 1e-4:
        e = torch.linalg.eigvalsh(G)
        # cond(G + lam I) = (e_max + lam) / lam for the singular G; on range(G) at lam = 0.
        cond = float((e.max() + lam) / (lam if lam > 0 else e[e > e.max() * 1e-12].min()))
        dd = directions.ngd(bg, lam, method="dense")
        assert ref.rel_err(dd, expect) < 100 * EPS64 * cond + 1e-12


def test_ngd_rejects_unknown_method():
    _, bg, _ = _prepared("mlp_ce")
    with pytest.raises(ValueError, match="method"):
        directions.ngd(bg, 1.0, method="lbfgs")


def _other_directions(name):
    """SGD, and EF/iEF/SF at every damping in the table."""
    case, bg, _ = _prepared(name)
    out = {"sgd": directions.sgd(bg.rows)}
    R = sampled_rows(bg, 2, torch.Generator().manual_seed(41))
    for lam in DAMPINGS:
        out[f"ef@{lam:g}"] = directions.ef(bg.rows, lam)
        out[f"ief@{lam:g}"] = directions.ief(bg.rows, bg.s, lam)
        out[f"sf@{lam:g}"] = directions.sf(R, bg.g, lam)
    return out


@pytest.mark.parametrize("name", CASE_NAMES)
def test_gamma_jvp_equals_dense_formula_and_ng_is_optimal(name):
    case, bg, G = _prepared(name)
    d_ng = ref.ngd(G, bg.g, 0.0)  # NG at lam -> 0: the pseudo-inverse G^+ g
    g_ng = gamma(bg, d_ng)
    # gamma(G^+ g) = 1 / sqrt(g^T (G/N)^+ g), by Cauchy-Schwarz the minimum over d.
    g_min = 1.0 / math.sqrt(float(bg.g @ torch.linalg.pinv(G / case.n, hermitian=True) @ bg.g))
    assert float(g_ng) == pytest.approx(g_min, rel=1e-9)
    for label, d in _other_directions(name).items():
        gj = gamma(bg, d)
        assert gj.dtype == torch.float64 and gj.dim() == 0
        gd = ref.gamma(G, bg.g, d.to(torch.float64), case.n)
        assert float(gj) == pytest.approx(float(gd), rel=1e-9), label
        assert float(gamma_from_matrix(G / case.n, bg.g, d)) == pytest.approx(float(gd), rel=1e-12), label
        assert float(gj) > 0, label
        assert float(g_ng) <= float(gj) * (1 + 1e-9), label
    # Ratio to SGD against the dense reference (explicit G, independent of the jvp path):
    # sqrt(d^T G d) / (d^T g) over sqrt(g^T G g) / (g^T g); NG's ratio is below 1 by Cauchy-Schwarz.
    g64 = bg.g.to(torch.float64)
    sgd_ref = float(ref.gamma(G, g64, g64, case.n))
    for label, d in {"ng": d_ng, "sgd": bg.g, **_other_directions(name)}.items():
        ratio_ref = float(ref.gamma(G, g64, d.to(torch.float64), case.n)) / sgd_ref
        assert float(gamma_ratio(bg, d)) == pytest.approx(ratio_ref, rel=1e-9), label
    assert float(gamma_ratio(bg, d_ng)) < 1.0


@pytest.mark.parametrize("name", CASE_NAMES)
def test_gamma_is_scale_invariant(name):
    _, bg, _ = _prepared(name)
    d = directions.ief(bg.rows, bg.s, 1e-4)
    base = float(gamma(bg, d))
    for c in (1e-6, 0.37, 5.0, 1e6):
        assert float(gamma(bg, c * d)) == pytest.approx(base, rel=1e-10)
    # A negative multiple is not a descent direction: gamma changes sign.
    assert float(gamma(bg, -d)) == pytest.approx(-base, rel=1e-10)


# ---------------------------------------------------------------- the paper's 2 x 2 toy


def _toy():
    """Linear least squares z_n = x_n . theta, l_n = 0.5 (z_n - y_n)^2, 2 params, 2 data,
    with residuals of very different size (one datum nearly fitted)."""
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.2, -0.4]], dtype=torch.float64))
    X = torch.tensor([[1.0, 0.3], [0.4, 1.2]], dtype=torch.float64)
    z0 = X @ model.weight[0].detach()
    y = (z0 - torch.tensor([2.0, 0.02], dtype=torch.float64)).unsqueeze(1)  # residuals 2 and 0.02
    return model, X, y


def test_toy_ief_parallel_to_ng_ef_is_not():
    model, X, y = _toy()
    bg = batch_grads(model, trainable_params(model), X, y, MSE(), jacobian="vmap")
    # NG here: G = X^T X (summed loss), g = X^T r / 2 -> d_NG = X^{-1} r / 2 exactly.
    r = (bg.logits - y).squeeze(1)
    d_ng_exact = torch.linalg.solve(X, r) / 2
    assert ref.rel_err(directions.ngd(bg, 0.0, method="dense"), d_ng_exact) < 1e-12
    assert ref.rel_err(directions.ngd(bg, 1e-12), d_ng_exact) < 1e-10
    errs = []
    eig_min = float(torch.linalg.eigvalsh(bg.rows.gram()).min())  # ~1e-4: one residual is tiny
    for lam in (1e-2, 1e-4, 1e-8, 1e-12):
        d_ief = directions.ief(bg.rows, bg.s, lam)
        errs.append(1 - ref.cos(d_ief, d_ng_exact))
        # iEF -> NG itself (same scale), not just its direction: the damping moves it
        # by O(lam / eig_min(J J^T)).
        if lam <= 1e-8:
            assert ref.rel_err(d_ief, d_ng_exact) < 10 * lam / eig_min + 1e-12
    assert errs[-1] < 1e-12
    assert errs == sorted(errs, reverse=True)  # closer as lam -> 0
    # EF = X^{-1} (1 / r) / 2: far from NG when the residuals differ (cos ~ -0.56 here).
    d_ef = directions.ef(bg.rows, 1e-12)
    assert ref.rel_err(d_ef, torch.linalg.solve(X, 1 / r) / 2) < 1e-6
    assert ref.cos(d_ef, d_ng_exact) < 0.5
    # and gamma ranks them: NG = iEF < SGD, EF worse.
    gam = {k: float(gamma(bg, d)) for k, d in {"ng": d_ng_exact, "ief": directions.ief(bg.rows, bg.s, 1e-12),
                                                "sgd": bg.g, "ef": d_ef}.items()}
    assert gam["ief"] == pytest.approx(gam["ng"], rel=1e-9)
    assert gam["ng"] < gam["sgd"] and gam["ng"] < gam["ef"]


# ---------------------------------------------------------------- SF -> NG


def _softmax_regression():
    gen = torch.Generator().manual_seed(51)
    model = nn.Linear(3, 3).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=gen)
    return model, x, y


def test_sf_with_many_samples_approaches_ng():
    """E[Jhat^T Jhat] = G, so with many label draws d_SF(lam) -> d_NG(lam).
    Seeded; statistical tolerance: the Fisher estimate's relative error is
    O(1/sqrt(kN)), and d's error is that amplified by ||G|| / (e + lam) on G's
    small eigen-directions (e_min ~ 0.02 here, lam = 0.1): at k = 400, N = 4
    the direction is within 30% (cos > 0.99), and much closer than at k = 5."""
    model, x, y = _softmax_regression()
    bg = batch_grads(model, trainable_params(model), x, y, CrossEntropy(), jacobian="vmap")
    lam = 0.1
    G = ggn_matrix(bg.jac, bg.loss_fn, bg.targets)
    d_ng = ref.ngd(G, bg.g, lam)
    err = {}
    for k in (5, 400):
        R = sampled_rows(bg, k, torch.Generator().manual_seed(52))
        d = directions.sf(R, bg.g, lam)
        err[k] = ref.rel_err(d, d_ng)
        if k == 400:
            F = R.matrix.T @ R.matrix
            assert ref.rel_err(F, G) < 0.1
            assert ref.cos(d, d_ng) > 0.99
            assert err[k] < 0.3
    assert err[400] < err[5] / 2


def test_sf_repeated_draws_keep_their_weight():
    """k identical rows r / sqrt(k) carry the same Fisher r r^T as one row r:
    SF must not drop them as duplicates (regression: it used to by default)."""
    gen = torch.Generator().manual_seed(53)
    J = torch.randn(3, 7, dtype=torch.float64, generator=gen)
    g = torch.randn(7, dtype=torch.float64, generator=gen)
    k = 4
    Jrep = J.repeat(k, 1) / math.sqrt(k)  # k-major: every row repeated k times
    for lam in (1e-4, 1e-1):
        expect = ref.sf(J, g, lam)
        assert ref.rel_err(directions.sf(Jrep, g, lam), expect) < 1e-9
        assert ref.rel_err(directions.sf(J, g, lam), expect) < 1e-9


@pytest.mark.parametrize("name", CASE_NAMES)
def test_float32_ngd_and_gamma(name):
    """float32 model + data: CG in float32 stops at relative residual 1e-5, so the
    direction is within cond(G + lam I) * 1e-5 of float64's; gamma (accumulated in
    float64 from float32 jvps) within 1e-5 relative."""
    case, bg, G = _prepared(name)
    c32 = make_case(name, torch.float32)
    bg32 = batch_grads(c32.model, c32.params, c32.inputs, c32.targets, c32.loss_fn, jacobian="vmap")
    lam = 1.0
    e = torch.linalg.eigvalsh(G)
    cond = float((e.max() + lam) / lam)
    for method in ("cg", "exact"):
        d32, info = directions.ngd(bg32, lam, method=method, return_info=True)
        assert d32.dtype == torch.float32 and bool(info.converged)
        assert ref.rel_err(d32, ref.ngd(G, bg.g, lam)) < cond * 1e-5, method
    d_ief32 = directions.ief(bg32.rows, bg32.s, 1e-8)
    g32 = gamma(bg32, d_ief32)
    assert g32.dtype == torch.float64
    assert float(g32) == pytest.approx(float(gamma(bg, directions.ief(bg.rows, bg.s, 1e-8))), rel=1e-5)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_dense_ggn_from_fast_path_rows_matches_reference(name):
    """ggn_matrix must also work when the Jacobian's rows are not held densely (fast path)."""
    case, _, G = _prepared(name)
    bg = batch_grads(case.model, case.params, case.inputs, case.targets, case.loss_fn, jacobian="fast")
    assert ref.rel_err(ggn_matrix(bg.jac, bg.loss_fn, bg.targets), G) < 1e-12

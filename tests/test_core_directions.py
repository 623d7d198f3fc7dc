"""Woodbury directions (sgd, ef, ief, sf) against explicit P x P forms, their
diagnostics, duplicate filtering, the eigen fallback, and float32 inputs.

Scale (docs/DESIGN.md): mean loss, g = J^T 1 / N, damping on the unscaled Gram.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

import reference as ref
from cases import CASE_NAMES, DAMPINGS, make_case
from iefcli import directions
from iefcli.core import batch_grads, duplicate_mask, sampled_rows, solve_gram

EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps

# Woodbury vs the SVD form (well-conditioned for every damping): same maths, float64.
TOL_SVD = 1e-10


def tol_pxp(cond: float) -> float:
    """The explicit P x P solve loses ~cond * eps; allow 100x that."""
    return 100 * EPS64 * cond + 1e-12


# Explicit P x P solves are only trusted when cond(J^T J + lam I) is below this.
MAX_COND_PXP = 1e9


@lru_cache(maxsize=None)
def _prepared(name: str, dtype: torch.dtype = torch.float64):
    case = make_case(name, dtype)
    bg = batch_grads(case.model, case.params, case.inputs, case.targets, case.loss_fn, jacobian="vmap")
    return case, bg


@lru_cache(maxsize=None)
def _ref_J(name: str):
    return ref.per_sample_grads(make_case(name, torch.float64))


def _cond(A):
    return float(torch.linalg.cond(A))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_sgd_is_the_mean_gradient(name):
    case, bg = _prepared(name)
    J = _ref_J(name)
    for J_in in (J, bg.rows):
        d = directions.sgd(J_in)
        assert d.shape == (case.n_params,)
        assert ref.rel_err(d, ref.sgd(J)) < 1e-12


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("lam", DAMPINGS)
def test_ef_ief_match_explicit_forms(name, lam):
    case, bg = _prepared(name)
    J = _ref_J(name)
    n, P = J.shape
    s = ref.logit_grad(case, ref.logits(case), case.targets).reshape(n, -1).pow(2).sum(1)
    assert torch.allclose(bg.s, s, rtol=1e-12, atol=1e-14)
    ones = torch.ones(n, dtype=torch.float64)
    ief_svd = ref.ridge_svd(J, s, lam) / n
    ef_svd = ref.ridge_svd(J, ones, lam) / n
    A = J.T @ J + lam * torch.eye(P, dtype=torch.float64)
    cond = _cond(A)
    for J_in in (J, bg.rows):  # dense tensor and the Rows object from batch_grads
        for thr in (None, 0.99):  # the cases have no near-duplicate rows: the filter keeps all
            d_ief, info = directions.ief(J_in, s, lam, dup_threshold=thr, return_info=True)
            d_ef = directions.ef(J_in, lam, dup_threshold=thr)
            assert d_ief.shape == d_ef.shape == (P,)
            assert d_ief.dtype == d_ef.dtype == torch.float64
            assert ref.rel_err(d_ief, ief_svd) < TOL_SVD
            assert ref.rel_err(d_ef, ef_svd) < TOL_SVD
            if cond < MAX_COND_PXP:
                assert ref.rel_err(d_ief, ref.ief(J, s, lam)) < tol_pxp(cond)
                assert ref.rel_err(d_ef, ref.ef(J, lam)) < tol_pxp(cond)
            f = info.as_floats()
            assert f["rows_kept"] == n
            assert f["solve_residual"] < 1e-13
            assert f["solve_fallback"] is False


@pytest.mark.parametrize("name", CASE_NAMES)
def test_ief_and_ef_first_order_loss_changes(name):
    """As lam -> 0 with J J^T invertible: J d_iEF = s / N (sample n's loss drops by
    s_n / N per unit step) and J d_EF = 1 / N (every sample's by the same)."""
    case, bg = _prepared(name)
    J = _ref_J(name)
    n = case.n
    lam = 1e-12
    ev = torch.linalg.eigvalsh(J @ J.T)
    # J d = J J^T (J J^T + lam)^{-1} b / N = b / N - lam (J J^T + lam)^{-1} b / N: relative
    # deviation <= lam / eig_min, plus float64 round-off ~ eps * cond(J J^T).
    tol = lam / float(ev.min()) + 100 * EPS64 * float(ev.max() / ev.min())
    assert ref.rel_err(J @ directions.ief(J, bg.s, lam), bg.s / n) < tol
    assert ref.rel_err(J @ directions.ef(J, lam), torch.full((n,), 1.0 / n, dtype=torch.float64)) < tol


@pytest.mark.parametrize("name", CASE_NAMES)
def test_solve_info_diagnostics(name):
    _, bg = _prepared(name)
    C = bg.rows.gram()
    for lam in DAMPINGS:
        A = C + lam * torch.eye(C.shape[0], dtype=torch.float64)
        x, info = solve_gram(C, bg.s, lam)
        r = torch.linalg.vector_norm(A @ x - bg.s) / torch.linalg.vector_norm(bg.s)
        assert float(info.residual) == pytest.approx(float(r), rel=1e-6, abs=1e-16)
        assert float(info.residual) < 1e-13
        # cond estimate from the Cholesky diagonal is a lower bound on the true one, and >= 1.
        assert 1.0 <= float(info.cond) <= _cond(A) * (1 + 1e-8)



@pytest.mark.parametrize("name", CASE_NAMES)
def test_sampled_rows_match_loop_at_sampled_labels(name):
    case, bg = _prepared(name)
    k = 3
    R = sampled_rows(bg, k, torch.Generator().manual_seed(21))
    yhat = case.loss_fn.sample(bg.logits, case.targets, k, torch.Generator().manual_seed(21))
    expect = torch.cat([ref.per_sample_grads(case, targets=yhat[i]) for i in range(k)]) / k**0.5  # k-major
    assert R.matrix.shape == (k * case.n, case.n_params)
    assert ref.rel_err(R.matrix, expect) < 1e-10
    # Same generator seed, same rows; the global RNG is not used.
    state = torch.random.get_rng_state()
    R2 = sampled_rows(bg, k, torch.Generator().manual_seed(21))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(R.matrix, R2.matrix)


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("lam", DAMPINGS)
def test_sf_matches_explicit_form(name, lam):
    case, bg = _prepared(name)
    # mlp_mse has 3 outputs: k = 3 Gaussian draws per sample span all of Jz_n^T R^3, which
    # holds the true gradient, so g lies EXACTLY in the rows' span and (G_hat + lam I)^{-1} g
    # is then ill-posed to evaluate by either form at lam = 1e-12 (both carry eps ||g|| / lam
    # absolute error against a direction of size ||g|| / eig: 0.35 relative). One draw per
    # sample leaves half of g outside the span, which makes the case well-posed.
    k = 1 if name == "mlp_mse" else 3
    R = sampled_rows(bg, k, torch.Generator().manual_seed(22))
    Jh = R.matrix
    g = bg.g
    d, info = directions.sf(R, g, lam, dup_threshold=None, return_info=True)
    assert d.shape == g.shape and d.dtype == g.dtype
    expect = ref.sf_svd(Jh, g, lam)
    # (g - Jh^T x) / lam cancels when g lies (nearly) in the row space of Jh; both
    # forms then carry ~eps * ||g|| / lam absolute error. Tolerance states that, and
    # must stay small enough to mean something on every case.
    tol = TOL_SVD + 1e3 * EPS64 * float(g.norm()) / (lam * float(expect.norm()))
    assert tol < 1e-9
    assert ref.rel_err(d, expect) < tol
    A = Jh.T @ Jh + lam * torch.eye(Jh.shape[1], dtype=torch.float64)
    cond = _cond(A)
    if cond < MAX_COND_PXP:
        assert ref.rel_err(d, ref.sf(Jh, g, lam)) < tol_pxp(cond) + tol
    assert float(info.rows_kept) == Jh.shape[0]


def test_sf_rejects_zero_damping():
    _, bg = _prepared("mlp_ce")
    R = sampled_rows(bg, 1, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="damping"):
        directions.sf(R, bg.g, 0.0)


@pytest.mark.parametrize("fn", ["ef", "ief"])
def test_negative_damping_rejected(fn):
    J = _ref_J("mlp_ce")
    args = (J,) if fn == "ef" else (J, torch.ones(J.shape[0], dtype=torch.float64))
    with pytest.raises(ValueError, match="damping"):
        getattr(directions, fn)(*args, -1e-3)


# ---------------------------------------------------------------- float32


@pytest.mark.parametrize("name", CASE_NAMES)
def test_float32_inputs_give_the_float64_direction(name):
    """float32 model + data vs the same numbers in float64. The solve runs in float64
    either way; what differs is J itself (rounded to float32, relative error ~eps32),
    which moves the direction by at most ~cond(J) eps32. Tolerance: 20 * eps32 * cond(J),
    cond(J) = sqrt(cond(J J^T))."""
    _, bg64 = _prepared(name, torch.float64)
    _, bg32 = _prepared(name, torch.float32)
    assert bg32.g.dtype == torch.float32
    cond_J = _cond(bg64.rows.gram()) ** 0.5
    tol = 20 * EPS32 * cond_J
    assert ref.rel_err(directions.sgd(bg32.rows), directions.sgd(bg64.rows)) < 20 * EPS32 * 10
    for lam in DAMPINGS:
        for fn in ("ief", "ef"):
            args32 = (bg32.rows, bg32.s) if fn == "ief" else (bg32.rows,)
            args64 = (bg64.rows, bg64.s) if fn == "ief" else (bg64.rows,)
            d32 = getattr(directions, fn)(*args32, lam)
            d64 = getattr(directions, fn)(*args64, lam)
            assert d32.dtype == torch.float32
            assert ref.rel_err(d32, d64) < tol, (fn, lam)


# ---------------------------------------------------------------- duplicates and the fallback


def _gram(rows):
    R = torch.tensor(rows, dtype=torch.float64)
    return R, R @ R.T


def test_duplicate_mask_rule():
    # row0 and row1: |cos| = 0.995 > 0.99, row1 larger -> row0 dropped.
    # row2 is anti-parallel to row3 (cos -1), equal norms -> the later (row3) dropped.
    # row4 all-zero -> dropped. row5 is independent -> kept.
    a = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.995, (1 - 0.995**2) ** 0.5, 0.0, 0.0], dtype=torch.float64) * 2.0
    rows = torch.stack([
        a,
        b,
        torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 0.0, -1.0, 0.0], dtype=torch.float64),
        torch.zeros(4, dtype=torch.float64),
        torch.tensor([0.3, -0.2, 0.1, 1.0], dtype=torch.float64),
    ])
    C = rows @ rows.T
    assert duplicate_mask(C, 0.99).tolist() == [False, True, True, False, False, True]
    # cos 0.995 is below a 0.999 threshold: row0 stays; exact anti-duplicates still go.
    assert duplicate_mask(C, 0.999).tolist() == [True, True, True, False, False, True]
    # None / 0 disable the duplicate filter; all-zero rows are still dropped (they add nothing to J^T x).
    for off in (None, 0, 0.0):
        assert duplicate_mask(C, off).tolist() == [True, True, True, True, False, True]


def test_identical_samples_keep_the_solve_finite():
    J = _ref_J("mlp_ce")
    _, bg = _prepared("mlp_ce")
    s = bg.s
    # Sample 2 repeated: J J^T exactly singular.
    Jd = torch.cat([J, J[2:3]])
    sd = torch.cat([s, s[2:3]])
    d, info = directions.ief(Jd, sd, 1e-12, return_info=True)
    assert torch.isfinite(d).all()
    f = info.as_floats()
    assert f["rows_kept"] == J.shape[0]
    assert f["solve_fallback"] is False  # the duplicate was removed before Cholesky
    # = the direction of the deduplicated batch (N+1 in the 1/N scale).
    expect = ref.ridge_svd(J, s, 1e-12) / (J.shape[0] + 1)
    assert ref.rel_err(d, expect) < TOL_SVD
    d_ef = directions.ef(Jd, 1e-12)
    assert torch.isfinite(d_ef).all()
    assert ref.rel_err(d_ef, ref.ridge_svd(J, torch.ones(J.shape[0], dtype=torch.float64), 1e-12) / (J.shape[0] + 1)) < TOL_SVD


def test_eigen_fallback_gives_minimum_norm_solution():
    # Row 2 = row 0 + row 1 (no pair is close in cosine): the Gram is exactly singular,
    # Cholesky fails at damping 0, and the pseudo-inverse path must give J^+ s / N.
    J = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 1.0, 0.0, -1.0], [1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    s = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    d, info = directions.ief(J, s, 0.0, dup_threshold=None, return_info=True)
    assert bool(info.fallback)
    assert torch.isfinite(d).all()
    expect = torch.linalg.pinv(J) @ s / 3
    assert ref.rel_err(d, expect) < 1e-12
    # Minimum norm: d lies in the row space of J.
    P_row = torch.linalg.pinv(J) @ J
    assert ref.rel_err(P_row @ d, d) < 1e-12
    # Same for exact duplicates with the filter off.
    Jd = torch.cat([J[:2], J[:1]])
    sd = torch.tensor([0.5, 2.0, 0.7], dtype=torch.float64)
    d2, info2 = directions.ief(Jd, sd, 0.0, dup_threshold=None, return_info=True)
    assert bool(info2.fallback)
    assert ref.rel_err(d2, torch.linalg.pinv(Jd) @ sd / 3) < 1e-12


def test_all_zero_rows_give_a_zero_direction():
    # A batch the model fits exactly (MSE residuals 0): every row is dropped, d = 0, no NaN.
    J = torch.zeros(4, 6, dtype=torch.float64)
    s = torch.zeros(4, dtype=torch.float64)
    for lam in (0.0, 1e-12):
        d, info = directions.ief(J, s, lam, return_info=True)
        assert torch.equal(d, torch.zeros(6, dtype=torch.float64))
        assert int(info.rows_kept) == 0
        assert torch.equal(directions.ef(J, lam), torch.zeros(6, dtype=torch.float64))



@pytest.mark.parametrize("jacobian", ["vmap", "fast"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_sf_float32_when_g_lies_in_the_rows_span(name, jacobian):
    """d_SF = (g - Jhat^T x) / lam cancels when g lies in the rows' span (here: the rows are
    the true-label gradients, g their mean; a confident model's label draws give that). The
    same float32 rows and g must give the direction float64 arithmetic gives on those
    numbers (the rows read out exactly as J^T e_m), for every damping, and d^T g > 0.
    (Before sf refined x against the rows, the fast path's float32 Gram blocks, accurate
    to ~5e-9, put cnn_ce 22% off with d^T g < 0 at lam = 1e-9.)"""
    case = make_case(name, torch.float32)
    bg = batch_grads(case.model, case.params, case.inputs, case.targets, case.loss_fn, jacobian=jacobian)
    eye = torch.eye(bg.rows.n_rows, dtype=torch.float64)
    J64 = torch.stack([bg.rows.combine(e, dtype=torch.float64) for e in eye])  # the same rows, exactly
    g64 = bg.g.double()
    for lam in (1e-3, 1e-5, 1e-7, 1e-9):
        d32 = directions.sf(bg.rows, bg.g, lam)
        d64 = ref.sf_svd(J64, g64, lam)
        assert d32.dtype == torch.float32
        assert ref.rel_err(d32, d64) < 1e-6, lam
        assert float(d32.double() @ g64) > 0, lam

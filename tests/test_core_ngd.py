"""Exact natural gradient through the dual system, CG's honest diagnostics and the
sync-free Gram solve fallback.

NG = (G + lam I)^{-1} g with G the GGN of the SUMMED loss and g the MEAN gradient
(docs/DESIGN.md). References: the dense G of tests/reference.py (one autograd.grad
per logit, autograd Hessians of the plain loss), solved by its eigen-decomposition.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from torch import nn

import reference as ref
from cases import CASE_NAMES, make_case
from iefcli import directions
from iefcli.core import CrossEntropy, MSE, batch_grads, conjugate_gradient, ggn_vp, solve_gram, trainable_params

EPS64 = torch.finfo(torch.float64).eps
NG_DAMPINGS = (1.0, 1e-4, 1e-8, 1e-12, 0.0)


@lru_cache(maxsize=None)
def _prepared(name: str, jacobian: str):
    case = make_case(name, torch.float64)
    bg = batch_grads(case.model, case.params, case.inputs, case.targets, case.loss_fn, jacobian=jacobian)
    return case, bg


@lru_cache(maxsize=None)
def _dense_G(name: str):
    G = ref.ggn(make_case(name, torch.float64))
    e = torch.linalg.eigvalsh(G)
    e_pos = e[e > e.max() * G.shape[0] * EPS64]
    return G, float(e.max()), float(e_pos.min())


@pytest.mark.parametrize("jacobian", ["vmap", "fast"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_exact_ngd_matches_dense_solve(name, jacobian):
    """Every damping down to 1e-12 and 0 (the pseudo-inverse): the error is round-off
    times cond(G + lam I) on the range of G, nothing that grows as lam shrinks."""
    case, bg = _prepared(name, jacobian)
    G, e_max, e_min = _dense_G(name)
    rows = bg.n * case.loss_fn.ggn_rank(bg.logits)
    for lam in NG_DAMPINGS:
        expect = ref.ngd(G, bg.g, lam)
        for method in ("exact", "auto"):
            d, info = directions.ngd(bg, lam, method=method, return_info=True)
            cond = (e_max + lam) / (e_min + lam)
            assert d.shape == bg.g.shape and d.dtype == bg.g.dtype
            assert ref.rel_err(d, expect) < 20 * EPS64 * cond + 1e-13, (lam, method)
            assert int(info.iterations) == 0 and bool(info.converged)  # auto took the exact path
            assert float(info.residual) < 20 * EPS64 * cond + 1e-13
            assert info.residual.dim() == 0 and info.residual.device == d.device
        assert rows <= directions.NGD_EXACT_MAX_ROWS


def test_token_ce_exact_rows_cover_only_real_tokens():
    """Token CE: T*(C-1) rows per sample, padded tokens give all-zero rows (H is zero there),
    and the dual Gram's rank is (number of real tokens) * (C-1), the rank of G."""
    case, bg = _prepared("transformer_tokce", "vmap")
    u, b = case.loss_fn.ggn_factor(bg.logits, bg.targets)
    n_tok = int((case.targets != -100).sum())
    c = bg.logits.shape[-1]
    assert u.shape[0] == case.loss_fn.ggn_rank(bg.logits) == bg.logits.shape[1] * (c - 1)
    K = bg.jac.rows(u).gram()
    ev = torch.linalg.eigvalsh(K)
    assert int((ev > ev.max() * K.shape[0] * EPS64).sum()) == n_tok * (c - 1) == int(torch.linalg.matrix_rank(_dense_G("transformer_tokce")[0]))


def _rank_deficient(loss: str):
    """More factor rows than parameters: the dual Gram R R^T is singular."""
    gen = torch.Generator().manual_seed(71)
    model = nn.Linear(2, 3 if loss == "ce" else 2).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    if loss == "ce":
        y, fn = torch.randint(0, 3, (7,), generator=gen), CrossEntropy()
    else:
        y, fn = torch.randn(7, 2, generator=gen, dtype=torch.float64), MSE()
    bg = batch_grads(model, trainable_params(model), x, y, fn, jacobian="vmap")
    plain = ref.plain_loss("cross_entropy" if loss == "ce" else "mse")
    return ref.linear_ggn(x, bg.logits, y, plain), bg


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_exact_ngd_pseudo_inverse_limit_on_a_singular_dual(loss):
    """N*K = 14 rows for P = 9 or 6 parameters: R R^T is singular, b is not in its range.
    lam = 0 must give the minimum-norm G^+ g, lam = 1e-12 the same to round-off."""
    G, bg = _rank_deficient(loss)
    assert bg.n * bg.loss_fn.ggn_rank(bg.logits) > G.shape[0]
    pinv = torch.linalg.pinv(G, hermitian=True) @ bg.g
    for lam in (0.0, 1e-12):
        d = directions.ngd(bg, lam, method="exact")
        assert ref.rel_err(d, pinv) < 1e-9, lam
    assert ref.rel_err(directions.ngd(bg, 1e-3, method="exact"), ref.ngd_dense(G, bg.g, 1e-3)) < 1e-12


def test_auto_switches_to_cg_above_the_row_limit_and_reports_it():
    case, bg = _prepared("mlp_ce", "vmap")
    G, _, _ = _dense_G("mlp_ce")
    d, info = directions.ngd(bg, 1e-2, exact_max_rows=bg.n, return_info=True)  # 18 rows > 6
    assert int(info.iterations) > 0  # CG ran
    assert bool(info.converged)
    assert ref.rel_err(d, ref.ngd(G, bg.g, 1e-2)) < 1e-7


# ---------------------------------------------------------------- CG diagnostics


def test_cg_reports_its_true_residual_when_capped():
    """A CG stopped by maxiter says so, with ||b - A x|| / ||b|| of the x it returns."""
    case, bg = _prepared("transformer_tokce", "vmap")
    G, _, _ = _dense_G("transformer_tokce")
    lam = 1e-6
    d, info = directions.ngd(bg, lam, method="cg", maxiter=5, return_info=True)
    true_res = float((G @ d + lam * d - bg.g).norm() / bg.g.norm())
    assert int(info.iterations) == 5
    assert not bool(info.converged)
    assert float(info.residual) == pytest.approx(true_res, rel=1e-9)
    assert true_res > 1e-3  # really not converged
    floats = info.as_floats()
    assert floats == {"cg_iterations": 5, "cg_residual": pytest.approx(true_res, rel=1e-9), "cg_converged": False}


def test_cg_without_host_reads_gives_the_same_answer():
    """check_every=None runs all maxiter iterations with device-side masks: after
    convergence x stops changing, so the answer and the count equal the early-exit run."""
    case, bg = _prepared("mlp_ce", "vmap")

    def mv(v):
        return ggn_vp(bg.jac, bg.loss_fn, bg.targets, v) + 1e-2 * v

    x1, i1 = conjugate_gradient(mv, bg.g, tol=1e-10, maxiter=200, check_every=10)
    x2, i2 = conjugate_gradient(mv, bg.g, tol=1e-10, maxiter=200, check_every=None)
    assert torch.equal(x1, x2)
    assert int(i1.iterations) == int(i2.iterations) < 200
    assert bool(i1.converged) and bool(i2.converged)
    # b = 0: x = 0, no iteration, residual 0.
    x0, i0 = conjugate_gradient(mv, torch.zeros_like(bg.g), maxiter=7, check_every=None)
    assert torch.equal(x0, torch.zeros_like(bg.g)) and int(i0.iterations) == 0 and float(i0.residual) == 0.0


# ---------------------------------------------------------------- the Gram solve's fallbacks


def _singular():
    J = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 1.0, 0.0, -1.0], [1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    return J, J @ J.T, torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)


def test_branch_free_fallback_floors_the_damping():
    """At damping 0 on an exactly singular Gram Cholesky fails. The accelerator path
    (forced here on the CPU) then solves with the damping raised to
    tau = sqrt(eps) * max diag, picked by torch.where, and says so in `fallback`:
    J^T x is the minimum-norm direction up to tau / eig_min (~1e-7 here)."""
    J, C, s = _singular()
    x, info = solve_gram(C, s, 0.0, dup_threshold=None, branch_free=True)
    assert bool(info.fallback) and torch.isfinite(x).all()
    ev = torch.linalg.eigvalsh(C)
    tau = EPS64**0.5 * float(C.diagonal().max())
    bias = tau / float(ev[ev > 1e-9].min())
    assert 1e-9 < ref.rel_err(J.T @ x, torch.linalg.pinv(J) @ s) < 10 * bias
    # Where Cholesky succeeds both paths give the same bits.
    x1, i1 = solve_gram(C, s, 1e-3, dup_threshold=None, branch_free=True)
    x2, i2 = solve_gram(C, s, 1e-3, dup_threshold=None)
    assert not bool(i1.fallback) and torch.equal(x1, x2)
    assert float(i1.cond) == float(i2.cond)


def test_cpu_fallback_is_the_pseudo_inverse_and_info_is_tensors():
    J, C, s = _singular()
    x, info = solve_gram(C, s, 0.0, dup_threshold=None)
    assert bool(info.fallback)
    assert ref.rel_err(J.T @ x, torch.linalg.pinv(J) @ s) < 1e-12
    for f in (info.residual, info.rows_kept, info.cond, info.fallback):
        assert isinstance(f, torch.Tensor) and f.dim() == 0

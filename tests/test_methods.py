"""The method table (iefcli.core.methods) against the AUTHORS' formulas, written
literally in float64 on the case table.

The authors' convention (the paper-scale meaning of damping and direction):
rows j_n = grad_theta (l_n / N), the per-sample gradients of the MEAN loss (a loop
of torch.autograd.grad here, never the core), s_a = ||dL/dz_n||^2 from the
mean-loss logit gradients, g the mean gradient, and dense solves:

    ief: J_a^T (J_a J_a^T + lam I)^{-1} s_a
    ef:  J_a^T (J_a J_a^T + lam I)^{-1} 1
    sf:  (Jhat_a^T Jhat_a + lam I)^{-1} g        (Jhat_a: rows at sampled labels)
    ngd: (G / N^2 + lam I)^{-1} g                (G the GGN of the SUMMED loss)
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

import reference as ref
from cases import CASE_NAMES, DAMPINGS, make_case
from iefcli.core import batch_grads
from iefcli.core import methods as M
from iefcli.core.methods import MethodOptions, compute_direction

EPS64 = torch.finfo(torch.float64).eps
NO_FILTER = MethodOptions(dup_threshold=None)  # the literal formulas have no duplicate filter


def _params(case):
    return [p for _, p in case.model.named_parameters() if p.requires_grad]


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts]).to(torch.float64)


def authors_rows(case, targets=None):
    """J_a (N, P): row n = grad_theta of the n-th term l_n / N of the MEAN loss, one autograd.grad each."""
    y = case.targets if targets is None else targets
    rows = []
    for n in range(case.n):
        z = case.call(case.sample_inputs(n))[0]
        rows.append(_flat(torch.autograd.grad(case.ref_loss(z, y[n]) / case.n, _params(case))))
    return torch.stack(rows)


def authors_s(case):
    """s_a (N,): ||dL/dz_n||^2 with L the MEAN loss over the batch's logits."""
    with torch.enable_grad():
        z = case.call(case.inputs).detach().requires_grad_(True)
        loss = torch.stack([case.ref_loss(z[n], case.targets[n]) for n in range(case.n)]).mean()
        (gz,) = torch.autograd.grad(loss, z)
    return gz.reshape(case.n, -1).pow(2).sum(1).to(torch.float64)


def gram_form(Ja, b, lam):
    """J_a^T (J_a J_a^T + lam I)^{-1} b by a dense N x N solve, and the system's condition number."""
    A = Ja @ Ja.T + lam * torch.eye(Ja.shape[0], dtype=Ja.dtype)
    return Ja.T @ torch.linalg.solve(A, b), float(torch.linalg.cond(A))


def ridge_form(Ra, g, lam):
    """(Ra^T Ra + lam I)^{-1} g, exactly, through the thin SVD Ra = U S V^T:
    V diag(1 / (S^2 + lam)) V^T g + (g - V V^T g) / lam (well-conditioned at every lam > 0)."""
    _, S, Vh = torch.linalg.svd(Ra, full_matrices=False)
    vg = Vh @ g
    return Vh.T @ (vg / (S * S + lam)) + (g - Vh.T @ vg) / lam


@lru_cache(maxsize=None)
def _prepared(name):
    case = make_case(name, torch.float64)
    bg = batch_grads(case.model, case.params, case.inputs, case.targets, case.loss_fn, jacobian="vmap")
    Ja = authors_rows(case)
    return case, bg, Ja


def _tol(cond):
    return 1e-10 + 100 * EPS64 * cond


@pytest.mark.parametrize("name", CASE_NAMES)
def test_ef_ief_sgd_match_the_authors_formulas(name):
    case, bg, Ja = _prepared(name)
    n = case.n
    s_a = authors_s(case)
    # The convention itself, checked once: s_a = s / N^2 and g = J_a^T 1.
    assert ref.rel_err(s_a, bg.s / n**2) < 1e-12
    d, info = compute_direction("sgd", bg, 0.0)
    assert ref.rel_err(d, Ja.sum(0)) < 1e-12 and info == {}
    for lam in DAMPINGS:
        for name_m, b in (("ief", s_a), ("ef", torch.ones(n, dtype=torch.float64))):
            expect, cond = gram_form(Ja, b, lam)
            if cond > 1e10:  # the literal N x N solve is not trustworthy there (the rows are near-dependent)
                continue
            d, info = compute_direction(name_m, bg, lam, options=NO_FILTER)
            assert d.shape == (case.n_params,) and d.dtype == torch.float64
            assert ref.rel_err(d, expect) < _tol(cond), (name_m, lam, ref.rel_err(d, expect))
            assert set(info) == {"solve_residual", "rows_kept", "cond_estimate", "solve_fallback"}
            assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in info.values())


@pytest.mark.parametrize("name", CASE_NAMES)
def test_sf_matches_the_authors_formula_at_fixed_labels(name):
    case, bg, _ = _prepared(name)
    g = authors_rows(case).sum(0)
    for lam in DAMPINGS:
        seed = 1234
        # The labels compute_direction draws (same sampler, same seed) ...
        yhat = bg.loss_fn.sample(bg.logits, bg.targets, 1, torch.Generator().manual_seed(seed))[0]
        # ... and the authors' rows at those labels: gradients of l_n(yhat_n) / N by a loop.
        Jh_a = authors_rows(case, yhat)
        expect = ridge_form(Jh_a, g, lam)
        d, info = compute_direction("sf", bg, lam, generator=torch.Generator().manual_seed(seed))
        # Woodbury's (g - Jhat^T x) / lam loses ~eps * ||g|| / lam relative to ||d|| where g is near the span.
        tol = 1e-9 + 1e3 * EPS64 * float(g.norm()) / (lam * float(expect.norm()))
        assert ref.rel_err(d, expect) < tol, (lam, ref.rel_err(d, expect))
        if lam >= 1e-2:  # there the plain P x P solve is well-conditioned too
            P = g.shape[0]
            plain = torch.linalg.solve(Jh_a.T @ Jh_a + lam * torch.eye(P, dtype=torch.float64), g)
            assert ref.rel_err(d, plain) < 1e-9
        assert "solve_residual" in info


@lru_cache(maxsize=None)
def _ggn(name):
    return ref.ggn(make_case(name, torch.float64))


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("ngd_method", ["dense", "cg"])
def test_ngd_matches_the_authors_scaling(name, ngd_method):
    case, bg, Ja = _prepared(name)
    n = case.n
    G = _ggn(name)
    g = Ja.sum(0)
    for lam in (1e-2, 1.0):
        A = G / n**2 + lam * torch.eye(G.shape[0], dtype=torch.float64)
        expect = torch.linalg.solve(A, g)
        opts = MethodOptions(ngd_method=ngd_method, cg_tol=1e-12, cg_maxiter=2000)
        d, info = compute_direction("ngd", bg, lam, options=opts)
        assert ref.rel_err(d, expect) < 1e-8 + 100 * EPS64 * float(torch.linalg.cond(A)), (lam, ref.rel_err(d, expect))
        assert set(info) == {"cg_iterations", "cg_residual", "cg_converged"}
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in info.values())


def test_default_dup_filter_drops_a_repeated_sample():
    """Default options filter duplicates (threshold 0.99): a batch with sample 1 a copy of sample 0
    gives the authors' formula on the batch WITHOUT row 1 (its coefficient is zero)."""
    assert MethodOptions().dup_threshold == M.DUP_THRESHOLD == 0.99
    case = make_case("mlp_ce", torch.float64)
    case.inputs[1] = case.inputs[0]
    case.targets[1] = case.targets[0]
    bg = batch_grads(case.model, case.params, case.inputs, case.targets, case.loss_fn, jacobian="vmap")
    Ja, s_a = authors_rows(case), authors_s(case)
    keep = [i for i in range(case.n) if i != 1]
    for lam in (1e-8, 1e-2):
        for name_m, b in (("ief", s_a), ("ef", torch.ones(case.n, dtype=torch.float64))):
            d, info = compute_direction(name_m, bg, lam)
            assert int(info["rows_kept"]) == case.n - 1
            expect, cond = gram_form(Ja[keep], b[keep], lam)
            assert ref.rel_err(d, expect) < _tol(cond), (name_m, lam)


def test_families_are_table_rows():
    for fam in (M.CURVATURE_METHODS, M.GRAM_METHODS, M.BENCH_METHODS, M.EVAL_METHODS):
        assert set(fam) <= set(M.METHODS)
    assert set(M.GRAM_METHODS) < set(M.CURVATURE_METHODS)
    assert "sgd" not in M.CURVATURE_METHODS


def test_errors_and_registration():
    case, bg, _ = _prepared("mlp_ce")
    with pytest.raises(ValueError, match="unknown method 'nope'.*sgd, ef, ief, sf, ngd"):
        compute_direction("nope", bg, 1.0)
    with pytest.raises(ValueError, match="sf needs damping > 0"):
        compute_direction("sf", bg, 0.0)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        compute_direction("ief", bg, -1.0)
    with pytest.raises(ValueError, match="already registered"):
        M.register_method("ief", lambda *a: None)
    seen = {}

    def twice_g(bg, damping, generator, options):
        seen["damping"] = damping
        return 2 * bg.g, {}

    try:
        M.register_method("test-twice", twice_g, damping_power=2, direction_power=1)
        d, _ = compute_direction("test-twice", bg, 0.5)
        assert seen["damping"] == 0.5 * case.n**2
        assert ref.rel_err(d, 2 * case.n * bg.g) < 1e-15
    finally:
        M.METHODS.pop("test-twice", None)


def test_sf_draws_come_from_the_generator():
    _, bg, _ = _prepared("mlp_ce")
    a, _ = compute_direction("sf", bg, 1e-3, generator=torch.Generator().manual_seed(5))
    b, _ = compute_direction("sf", bg, 1e-3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)

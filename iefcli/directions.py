"""Update directions d (the step is theta <- theta - lr * d), as pure functions.

Scale: every direction is for the MEAN batch loss L = (1/N) sum_n l_n, i.e. the
sum-form formula of the paper divided by N; damping lambda is added to the Gram
matrix J J^T (or to the curvature matrix) of the UNSCALED per-sample gradients.
J is N x P, row n = grad_theta l_n; s (N,) with s_n = ||dl_n/dz_n||^2; g (P,)
the mean-loss gradient J^T 1 / N.

- ``sgd(J)``          = J^T 1 / N
- ``ef(J, lam)``      = (J^T J + lam I)^{-1} g          = J^T (J J^T + lam I)^{-1} 1 / N
- ``ief(J, s, lam)``  = J^T (J J^T + lam I)^{-1} s / N
- ``sf(Jhat, g, lam)``= (Jhat^T Jhat + lam I)^{-1} g  = (g - Jhat^T (Jhat Jhat^T + lam I)^{-1} Jhat g) / lam,
  Jhat holding k*N sampled-label gradient rows each scaled by 1/sqrt(k)
- ``ngd(bg, lam)``    = (G + lam I)^{-1} g, G the GGN (= Fisher) of the SUMMED loss: exactly through
  the (N*K) x (N*K) dual system where that is small, else by CG

J may be a dense tensor (any float dtype, any device) or any
:class:`iefcli.core.jacobian.Rows` (e.g. from the fast path). The N x N solves
run in float64 (:func:`iefcli.core.solve.solve_gram`, with the near-duplicate
filter ``dup_threshold``); directions come back in J's dtype on J's device.
With ``return_info=True`` each returns ``(d, SolveInfo)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from iefcli.core.ggn import CGInfo, conjugate_gradient, ggn_matrix, ggn_vp
from iefcli.core.jacobian import BatchGrads, DenseRows, Rows
from iefcli.core.solve import SolveInfo, solve_gram

from iefcli.core.methods import CG_MAXITER, DUP_THRESHOLD as DEFAULT_DUP_THRESHOLD, NGD_EXACT_MAX_ROWS

__all__ = ["sgd", "ef", "ief", "sf", "ngd", "SolveInfo", "CGInfo", "DEFAULT_DUP_THRESHOLD", "NGD_EXACT_MAX_ROWS"]


def _rows(J: Tensor | Rows) -> Rows:
    return DenseRows(J) if isinstance(J, Tensor) else J


def _check_damping(damping: float) -> None:
    if not damping >= 0:
        raise ValueError(f"damping must be >= 0, got {damping}")


def sgd(J: Tensor | Rows) -> Tensor:
    """d = J^T 1 / N, the mean-loss gradient. (P,)"""
    r = _rows(J)
    n = r.n_rows
    ones = torch.full((n,), 1.0 / n, dtype=torch.float64, device=_device(J))
    return r.combine(ones)


def _device(J: Tensor | Rows) -> torch.device:
    return J.device if isinstance(J, Tensor) else J.gram().device


def ef(
    J: Tensor | Rows,
    damping: float,
    *,
    dup_threshold: float | None = DEFAULT_DUP_THRESHOLD,
    return_info: bool = False,
):
    """Empirical Fisher: d = J^T (J J^T + lam I)^{-1} 1 / N = (J^T J + lam I)^{-1} J^T 1 / N. (P,)"""
    _check_damping(damping)
    r = _rows(J)
    gram = r.gram()
    n = r.n_rows
    x, info = solve_gram(gram, torch.ones(n, dtype=torch.float64, device=gram.device), damping, dup_threshold=dup_threshold)
    d = r.combine(x / n)
    return (d, info) if return_info else d


def ief(
    J: Tensor | Rows,
    s: Tensor,
    damping: float,
    *,
    dup_threshold: float | None = DEFAULT_DUP_THRESHOLD,
    return_info: bool = False,
):
    """Improved empirical Fisher: d = J^T (J J^T + lam I)^{-1} s / N. (P,)

    To first order a step -lr*d lowers sample n's loss by lr * s_n / N, what
    gradient descent on its own logits would give it.
    """
    _check_damping(damping)
    r = _rows(J)
    gram = r.gram()
    x, info = solve_gram(gram, s.to(torch.float64), damping, dup_threshold=dup_threshold)
    d = r.combine(x / r.n_rows)
    return (d, info) if return_info else d


def sf(
    J_sampled: Tensor | Rows,
    g: Tensor,
    damping: float,
    *,
    dup_threshold: float | None = None,
    refine: int | None = None,
    return_info: bool = False,
):
    """Sampled Fisher: d = (Jhat^T Jhat + lam I)^{-1} g by Woodbury, lam > 0. (P,)

    ``J_sampled`` holds k*N rows, each a per-sample gradient at a label drawn
    from the model's predictive, scaled by 1/sqrt(k) (see
    :func:`iefcli.core.jacobian.sampled_rows`); ``g`` is the mean-loss gradient.

    The duplicate filter is OFF by default here: repeated draws of the same
    label give identical rows whose multiplicity IS the Monte-Carlo weight
    (dropping them shrinks Jhat^T Jhat, badly for k > 1 with few classes), and
    lam > 0 keeps the Gram solve positive definite anyway.

    Woodbury: d = (g - Jhat^T x) / lam with (Jhat Jhat^T + lam I) x = Jhat g.
    When g lies (almost) in the span of the sampled rows (a confident model:
    the sampled labels are the true ones, and g is their mean), the true
    g - Jhat^T x is O(lam) and the subtraction keeps only what x gets right
    beyond relative accuracy lam / ||Jhat Jhat^T||. A Gram that is not the
    exact Gram of the rows that ``dot``/``combine`` apply (the fast path builds
    float32 models' Gram blocks to ~5e-9 relative, while J v and J^T x agree
    with each other to 1e-16) then gives garbage, including d^T g < 0 (seen at
    lam = 1e-7 on a float32 LoRA transformer; 22% off with d^T g < 0 on the
    float32 test CNN at lam = 1e-9). So x is refined ``refine`` times against
    the rows themselves: r = Jhat g - Jhat (Jhat^T x) - lam x (one J^T x and
    one J v, float64), x += (C + lam I)^{-1} r. Each round shrinks the error by
    ||C - Jhat Jhat^T|| / (eig_min(C) + lam), independent of lam; a round that
    would not shrink the residual is not taken (torch.where, no host read).
    ``refine=None`` (default) refines once where the Gram can disagree with the
    rows: rows not held densely (the fast path) of a float32/16 model. Dense rows
    compute Gram, J v and J^T x from the same float64 matrix, and float64 fast
    blocks agree to ~1e-16, so there it is 0 (a round costs two J v and one J^T x:
    1.5-3x the solve-and-combine part of an SF step on the 1.1M-parameter bench MLP).
    """
    if not damping > 0:
        raise ValueError(f"sf needs damping > 0 (it divides by it), got {damping}")
    r = _rows(J_sampled)
    if refine is None:
        refine = 0 if isinstance(r, DenseRows) or g.dtype == torch.float64 else 1
    gram = r.gram()
    jg = r.dot(g)  # apply Jhat: g -> Jhat g, (M,)
    x, info = solve_gram(gram, jg, damping, dup_threshold=dup_threshold)
    jtx = r.combine(x, dtype=torch.float64)
    for _ in range(refine):
        res = jg - r.dot(jtx) - damping * x
        if dup_threshold:  # dropped rows stay dropped
            res = res * (x != 0)
        dx, _ = solve_gram(gram, res, damping, dup_threshold=dup_threshold)
        dj = r.combine(dx, dtype=torch.float64)
        # The new residual is res - (J J^T + lam) dx; its J J^T dx part is J dj: one more J v.
        new_res = res - r.dot(dj) - damping * dx
        better = torch.linalg.vector_norm(new_res) < torch.linalg.vector_norm(res)
        x = torch.where(better, x + dx, x)
        jtx = torch.where(better, jtx + dj, jtx)
    # g - Jhat^T x cancels when g lies almost in the rows' span: subtract in float64, round once.
    d = ((g.to(torch.float64) - jtx) / damping).to(g.dtype)
    return (d, info) if return_info else d


# Largest dual system (rows = N * loss.ggn_rank) that method="auto" solves exactly.


def ngd(
    bg: BatchGrads,
    damping: float,
    *,
    method: str = "auto",
    tol: float | None = None,
    maxiter: int = CG_MAXITER,
    exact_max_rows: int = NGD_EXACT_MAX_ROWS,
    check_every: int | None = 10,
    return_info: bool = False,
):
    """Natural gradient d = (G + lam I)^{-1} g, G the GGN of the SUMMED loss.

    ``method="exact"``: the dual system, in float64, exact down to lam = 0
    (derivation below). ``"cg"``: matrix-free conjugate gradients on the
    P-vector (tolerance ``tol`` on the relative residual, default 1e-10 in
    float64 and 1e-5 in float32; at most ``maxiter`` iterations; one host read
    per ``check_every`` iterations, None for none). ``"auto"`` (default):
    exact when N * K <= ``exact_max_rows`` (K = ``loss_fn.ggn_rank``: C-1 for
    softmax CE, T*(C-1) for token CE, the output size for MSE), else CG.
    ``"dense"``: forms G (P x P) and solves in float64; tiny models only.
    The info (``return_info=True``) is a :class:`CGInfo` of 0-d tensors: CG's
    iterations and true final residual, or for exact/dense 0 iterations and the
    relative residual ||(G + lam I) d - g|| / ||g||.

    Derivation of the exact solve. Factor each sample's output Hessian
    H_n = L_n^T L_n with L_n of K rows and pick b_n with L_n^T b_n = dl_n/dz_n
    (``loss_fn.ggn_factor``: softmax CE uses C-1 rows -(sqrt(p) * q_k) with
    q_k an orthonormal basis of sqrt(p)'s complement and b_nk = q_k[y_n] /
    sqrt(p_{y_n}); MSE uses L = I and b = the residual). Let R be the (N*K) x P
    matrix with rows r_{kn} = Jz_n^T L_n[k] (per-sample gradients at the
    cotangents L_n[k]: ``jac.rows``, so the fast path serves it too). Then
        G = sum_n Jz_n^T L_n^T L_n Jz_n = R^T R,
        g = (1/N) sum_n Jz_n^T dl_n/dz_n = (1/N) sum_n Jz_n^T L_n^T b_n = R^T b / N,
    and by the push-through identity (R^T R + lam I) R^T = R^T (R R^T + lam I),
        (G + lam I)^{-1} g = R^T (R R^T + lam I)^{-1} b / N.
    Only the (N*K) x (N*K) Gram R R^T is solved (float64, eigen-decomposition;
    eigenvalues at float64 round-off, M * eps * max, are treated as zero), and
    nothing is subtracted, so small lam costs no accuracy. As lam -> 0 this is
    R^T (R R^T)^+ b / N = R^+ b / N = (R^T R)^+ R^T b / N = G^+ g, the
    minimum-norm natural gradient, which is what lam = 0 returns. On CUDA the
    eigen-decomposition synchronises with the host once per call
    (torch.linalg.eigh has no sync-free variant); EF/iEF/SF do not.
    """
    _check_damping(damping)
    g = bg.g
    if method == "auto":
        rank = getattr(bg.loss_fn, "ggn_rank", None)
        method = "exact" if rank is not None and bg.n * rank(bg.logits) <= exact_max_rows else "cg"
    if method == "exact":
        d, info = _ngd_exact(bg, damping)
    elif method == "dense":
        G = ggn_matrix(bg.jac, bg.loss_fn, bg.targets)
        A = G + damping * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        g64 = g.to(torch.float64)
        d64 = torch.linalg.pinv(A, hermitian=True) @ g64 if damping == 0 else torch.linalg.solve(A, g64)
        d = d64.to(g.dtype)
        res = torch.linalg.vector_norm(A @ d64 - g64) / torch.linalg.vector_norm(g64)
        info = CGInfo(torch.zeros((), dtype=torch.int64, device=g.device), res, res <= 1e-8)
    elif method == "cg":
        if tol is None:
            tol = 1e-10 if g.dtype == torch.float64 else 1e-5

        def matvec(v: Tensor) -> Tensor:
            return ggn_vp(bg.jac, bg.loss_fn, bg.targets, v) + damping * v

        d, info = conjugate_gradient(matvec, g, tol=tol, maxiter=maxiter, check_every=check_every)
    else:
        raise ValueError(f"unknown ngd method {method!r}; choose auto, exact, cg or dense")
    return (d, info) if return_info else d


def _ngd_exact(bg: BatchGrads, damping: float) -> tuple[Tensor, CGInfo]:
    """R^T (R R^T + lam I)^{+} b / N; see :func:`ngd`."""
    u, b = bg.loss_fn.ggn_factor(bg.logits, bg.targets)  # (K, N, ...), (K, N) float64
    rows = bg.jac.rows(u)  # K*N rows, k-major: row k*N + n, as b.reshape(-1)
    rhs = b.reshape(-1) / bg.n
    gram = rows.gram().to(torch.float64)
    m = gram.shape[0]
    evals, evecs = torch.linalg.eigh(gram)
    cut = evals.abs().max() * m * torch.finfo(torch.float64).eps
    live = evals > cut
    inv = torch.where(live, 1.0 / (evals.clamp_min(cut) + damping), torch.zeros_like(evals))
    y = evecs @ (inv * (evecs.T @ rhs))
    d64 = rows.combine(y, dtype=torch.float64)
    # Residual of the primal system through R: (G + lam I) d - g = R^T ((R R^T + lam I) y - b / N).
    g64 = rows.combine(rhs, dtype=torch.float64)
    r64 = rows.combine(gram @ y + damping * y - rhs, dtype=torch.float64)
    gnorm = torch.linalg.vector_norm(g64)
    res = torch.linalg.vector_norm(r64) / torch.where(gnorm > 0, gnorm, torch.ones_like(gnorm))
    ok = torch.isfinite(d64).all() & (res <= 1e-8)
    its = torch.zeros((), dtype=torch.int64, device=gram.device)
    return d64.to(bg.g.dtype), CGInfo(its, res, ok)

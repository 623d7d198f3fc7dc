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
- ``ngd(bg, lam)``    = (G + lam I)^{-1} g, G the GGN (= Fisher) of the SUMMED loss, by CG or densely

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

DEFAULT_DUP_THRESHOLD = 0.99

__all__ = ["sgd", "ef", "ief", "sf", "ngd", "SolveInfo", "CGInfo", "DEFAULT_DUP_THRESHOLD"]


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
    """
    if not damping > 0:
        raise ValueError(f"sf needs damping > 0 (it divides by it), got {damping}")
    r = _rows(J_sampled)
    gram = r.gram()
    jg = r.dot(g)  # apply Jhat: g -> Jhat g, (M,)
    x, info = solve_gram(gram, jg, damping, dup_threshold=dup_threshold)
    # g - Jhat^T x cancels when g lies almost in the rows' span: subtract in float64, round once.
    d = ((g.to(torch.float64) - r.combine(x, dtype=torch.float64)) / damping).to(g.dtype)
    return (d, info) if return_info else d


def ngd(
    bg: BatchGrads,
    damping: float,
    *,
    method: str = "cg",
    tol: float | None = None,
    maxiter: int = 500,
    return_info: bool = False,
):
    """Exact natural gradient d = (G + lam I)^{-1} g, G the GGN of the summed loss.

    ``method="cg"``: matrix-free conjugate gradients with G-vector products from
    jvp/vjp (tolerance ``tol`` on the relative residual, default 1e-10 in
    float64 and 1e-5 in float32; at most ``maxiter`` iterations).
    ``method="dense"``: forms G (P x P) and solves in float64; tiny models only.
    With lam = 0 the dense path uses the pseudo-inverse (the minimum-norm solution).
    """
    _check_damping(damping)
    g = bg.g
    if method == "dense":
        G = ggn_matrix(bg.jac, bg.loss_fn, bg.targets)
        A = G + damping * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        g64 = g.to(torch.float64)
        d64 = torch.linalg.pinv(A, hermitian=True) @ g64 if damping == 0 else torch.linalg.solve(A, g64)
        d = d64.to(g.dtype)
        info = CGInfo(0, float(torch.linalg.vector_norm(A @ d64 - g64) / torch.linalg.vector_norm(g64)), True)
    elif method == "cg":
        if tol is None:
            tol = 1e-10 if g.dtype == torch.float64 else 1e-5

        def matvec(v: Tensor) -> Tensor:
            return ggn_vp(bg.jac, bg.loss_fn, bg.targets, v) + damping * v

        d, info = conjugate_gradient(matvec, g, tol=tol, maxiter=maxiter)
    else:
        raise ValueError(f"unknown ngd method {method!r}; choose cg or dense")
    return (d, info) if return_info else d

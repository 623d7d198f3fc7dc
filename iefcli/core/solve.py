"""The N x N damped Gram solve shared by EF, iEF and SF, in float64.

Given the Gram matrix C = R R^T of M gradient rows R (M x P), a right-hand side
b (M,) and damping lambda >= 0, :func:`solve_gram` returns x with
(C_KK + lambda I) x_K = b_K on the kept rows K and x = 0 on dropped rows, so
that R^T x = R_K^T (R_K R_K^T + lambda I)^{-1} b_K.

Rows are dropped (when ``dup_threshold`` is set) as the authors do: of any pair
of rows with |cosine| > threshold, the smaller-norm one (ties: the later one);
all-zero rows are dropped too. Dropped rows are replaced by identity rows and
columns instead of being cut out, so shapes stay static and nothing waits on
the host to learn how many rows survived.

Cholesky first (``torch.linalg.cholesky_ex``: no error check, so no host
read). If it fails (the kept Gram plus damping is not positive definite in
float64, i.e. the damping is below float64 round-off of a singular Gram), the
fallback depends on where the tensors live:

- on the CPU, a symmetric eigen-decomposition with the pseudo-inverse
  (eigenvalues below M * eps * max|eig| treated as zero): the minimum-norm
  solution. Choosing it reads the Cholesky flag, which on the CPU is a plain
  memory read, not a device synchronisation, and the eigen-decomposition runs
  only when Cholesky failed.
- on an accelerator, nothing waits on the device: the flag selects, by
  ``torch.where``, between the Cholesky solve and a second Cholesky solve with
  the damping raised to tau = sqrt(eps) * max_i (C_KK)_ii (~1.5e-8 relative).
  On a singular Gram that is a regularised minimum-norm solution: the range
  part is off by lambda_i / (lambda_i + tau), and the null part of the
  right-hand side, amplified by 1 / tau, meets R^T only through round-off
  (~eps / sqrt(eps) relative). A smaller floor would let that part through: at
  tau = M * eps * trace the direction was 4% off on a 3 x 3 example.
  ``torch.linalg.eigh`` is not used there: it synchronises with the host on CUDA.
  ``branch_free=True`` selects this path on the CPU too (tests).

A Gram or right-hand side with a NaN/Inf entry (NaN in the per-sample gradients) gives an
all-NaN x on every path and never raises: the training loop rejects that step as a bad step.

Fixed cost: at M = 32..128 Cholesky + solve take ~0.02 ms and the call is mostly one small
torch op after another (a few microseconds each), so the code keeps their number down: the
duplicate test ranks the rows once (two argsorts) instead of comparing norms pairwise, forms
|cos| in one buffer in place, and reduces it with one amax; the masked system is one product
and two in-place diagonal adds; on the CPU one host read decides everything in the common
case (Cholesky succeeded, every number finite; ``tools/bench_solve.py`` times it against the
replaced implementation, and ``tests/test_solve.py`` checks it gives the same values).

Why not always the eigen-decomposition: float64 on one CPU core, Cholesky +
solve vs eigh + solve takes 0.027 vs 0.110 ms at M = 32, 0.18 vs 1.4 ms at
M = 128 and 7.0 vs 46 ms at M = 512 (6-8x), and it would sync on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SolveInfo:
    """Diagnostics of one damped Gram solve (0-d tensors, on the solve's device).

    residual:   ||(C_KK + lambda I) x_K - b_K|| / ||b_K||  (relative residual)
    rows_kept:  |K|, rows left after duplicate filtering
    cond:       condition estimate of C_KK + lambda I (from the Cholesky
                diagonal: (max L_ii / min L_ii)^2, a lower bound; exact
                max/min eigenvalue when the CPU eigen fallback ran)
    fallback:   True when Cholesky failed and a fallback (see the module doc) was used

    Every field is a 0-d tensor on the solve's device; only :meth:`as_floats`
    reads the host.
    """

    residual: Tensor
    rows_kept: Tensor
    cond: Tensor
    fallback: Tensor

    def as_floats(self) -> dict[str, float]:
        """Host-side numbers for logging (this is where the sync belongs)."""
        return {
            "solve_residual": float(self.residual),
            "rows_kept": int(self.rows_kept),
            "cond_estimate": float(self.cond),
            "solve_fallback": bool(self.fallback),
        }


_TINY = torch.finfo(torch.float64).tiny
_EPS = torch.finfo(torch.float64).eps


def duplicate_mask(gram: Tensor, threshold: float | None) -> Tensor:
    """Bool (M,) mask of rows to KEEP.

    Row i is dropped when it is all-zero, or when some row j has
    |cos(i, j)| > threshold and a larger norm (or the same norm and j < i).
    ``threshold`` None or 0 keeps every non-zero row.
    """
    norms2 = torch.diagonal(gram)
    nonzero = norms2 > 0
    m = gram.shape[0]
    if not threshold or m == 0:
        return nonzero
    norms = norms2.clamp_min(torch.finfo(gram.dtype).tiny).sqrt_()
    # j "beats" i when it is larger, or equal and earlier: when j comes first in a stable
    # descending sort. Weights w = m - (place in that order), 0 for an all-zero (or NaN) row,
    # which beats no row: j beats i iff w_j > w_i.
    place = torch.argsort(norms, descending=True, stable=True).argsort()
    w = (m - place).mul_(nonzero)
    # cos_ij = C_ij / (n_i n_j), formed in place; |cos_ij| > threshold becomes 1.0 or 0.0 (NaN:
    # 0.0) and is weighted by w_j, so row i's maximum is the weight of the best row it is close
    # to (itself included, |cos_ii| being ~1). Row i is dropped when that row beats it.
    cos = torch.outer(norms, norms)
    torch.div(gram, cos, out=cos)
    best = cos.abs_().gt_(threshold).mul_(w).amax(dim=1)
    return nonzero & (best <= w)


def solve_gram(
    gram: Tensor,
    rhs: Tensor,
    damping: float,
    *,
    dup_threshold: float | None = 0.99,
    branch_free: bool | None = None,
) -> tuple[Tensor, SolveInfo]:
    """Solve (C_KK + damping I) x_K = b_K in float64; x is 0 off K. See module doc.

    ``branch_free``: None (default) branches on the CPU and not elsewhere; True
    forces the accelerator's branch-free fallback on any device.
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    c = gram if gram.dtype == torch.float64 else gram.to(torch.float64)
    b = rhs if rhs.dtype == torch.float64 else rhs.to(torch.float64)
    keep = duplicate_mask(c, dup_threshold)
    # Dropped rows/columns become identity rows/columns with a zero right-hand side: a kept
    # diagonal entry is C_ii + damping, a dropped one (0 + 0) + 1. (The bool mask multiplies
    # and adds as 1.0 / 0.0; `alpha` keeps the damping in float64, where torch.where(keep,
    # damping, 1.0) would make a float32 tensor and round it.)
    a = c * torch.outer(keep, keep)
    torch.diagonal(a).add_(keep, alpha=damping).add_(~keep)
    bk = b * keep

    chol, info = torch.linalg.cholesky_ex(a)
    x = torch.cholesky_solve(bk.unsqueeze(1), chol).squeeze(1)
    lo, hi = torch.aminmax(torch.diagonal(chol))
    cond = (hi / lo) ** 2
    failed = info != 0
    if a.device.type == "cpu" and not branch_free:
        # The common case costs one host read (a CPU memory read, not a device sync): Cholesky
        # succeeded and every number is finite. A sum is finite only if all its terms are, so a
        # finite a.sum() means a finite `a`; a non-finite b_k makes (a x - b)_k, hence the
        # residual's norm, non-finite. info + 0 * a.sum() * norm is then exactly 0.0, and NaN or
        # info != 0 otherwise. (A finite sum that overflows only sends the solve down the general
        # path below.) x needs no masking here: a dropped row of `a` and of its Cholesky factor is
        # e_i and its b_k is 0, so its x_i is computed from exact zeros and is 0.
        rnorm = torch.linalg.vector_norm(torch.mv(a, x).sub_(bk))
        if not bool(torch.addcmul(info, a.sum(), rnorm, value=0.0)):
            resid = rnorm / torch.linalg.vector_norm(bk).clamp_min(_TINY)
            return x, SolveInfo(residual=resid, rows_kept=keep.sum(), cond=cond, fallback=failed)
        # The eigen path runs only when Cholesky failed, and never on a non-finite Gram
        # (NaN/Inf per-sample gradients: eigh would raise; x is made all-NaN below).
        if bool(failed) and bool(torch.isfinite(a).all()):
            evals, evecs = torch.linalg.eigh(a)
            tol = evals.abs().max() * a.shape[0] * _EPS
            inv = torch.where(evals > tol, 1.0 / evals.clamp_min(tol), torch.zeros_like(evals))
            x = evecs @ (inv * (evecs.T @ bk))
            cond = evals.max() / evals.clamp_min(tol).min()
    else:
        # Branch-free: always solve once more with the damping floored at sqrt(eps) * max diag,
        # and pick by the flag. Dropped rows are identity rows either way.
        tau = _EPS**0.5 * torch.diagonal(a).max()
        a_floor = a + torch.diag(keep * (tau - damping).clamp_min(0))
        chol_f, _ = torch.linalg.cholesky_ex(a_floor)
        x_floor = torch.cholesky_solve(bk.unsqueeze(1), chol_f).squeeze(1)
        x = torch.where(failed, x_floor, x)
        diag_f = torch.diagonal(chol_f)
        cond = torch.where(failed, (diag_f.max() / diag_f.min()) ** 2, cond)
    # A non-finite Gram or right-hand side (NaN/Inf per-sample gradients) gives an all-NaN x on
    # every path, so the caller sees a non-finite update and rejects the step (no exception).
    finite = torch.isfinite(a).all() & torch.isfinite(bk).all()
    x = torch.where(finite, x, torch.full_like(x, float("nan")))
    resid = torch.linalg.vector_norm(a @ x - bk) / torch.linalg.vector_norm(bk).clamp_min(_TINY)
    info_out = SolveInfo(residual=resid, rows_kept=keep.sum(), cond=cond, fallback=failed)
    return x * keep, info_out

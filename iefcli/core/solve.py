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


def duplicate_mask(gram: Tensor, threshold: float | None) -> Tensor:
    """Bool (M,) mask of rows to KEEP.

    Row i is dropped when it is all-zero, or when some row j has
    |cos(i, j)| > threshold and a larger norm (or the same norm and j < i).
    ``threshold`` None or 0 keeps every non-zero row.
    """
    norms2 = torch.diagonal(gram)
    nonzero = norms2 > 0
    if not threshold:
        return nonzero
    norms = norms2.clamp_min(torch.finfo(gram.dtype).tiny).sqrt()
    cos = gram / (norms[:, None] * norms[None, :])
    m = gram.shape[0]
    idx = torch.arange(m, device=gram.device)
    # j "beats" i when it is larger, or equal and earlier.
    beats = (norms[None, :] > norms[:, None]) | ((norms[None, :] == norms[:, None]) & (idx[None, :] < idx[:, None]))
    close = (cos.abs() > threshold) & beats & nonzero[None, :]
    close.fill_diagonal_(False)
    return nonzero & ~close.any(dim=1)


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
    c = gram.to(torch.float64)
    b = rhs.to(torch.float64)
    keep = duplicate_mask(c, dup_threshold)
    keepf = keep.to(torch.float64)
    m = c.shape[0]
    eye = torch.eye(m, dtype=torch.float64, device=c.device)
    # Dropped rows/columns become identity rows/columns with a zero right-hand side.
    # (Built from keepf, not torch.where(keep, damping, 1.0): that makes a float32
    # tensor and would round the damping to float32.)
    a = c * keepf[:, None] * keepf[None, :] + eye * (keepf * damping + (1.0 - keepf))
    bk = b * keepf

    chol, info = torch.linalg.cholesky_ex(a)
    failed = info != 0
    x = torch.cholesky_solve(bk.unsqueeze(1), chol).squeeze(1)
    diag = torch.diagonal(chol)
    cond = (diag.max() / diag.min()) ** 2
    if a.device.type == "cpu" and not branch_free:
        # A CPU memory read, not a device sync: the eigen path runs only when needed, and never on a
        # non-finite Gram (NaN/Inf per-sample gradients: eigh would raise; x stays non-finite below).
        if bool(failed) and bool(torch.isfinite(a).all()):
            evals, evecs = torch.linalg.eigh(a)
            tol = evals.abs().max() * m * torch.finfo(torch.float64).eps
            inv = torch.where(evals > tol, 1.0 / evals.clamp_min(tol), torch.zeros_like(evals))
            x = evecs @ (inv * (evecs.T @ bk))
            cond = evals.max() / evals.clamp_min(tol).min()
    else:
        # Branch-free: always solve once more with the damping floored at sqrt(eps) * max diag,
        # and pick by the flag. Dropped rows are identity rows either way.
        tau = torch.finfo(torch.float64).eps ** 0.5 * torch.diagonal(a).max()
        a_floor = a + torch.diag(keepf * (tau - damping).clamp_min(0))
        chol_f, _ = torch.linalg.cholesky_ex(a_floor)
        x_floor = torch.cholesky_solve(bk.unsqueeze(1), chol_f).squeeze(1)
        x = torch.where(failed, x_floor, x)
        diag_f = torch.diagonal(chol_f)
        cond = torch.where(failed, (diag_f.max() / diag_f.min()) ** 2, cond)
    # A non-finite Gram or right-hand side (NaN/Inf per-sample gradients) gives an all-NaN x on
    # every path, so the caller sees a non-finite update and rejects the step (no exception).
    finite = torch.isfinite(a).all() & torch.isfinite(bk).all()
    x = torch.where(finite, x, torch.full_like(x, float("nan")))
    resid = torch.linalg.vector_norm(a @ x - bk) / torch.linalg.vector_norm(bk).clamp_min(torch.finfo(torch.float64).tiny)
    info_out = SolveInfo(residual=resid, rows_kept=keep.sum(), cond=cond, fallback=failed)
    return x * keepf, info_out

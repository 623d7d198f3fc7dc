"""Generalised Gauss-Newton products, matrix-free, and conjugate gradients.

G = sum_n Jz_n^T H_n Jz_n is the GGN of the SUMMED loss (for softmax CE and
MSE it equals the Fisher). It is never formed for real models:
G v = vjp( H jvp(v) ):  apply Jz to v (jvp), then each sample's logit Hessian
H_n (closed form), then Jz^T (vjp). :func:`ggn_matrix` forms G densely for tiny
models (tests, the 2-parameter toy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from iefcli.core.jacobian import DenseRows, OutputJacobian
from iefcli.core.losses import Loss
from iefcli.core.methods import CG_MAXITER


def ggn_vp(jac: OutputJacobian, loss_fn: Loss, targets: Tensor, v: Tensor) -> Tensor:
    """G v for the summed loss, (P,) -> (P,)."""
    jv = jac.jvp(v)  # apply Jz: v -> Jz v, (N, ...)
    hjv = loss_fn.hvp(jac.logits.detach(), targets, jv)  # apply H_n per sample
    return jac.vjp(hjv)  # apply Jz^T


def ggn_quadratic(jac: OutputJacobian, loss_fn: Loss, targets: Tensor, v: Tensor) -> Tensor:
    """v^T G v (summed loss) from one jvp: sum_n (Jz_n v)^T H_n (Jz_n v)."""
    jv = jac.jvp(v)
    hjv = loss_fn.hvp(jac.logits.detach(), targets, jv)
    return (jv.to(torch.float64) * hjv.to(torch.float64)).sum()


def ggn_matrix(jac: OutputJacobian, loss_fn: Loss, targets: Tensor) -> Tensor:
    """Dense G (P x P, float64) for tiny models: rows of Jz for every logit, then sum_n Jz_n^T H_n Jz_n."""
    z = jac.logits.detach()
    n = z.shape[0]
    d = z[0].numel()
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    u = eye.reshape(d, 1, *z.shape[1:]).expand(d, n, *z.shape[1:])  # one-hot cotangents
    rows = jac.rows(u)  # (d*N, P), row (i, n) = Jz_n^T e_i
    if isinstance(rows, DenseRows):
        mat = rows.matrix.to(torch.float64)
    else:  # rows that are not held densely (fast path): read each row out as R^T e_m
        eye_m = torch.eye(rows.n_rows, dtype=torch.float64, device=z.device)
        mat = torch.stack([rows.combine(e).to(torch.float64) for e in eye_m])
    jz = mat.reshape(d, n, -1).transpose(0, 1)  # (N, d, P)
    h = loss_fn.hessian(z, targets).to(torch.float64)  # (N, d, d)
    return torch.einsum("nip,nij,njq->pq", jz, h, jz)


@dataclass(frozen=True)
class CGInfo:
    """Diagnostics of one iterative (or exact) NG solve: 0-d tensors on the solve's device.

    iterations: CG iterations that changed x (0 for the exact dual solve)
    residual:   ||A x - b|| / ||b|| at exit, A the matrix that was solved
                (CG: G + lam I on the P-vector; exact: the dual (N*K) x (N*K) system)
    converged:  residual <= 10 * tol (CG); True when the exact solve's residual is
                below 1e-8 (it is ~1e-15 unless the system is singular to float64)

    Only :meth:`as_floats` reads the host.
    """

    iterations: Tensor
    residual: Tensor
    converged: Tensor

    def as_floats(self) -> dict[str, float]:
        return {
            "cg_iterations": int(self.iterations),
            "cg_residual": float(self.residual),
            "cg_converged": bool(self.converged),
        }


def conjugate_gradient(
    matvec, b: Tensor, *, tol: float = 1e-10, maxiter: int = CG_MAXITER, check_every: int | None = 10
) -> tuple[Tensor, CGInfo]:
    """Solve A x = b for symmetric positive (semi-)definite A given v -> A v, in b's dtype.

    Host reads: none inside an iteration. Every iteration is computed with
    device-side masks: once ||r|| <= tol * ||b|| (or the curvature p^T A p
    vanishes, or b = 0), the step size is 0 and x, r, p stop changing.
    ``check_every`` k: every k iterations ONE flag is read back to stop early
    when every entry has converged (a host sync per k iterations); None runs
    exactly ``maxiter`` iterations with no host read at all (static work, for
    accelerators and graphs). The final residual is recomputed from one more
    matvec, so it is the true ||b - A x|| / ||b||, not the recursive one.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = torch.dot(r, r)
    bnorm = torch.linalg.vector_norm(b)
    thresh = (tol * bnorm) ** 2
    done = rs <= thresh  # b = 0: nothing to do
    its = torch.zeros((), dtype=torch.int64, device=b.device)
    zero = torch.zeros((), dtype=b.dtype, device=b.device)
    for it in range(1, maxiter + 1):
        ap = matvec(p)
        pap = torch.dot(p, ap)
        done = done | ~(pap > 0)  # curvature vanished along p: no further progress possible
        alpha = torch.where(done, zero, rs / torch.where(done, torch.ones_like(pap), pap))
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = torch.where(done, rs, torch.dot(r, r))
        its = its + (~done).to(its.dtype)
        done = done | (rs_new <= thresh)
        beta = torch.where(done, zero, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)))
        p = torch.where(done, p, r + beta * p)
        rs = rs_new
        if check_every and it % check_every == 0 and bool(done):  # the one host read per check_every iterations
            break
    safe = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    rel = torch.where(bnorm > 0, torch.linalg.vector_norm(b - matvec(x)) / safe, torch.zeros_like(bnorm))
    return x, CGInfo(its, rel, rel <= tol * 10)

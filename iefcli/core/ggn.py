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
    iterations: int
    residual: float  # ||A x - b|| / ||b|| at exit
    converged: bool


def conjugate_gradient(matvec, b: Tensor, *, tol: float = 1e-10, maxiter: int = 1000) -> tuple[Tensor, CGInfo]:
    """Solve A x = b for symmetric positive (semi-)definite A given v -> A v, in b's dtype.

    Stops when ||r|| <= tol * ||b|| or after maxiter iterations. (The stopping
    test reads the residual norm on the host each iteration: CG is not a hot path.)
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = torch.dot(r, r)
    bnorm = float(torch.linalg.vector_norm(b))
    if bnorm == 0.0:
        return x, CGInfo(0, 0.0, True)
    it = 0
    for it in range(1, maxiter + 1):
        ap = matvec(p)
        pap = torch.dot(p, ap)
        if float(pap) <= 0:  # curvature vanished along p: no further progress possible
            it -= 1
            break
        alpha = rs / pap
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = torch.dot(r, r)
        if float(rs_new.sqrt()) <= tol * bnorm:
            rs = rs_new
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    rel = float(torch.linalg.vector_norm(b - matvec(x))) / bnorm
    return x, CGInfo(it, rel, rel <= tol * 10)

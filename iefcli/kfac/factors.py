"""K-FAC, eK-FAC and ieK-FAC maths for one layer, as pure functions of tensors.

A layer with a rule is seen in its LINEAR FORM: per sample n and position t,
an input row a_nt (d_in, with a trailing 1 when the layer has a trained bias)
and an output gradient e_nt = d l_n / d z_nt (d_out), so that the per-sample
gradient of its (d_out, d_in) weight matrix [W b] is

    J_n = sum_t e_nt a_nt^T          (row-major vec: j_n = sum_t e_nt (x) a_nt)

- Linear (N, d_in): T = 1.  Linear (N, ..., d_in): T = the product of the middle dims.
- Conv2d (groups 1): a_nt = the unfolded input patch at output position t
  (F.unfold order C_in, kh, kw), e_nt the output gradient there; T = H_out W_out.
- Embedding: a_nt = onehot(id_nt) (d_in = V), no bias; the weight (V, D) is the
  TRANSPOSE of the linear form. Its A is diagonal (one-hot rows), kept as a (V,) vector.

Inputs here are ``a`` (N, T, d_in) and ``e`` (N, T, d_out); the caller has
already reshaped (see :mod:`iefcli.kfac.capture`). Everything is pure: no
state, no RNG, no I/O.

Factors (MEAN form, independent of the batch size in expectation):

    expand (default; kfac-pytorch, Eschenhagen et al. 2023 "K-FAC-expand"):
        A = 1/(N T) sum_{n,t} a_nt a_nt^T        G = 1/N sum_{n,t} e_nt e_nt^T
    reduce (Eschenhagen et al. "K-FAC-reduce"; one loss per sequence):
        abar_n = 1/T sum_t a_nt, ebar_n = sum_t e_nt
        A = 1/N sum_n abar_n abar_n^T             G = 1/N sum_n ebar_n ebar_n^T

With T = 1 both are the classic K-FAC factors. The Kronecker approximation of
the SUMMED loss's matrix sum_n j_n j_n^T is N * (G (x) A); on the paper's scale
(per-sample gradients of the MEAN loss, j_n / N, see docs/kfac.md) the matrix
is (1/N^2) sum_n j_n j_n^T ~= (1/N) G (x) A: ``scale = 1/N``.

eK-FAC (George et al. 2018): with A = U_A diag(lam_A) U_A^T and G likewise,
keep the basis U = U_G (x) U_A and re-estimate the diagonal in it,

    S = 1/N sum_n w_n (U_G^T J_n U_A)^2     (elementwise square, (d_out, d_in))

w_n = 1 for eK-FAC, w_n = 1/s_n for ieK-FAC (iEF's scaling; docs/kfac.md). The
preconditioned gradient of a layer is then U_G [ (U_G^T Gr U_A) / (scale S + lam) ] U_A^T.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

EIG_DTYPE = torch.float64  # eigendecompositions (the bases); rotations run in work_dtype

__all__ = [
    "with_bias_column", "kronecker_factors", "per_sample_layer_grads", "projected_second_moment",
    "eigh_factor", "kfac_precondition", "kfac_pi_precondition", "ekfac_precondition", "pi_split",
    "SEQ_MODES",
]

SEQ_MODES = ("expand", "reduce")


def with_bias_column(a: Tensor) -> Tensor:
    """a (..., d) -> (..., d + 1) with a trailing column of ones (the bias's input)."""
    return torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)


def kronecker_factors(a: Tensor, e: Tensor, mode: str = "expand", *, diag_a: bool = False) -> tuple[Tensor, Tensor]:
    """(A, G) in mean form from a (N, T, d_in) and e (N, T, d_out); see the module doc.

    ``diag_a``: return only A's diagonal (V,) (Embedding: one-hot rows, expand only).
    Accumulated in the inputs' dtype (float32 for float32 models, float64 for float64 ones).
    """
    if mode not in SEQ_MODES:
        raise ValueError(f"unknown sequence mode {mode!r}; choose expand or reduce")
    n, t = a.shape[:2]
    if mode == "reduce" and not diag_a:
        abar = a.mean(dim=1)
        ebar = e.sum(dim=1)
        return abar.T @ abar / n, ebar.T @ ebar / n
    a2 = a.reshape(n * t, -1)
    e2 = e.reshape(n * t, -1)
    A = a2.pow(2).sum(dim=0) / (n * t) if diag_a else a2.T @ a2 / (n * t)
    return A, e2.T @ e2 / n


def per_sample_layer_grads(a: Tensor, e: Tensor) -> Tensor:
    """J_n = sum_t e_nt a_nt^T for every n: (N, d_out, d_in). Only for tests and small layers."""
    return torch.einsum("nto,nti->noi", e, a)


def projected_second_moment(
    a: Tensor,
    e: Tensor,
    UA: Tensor | None,
    UG: Tensor,
    weights: Tensor | None = None,
    *,
    chunk_elements: int = 1 << 22,
) -> Tensor:
    """S = 1/N sum_n w_n (U_G^T J_n U_A)^2, (d_out, d_in), from a and e only.

    ``UA`` None means the identity (Embedding's diagonal A). ``weights`` (N,)
    default 1. Rotations first (a_nt U_A and e_nt U_G, cheap), then:
    T = 1: S = (w * e_rot^2)^T (a_rot^2) / N, no per-sample matrix at all;
    T > 1: the per-sample matrices e_rot_n^T a_rot_n of THIS layer, a chunk of
    samples at a time (at most ``chunk_elements`` numbers live), never N x P.
    """
    n, t = a.shape[:2]
    ar = a if UA is None else a @ UA.to(a.dtype)
    er = e @ UG.to(e.dtype)
    w = torch.ones(n, dtype=a.dtype, device=a.device) if weights is None else weights.to(a.dtype)
    if t == 1:
        return (er[:, 0, :].pow(2) * w[:, None]).T @ ar[:, 0, :].pow(2) / n
    d_out, d_in = er.shape[-1], ar.shape[-1]
    step = max(1, chunk_elements // max(1, d_out * d_in))
    S = torch.zeros(d_out, d_in, dtype=a.dtype, device=a.device)
    for i in range(0, n, step):
        blk = torch.einsum("nto,nti->noi", er[i:i + step], ar[i:i + step])  # rotated per-sample grads
        S += torch.einsum("n,noi->oi", w[i:i + step], blk.pow(2))
    return S / n


def eigh_factor(F: Tensor) -> tuple[Tensor | None, Tensor]:
    """(U, eigenvalues) of a symmetric PSD factor in float64, eigenvalues clamped at 0.

    A 1-D factor is a diagonal: (None, its entries) (the identity basis). A factor with
    NaN/Inf (a diverged step) gives the identity and NaN eigenvalues, so the direction is NaN
    and the training loop's bad-step check rejects the step.
    """
    if F.dim() == 1:
        return None, F.to(EIG_DTYPE).clamp_min(0)
    F64 = F.to(EIG_DTYPE)
    if not bool(torch.isfinite(F64).all()):  # a diverged step: let the caller reject it, not eigh raise
        nan = torch.full((F.shape[0],), float("nan"), dtype=EIG_DTYPE, device=F.device)
        return torch.eye(F.shape[0], dtype=EIG_DTYPE, device=F.device), nan
    lam, U = torch.linalg.eigh(0.5 * (F64 + F64.T))
    return U, lam.clamp_min(0)


def work_dtype(grad: Tensor) -> torch.dtype:
    """Dtype of the rotations: the gradient's, at least float32 (float64 for float64 models).

    The O(d^3) products U_G^T Gr U_A are the per-step cost of every method here; float32
    halves it for float32 models while the bases themselves come from float64 eigh."""
    return torch.promote_types(grad.dtype, torch.float32)


def _rotate(grad: Tensor, UG: Tensor, UA: Tensor | None) -> Tensor:
    """U_G^T Gr U_A in :func:`work_dtype`."""
    w = work_dtype(grad)
    x = UG.T.to(w) @ grad.to(w)
    return x if UA is None else x @ UA.to(w)


def _divide(x: Tensor, den: Tensor) -> Tensor:
    """x / den, with 0 where den is 0 (an undamped direction with no curvature: pseudo-inverse).
    NaN stays NaN (a diverged step must show)."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(x), x / torch.where(zero, torch.ones_like(den), den))


def _unrotate(x: Tensor, UG: Tensor, UA: Tensor | None) -> Tensor:
    """U_G X U_A^T."""
    y = UG.to(x.dtype) @ x
    return y if UA is None else y @ UA.T.to(x.dtype)


def kfac_precondition(grad: Tensor, UA: Tensor | None, lamA: Tensor, UG: Tensor, lamG: Tensor,
                      scale: float, damping: float) -> Tensor:
    """(scale * G (x) A + damping I)^{-1} vec(grad), exact Tikhonov damping through the
    eigenbases (no split between factors). grad (d_out, d_in); returns :func:`work_dtype`."""
    x = _rotate(grad, UG, UA)
    x = _divide(x, (scale * lamG[:, None] * lamA[None, :] + damping).to(x.dtype))
    return _unrotate(x, UG, UA)


def pi_split(A: Tensor, G: Tensor, scale: float, damping: float) -> tuple[float, float]:
    """pi-damping (Martens & Grosse 2015, sec. 6.3) of scale*G (x) A + damping I:
    (scale*G + (sqrt(damping)/pi) I) (x) (A + pi sqrt(damping) I), with
    pi = sqrt((tr A / dim A) / (tr(scale G) / dim G)). Returns (damping on A, damping on G).

    A 1-D A is a diagonal. pi falls back to 1 when a trace is zero.
    """
    trA = float(A.sum() if A.dim() == 1 else torch.trace(A)) / A.shape[0]
    trG = scale * float(torch.trace(G)) / G.shape[0]
    pi = math.sqrt(trA / trG) if trA > 0 and trG > 0 else 1.0
    r = math.sqrt(damping)
    return pi * r, r / pi


def kfac_pi_precondition(grad: Tensor, UA: Tensor | None, lamA: Tensor, UG: Tensor, lamG: Tensor,
                         scale: float, damping: float, dA: float, dG: float) -> Tensor:
    """((scale G + dG I) (x) (A + dA I))^{-1} vec(grad) = (scale G + dG)^{-1} Gr (A + dA)^{-1},
    through the eigenbases. dA, dG from :func:`pi_split`."""
    x = _rotate(grad, UG, UA)
    x = _divide(x, ((scale * lamG[:, None] + dG) * (lamA[None, :] + dA)).to(x.dtype))
    return _unrotate(x, UG, UA)


def ekfac_precondition(grad: Tensor, UA: Tensor | None, UG: Tensor, S: Tensor, scale: float, damping: float) -> Tensor:
    """U (scale * diag(S) + damping I)^{-1} U^T vec(grad), U = U_G (x) U_A."""
    x = _rotate(grad, UG, UA)
    x = _divide(x, (scale * S.to(EIG_DTYPE) + damping).to(x.dtype))
    return _unrotate(x, UG, UA)

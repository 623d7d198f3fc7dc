"""Slow, obviously-correct float64 references for the core tests.

Nothing here uses torch.func or iefcli.core: per-sample gradients are a loop
of ``torch.autograd.grad`` on the module itself, Jacobians are one backward
pass per logit, loss Hessians come from ``torch.autograd.functional.hessian``
of the plain ``torch.nn.functional`` loss, and the directions are explicit
P x P formulas. Scale convention as in docs/DESIGN.md: per-sample losses are
unscaled, the batch loss is the MEAN, g = J^T 1 / N, damping is added to the
unscaled J J^T (equivalently J^T J), G is the GGN of the SUMMED loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cases import Case


def _trainable(case: Case) -> list[Tensor]:
    # Same order as iefcli.core.params.trainable_params (named_parameters order).
    return [p for _, p in case.model.named_parameters() if p.requires_grad]


def _flat(ts) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts]).to(torch.float64)


def logits(case: Case) -> Tensor:
    """Batched forward of the module, (N, ...)."""
    with torch.no_grad():
        return case.call(case.inputs)


def per_sample_losses(case: Case) -> Tensor:
    """(N,) l_n by the plain torch.nn.functional loss on each sample's own forward."""
    with torch.no_grad():
        return torch.stack(
            [case.ref_loss(case.call(case.sample_inputs(n))[0], case.targets[n]) for n in range(case.n)]
        ).to(torch.float64)


def per_sample_grads(case: Case, targets: Tensor | None = None) -> Tensor:
    """J (N, P): row n = grad_theta l_n, one forward + autograd.grad per sample."""
    y = case.targets if targets is None else targets
    params = _trainable(case)
    rows = []
    for n in range(case.n):
        z = case.call(case.sample_inputs(n))[0]
        rows.append(_flat(torch.autograd.grad(case.ref_loss(z, y[n]), params)))
    return torch.stack(rows)


def logit_jacobians(case: Case) -> Tensor:
    """Jz (N, D, P): d z_n / d theta, one autograd.grad per logit entry."""
    params = _trainable(case)
    out = []
    for n in range(case.n):
        z = case.call(case.sample_inputs(n))[0].reshape(-1)
        out.append(
            torch.stack([_flat(torch.autograd.grad(z[i], params, retain_graph=True)) for i in range(z.numel())])
        )
    return torch.stack(out)


def logit_grad(case: Case, z: Tensor, y: Tensor) -> Tensor:
    """d l_n / d z_n for every sample (N, ...), by autograd of the plain loss."""
    out = []
    for n in range(z.shape[0]):
        zn = z[n].detach().clone().requires_grad_(True)
        (gz,) = torch.autograd.grad(case.ref_loss(zn, y[n]), zn)
        out.append(gz)
    return torch.stack(out)


def loss_hessians(case: Case, z: Tensor, y: Tensor) -> Tensor:
    """H_n (N, D, D) over the flattened logits, by autograd.functional.hessian."""
    out = []
    for n in range(z.shape[0]):
        shape = z[n].shape
        h = torch.autograd.functional.hessian(lambda v: case.ref_loss(v.reshape(shape), y[n]), z[n].reshape(-1))
        out.append(h)
    return torch.stack(out)


def ggn(case: Case) -> Tensor:
    """Dense G = sum_n Jz_n^T H_n Jz_n (P x P), the GGN of the SUMMED loss."""
    jz = logit_jacobians(case)
    h = loss_hessians(case, logits(case), case.targets).to(torch.float64)
    return sum(jz[n].T @ h[n] @ jz[n] for n in range(case.n))


# ---------------------------------------------------------------- directions (explicit P x P forms)


def sgd(J: Tensor) -> Tensor:
    return J.sum(0) / J.shape[0]


def ef(J: Tensor, lam: float) -> Tensor:
    """(J^T J + lam I)^{-1} g, g = J^T 1 / N, by a dense P x P solve."""
    P = J.shape[1]
    return torch.linalg.solve(J.T @ J + lam * torch.eye(P, dtype=J.dtype), sgd(J))


def ief(J: Tensor, s: Tensor, lam: float) -> Tensor:
    """(J^T J + lam I)^{-1} J^T s / N (push-through of J^T (J J^T + lam I)^{-1} s / N)."""
    P = J.shape[1]
    return torch.linalg.solve(J.T @ J + lam * torch.eye(P, dtype=J.dtype), J.T @ s) / J.shape[0]


def sf(Jhat: Tensor, g: Tensor, lam: float) -> Tensor:
    """(Jhat^T Jhat + lam I)^{-1} g."""
    P = Jhat.shape[1]
    return torch.linalg.solve(Jhat.T @ Jhat + lam * torch.eye(P, dtype=Jhat.dtype), g)


def sf_svd(Jh: Tensor, g: Tensor, lam: float) -> Tensor:
    """(Jh^T Jh + lam I)^{-1} g by the SVD Jh = U S V^T: the range part
    V (S^2 + lam)^{-1} V^T g plus (g - V V^T g) / lam. Accurate for every lam > 0
    up to eps ||g|| / lam absolute error in the second term."""
    _, S, Vh = torch.linalg.svd(Jh, full_matrices=False)
    vg = Vh @ g
    return Vh.T @ (vg / (S * S + lam)) + (g - Vh.T @ vg) / lam


def ridge_svd(J: Tensor, b: Tensor, lam: float) -> Tensor:
    """(J^T J + lam I)^{-1} J^T b by the SVD J = U S V^T: V diag(S / (S^2 + lam)) U^T b.

    Well-conditioned for every lam >= 0 (lam = 0 gives the pseudo-inverse
    J^+ b, singular values below the rank cut-off dropped).
    """
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    cut = S.max() * max(J.shape) * torch.finfo(J.dtype).eps
    f = torch.where(S > cut, S / (S * S + lam), torch.zeros_like(S))
    return Vh.T @ (f * (U.T @ b))


def ngd(G: Tensor, g: Tensor, lam: float) -> Tensor:
    """(G + lam I)^{-1} g on the range of G, by the eigen-decomposition of G:
    sum over eigenvalues e_i above the rank cut-off of v_i v_i^T g / (e_i + lam).

    For these losses g lies in the range of G (g = sum_n Jz_n^T dl_n/dz_n and
    dl_n/dz_n is in the range of H_n), so this is the exact damped solve, and
    lam = 0 gives the pseudo-inverse (minimum-norm) solution G^+ g. Unlike a
    dense solve of the singular-plus-tiny-damping matrix, it is accurate for
    every lam.
    """
    e, V = torch.linalg.eigh(G)
    cut = e.abs().max() * G.shape[0] * torch.finfo(G.dtype).eps
    f = torch.where(e > cut, 1.0 / (e.clamp_min(cut) + lam), torch.zeros_like(e))
    return V @ (f * (V.T @ g))


def ngd_dense(G: Tensor, g: Tensor, lam: float) -> Tensor:
    """(G + lam I)^{-1} g by a plain dense solve (only well-conditioned for larger lam)."""
    return torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype), g)


def gamma(G_sum: Tensor, g: Tensor, d: Tensor, n: int) -> Tensor:
    """sqrt(d^T (G_sum / N) d) / (d^T g)."""
    return torch.sqrt(d @ (G_sum / n) @ d) / (d @ g)


def cos(a: Tensor, b: Tensor) -> float:
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float(a @ b / (a.norm() * b.norm()))


def rel_err(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- small closed-form models


def plain_loss(name: str):
    """A one-sample loss (z_n, y_n) -> scalar written with torch.nn.functional."""
    import torch.nn.functional as F

    if name == "cross_entropy":
        return lambda z, y: F.cross_entropy(z.unsqueeze(0), y.unsqueeze(0), reduction="sum")
    if name == "mse":
        return lambda z, y: 0.5 * F.mse_loss(z, y, reduction="sum")
    raise ValueError(name)


def linear_ggn(x: Tensor, z: Tensor, y: Tensor, loss) -> Tensor:
    """Dense GGN of the summed loss for z_n = W x_n + b (params: W row-major, then b):
    Jz_n = [I kron x_n^T, I] written out, H_n by autograd of the plain ``loss``."""
    d_out = z.shape[1]
    eye = torch.eye(d_out, dtype=torch.float64)
    out = 0
    for n in range(x.shape[0]):
        jz = torch.cat([torch.kron(eye, x[n].to(torch.float64)[None, :]), eye], dim=1)  # (d_out, P)
        h = torch.autograd.functional.hessian(lambda v: loss(v, y[n]), z[n].detach().to(torch.float64))
        out = out + jz.T @ h @ jz
    return out


def module_rows(model, inputs, labels, loss, lengths=None) -> Tensor:
    """(N, P) per-sample gradients by one ordinary forward of the module per sample
    (``model(x_n)``, or ``model(input_ids=ids_n[:, :length_n]).logits`` when ``lengths``
    is given: the sample alone, trimmed, no padding and no mask) and autograd.grad of
    ``loss(z (1, ...), y (1, ...))``. float64."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    rows = []
    for i in range(labels.shape[0]):
        if lengths is None:
            z = model(inputs[i : i + 1])
        else:
            z = model(input_ids=inputs[i : i + 1, : lengths[i]]).logits
        grads = torch.autograd.grad(loss(z, labels[i : i + 1]), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).to(torch.float64))
    return torch.stack(rows)


def check_rows(rf, J: Tensor, tol: float = 1e-12) -> None:
    """Assert that a Rows object equals the dense per-sample gradients J (M, P): its dense matrix,
    Gram, J^T x and J v, and each block's Gram against its own dense twin (float64, rel ``tol``)."""
    assert rel_err(rf.matrix, J) < tol
    assert rel_err(rf.gram(), J @ J.T) < tol
    xs = torch.randn(rf.n_rows, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert rel_err(rf.combine(xs), J.T @ xs) < tol
    v = torch.randn(J.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert rel_err(rf.dot(v), J @ v) < tol
    for blk in getattr(rf, "blocks", []):
        mat = blk.matrix()
        assert rel_err(blk.gram(), mat @ mat.T) < tol, blk.kind


def fast_and_plain(model, inputs, labels):
    """The fast path's and the plain (vmap) path's BatchGrads of the summed cross-entropy on one batch,
    for tests that compare the two paths' Grams."""
    from iefcli.core import trainable_params
    from iefcli.core.jacobian import batch_grads
    from iefcli.core.losses import CrossEntropy

    params = trainable_params(model)
    return tuple(batch_grads(model, params, inputs, labels, CrossEntropy(), jacobian=j) for j in ("fast", "vmap"))

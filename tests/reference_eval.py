"""Dense float64 references for the eval-gamma tests (independent of iefcli.core).

Per-sample gradients are a loop of ``torch.autograd.grad`` on a plain
``torch.nn.functional`` loss, the GGN is sum_n Jz_n^T H_n Jz_n from autograd
Jacobians and Hessians, and every direction is the AUTHORS' formula on the
mean-loss scale (docs/DESIGN.md contract 2, the paper's damping): with J the
unscaled per-sample gradients of a batch of N, J_a = J / N, s_a = s / N^2,

    EF:  J_a^T (J_a J_a^T + lam I)^{-1} 1        iEF: J_a^T (J_a J_a^T + lam I)^{-1} s_a
    SF:  (Jhat_a^T Jhat_a + lam I)^{-1} g          NG:  (G_sum / N^2 + lam I)^{-1} g

(Jhat_a = Jhat / N, Jhat's rows already divided by sqrt(k)); gamma(d) =
sqrt(d^T (G_sum/N) d) / (d^T g). The library's damping IS the paper's
(iefcli.core.methods.compute_direction); before that switch it was added to the
unscaled Gram (N^2 x the paper's), and these formulas then fail.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

F64 = torch.float64


def _flat_fn(params: dict[str, Tensor]):
    names = list(params)
    shapes = [params[k].shape for k in names]
    numels = [params[k].numel() for k in names]

    def unflat(theta):
        return {k: c.view(s) for k, s, c in zip(names, shapes, torch.split(theta, numels))}

    theta0 = torch.cat([params[k].reshape(-1) for k in names]).detach().to(F64)
    return theta0, unflat


def dense_batch(model, params, ref_loss, inputs: Tensor, targets: Tensor):
    """J (N,P), s (N,) = |dl_n/dz_n|^2, g (P,) = mean of J, G_sum (P,P), all float64, by loops of autograd."""
    theta0, unflat = _flat_fn(params)
    p = theta0.numel()
    rows, s, G = [], [], torch.zeros(p, p, dtype=F64)
    for n in range(targets.shape[0]):
        x_n, y_n = inputs[n : n + 1], targets[n]

        def z_of(theta):
            return functional_call(model, unflat(theta), (x_n,))[0]

        theta = theta0.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(ref_loss(z_of(theta), y_n), theta)
        rows.append(grad)
        z = z_of(theta0).detach().requires_grad_(True)
        (gz,) = torch.autograd.grad(ref_loss(z, y_n), z)
        s.append(gz.pow(2).sum())
        jz = jacobian(z_of, theta0).reshape(-1, p)  # (C, P)
        h = hessian(lambda zz: ref_loss(zz, y_n), z.detach()).reshape(jz.shape[0], jz.shape[0])
        G += jz.T @ h @ jz
    J = torch.stack(rows)
    return J, torch.stack(s), J.mean(0), G


def sampled_grads(model, params, ref_loss, inputs: Tensor, yhat: Tensor, k: int) -> Tensor:
    """Per-sample gradients at the sampled labels yhat (k, N, ...), / sqrt(k), k-major."""
    theta0, unflat = _flat_fn(params)
    out = []
    for i in range(k):
        for n in range(inputs.shape[0]):
            theta = theta0.clone().requires_grad_(True)
            z = functional_call(model, unflat(theta), (inputs[n : n + 1],))[0]
            (grad,) = torch.autograd.grad(ref_loss(z, yhat[i, n]), theta)
            out.append(grad / math.sqrt(k))
    return torch.stack(out)


def linear_lsq(theta: Tensor, X: Tensor, y: Tensor):
    """The paper's Figure-1 problem in closed form: z_n = x_n . theta, l_n = 0.5 (z_n - y_n)^2.
    J (N,P) = r_n x_n, s = r^2, g = mean of J, G_sum = X^T X (H = 1)."""
    theta, X, y = theta.to(F64).reshape(-1), X.to(F64), y.to(F64).reshape(-1)
    r = X @ theta - y
    J = r[:, None] * X
    return J, r * r, J.mean(0), X.T @ X


def paper_directions(J: Tensor, s: Tensor, g: Tensor, G_sum: Tensor, lam: float, Jhat: Tensor | None = None) -> dict[str, Tensor]:
    """The authors' formulas at the paper's damping ``lam`` (see the module doc)."""
    n, p = J.shape
    Ja, sa = J / n, s / (n * n)
    eye_n, eye_p = torch.eye(n, dtype=F64), torch.eye(p, dtype=F64)
    gram = Ja @ Ja.T + lam * eye_n
    out = {
        "sgd": g,
        "ef": Ja.T @ torch.linalg.solve(gram, torch.ones(n, dtype=F64)),
        "ief": Ja.T @ torch.linalg.solve(gram, sa),
        "ngd": torch.linalg.solve(G_sum / (n * n) + lam * eye_p, g),
    }
    if Jhat is not None:
        Jh = Jhat / n
        out["sf"] = torch.linalg.solve(Jh.T @ Jh + lam * eye_p, g)
    return out


def gamma(G_sum: Tensor, g: Tensor, d: Tensor, n: int) -> float:
    """sqrt(d^T (G_sum/N) d) / (d^T g)."""
    return float(torch.sqrt(d @ (G_sum / n) @ d) / (d @ g))


def cos(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def imbalance(norms) -> tuple[float, float]:
    """(max/min, mean of the top 10% / mean of the bottom 10%) of a set of norms."""
    x = np.sort(np.asarray(norms, dtype=np.float64))
    k = max(1, math.ceil(0.1 * len(x)))
    return float(x[-1] / x[0]), float(x[-k:].mean() / x[:k].mean())

"""The approximation-quality indicator gamma (no Fisher is inverted).

    gamma(d) = sqrt(d^T G d) / (d^T g)

with g the mean-loss gradient and G the GGN of the MEAN loss (G_sum / N), so
that 1 / (2 gamma^2) is the loss decrease the GGN quadratic model predicts for
the best step size along d. d^T G d comes from one Jacobian-vector product and
the closed-form logit Hessian. gamma is invariant to the scale of d and is
smallest for the exact natural gradient d = G^+ g; ``gamma_ratio`` divides by
gamma(g) (SGD): below 1 is a better approximation to NG than SGD. A direction
with d^T g <= 0 (not a descent direction) gives a non-positive or infinite gamma.
"""

from __future__ import annotations

import torch
from torch import Tensor

from iefcli.core.ggn import ggn_quadratic
from iefcli.core.jacobian import BatchGrads

__all__ = ["gamma", "gamma_ratio", "gamma_from_matrix"]


def gamma(bg: BatchGrads, d: Tensor) -> Tensor:
    """gamma(d) for the batch in ``bg``, a float64 0-d tensor."""
    quad = ggn_quadratic(bg.jac, bg.loss_fn, bg.targets, d) / bg.n
    return quad.clamp_min(0).sqrt() / torch.dot(d.to(torch.float64), bg.g.to(torch.float64))


def gamma_ratio(bg: BatchGrads, d: Tensor) -> Tensor:
    """gamma(d) / gamma(g): below 1 beats SGD."""
    return gamma(bg, d) / gamma(bg, bg.g)


def gamma_from_matrix(G: Tensor, g: Tensor, d: Tensor) -> Tensor:
    """gamma(d) = sqrt(d^T G d) / (d^T g) with an explicit G (tests, tiny models)."""
    d64, g64 = d.to(torch.float64), g.to(torch.float64)
    return (d64 @ G.to(torch.float64) @ d64).clamp_min(0).sqrt() / torch.dot(d64, g64)

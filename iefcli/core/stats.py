"""Per-sample gradient-norm imbalance statistics (the paper's diagnostics)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def imbalance(norms: Tensor, frac: float = 0.1) -> dict[str, Tensor]:
    """max/min and (mean of the largest ``frac``)/(mean of the smallest ``frac``) of positive norms (N,).

    With k = max(1, ceil(frac * N)) samples in each tail. Zero norms give inf.
    """
    x = norms.detach().to(torch.float64).flatten()
    srt, _ = torch.sort(x)
    k = max(1, math.ceil(frac * x.numel()))
    return {
        "max_min": srt[-1] / srt[0],
        "top_bottom": srt[-k:].mean() / srt[:k].mean(),
    }


def batch_imbalance(gram_diag: Tensor, s: Tensor) -> dict[str, Tensor]:
    """Imbalance of per-sample gradient norms (sqrt of the Gram diagonal) and of
    logit-gradient norms (sqrt(s)). Keys: grad_norm_max_min, grad_norm_top10_bottom10,
    logit_grad_norm_max_min, logit_grad_norm_top10_bottom10."""
    gn = imbalance(gram_diag.clamp_min(0).sqrt())
    ln = imbalance(s.clamp_min(0).sqrt())
    return {
        "grad_norm_max_min": gn["max_min"],
        "grad_norm_top10_bottom10": gn["top_bottom"],
        "logit_grad_norm_max_min": ln["max_min"],
        "logit_grad_norm_top10_bottom10": ln["top_bottom"],
    }

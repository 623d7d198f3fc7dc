"""Learning-rate schedules: constant, linear decay, cosine decay, each with linear warm-up."""

from __future__ import annotations

import math


def lr_at(step: int, total: int, base_lr: float, kind: str = "constant", warmup_steps: int = 0,
          min_lr_ratio: float = 0.0) -> float:
    """The lr for 0-based ``step`` of ``total``.

    Warm-up: lr * (step + 1) / warmup_steps for step < warmup_steps. Then
    constant: lr; linear: from lr down to min_lr_ratio * lr at the last step;
    cosine: lr * (m + (1 - m) * (1 + cos(pi * t)) / 2), t in [0, 1] over the
    steps after warm-up.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return base_lr
    span = max(1, total - warmup_steps - 1)
    t = min(1.0, max(0.0, (step - warmup_steps) / span))
    m = min_lr_ratio
    if kind == "linear":
        return base_lr * (1.0 - (1.0 - m) * t)
    if kind == "cosine":
        return base_lr * (m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * t)))
    raise ValueError(f"unknown schedule {kind!r}; choose constant, linear or cosine")

"""Task metrics from predictions, by name, via scikit-learn / scipy.

Names: ``accuracy``; ``f1`` (binary for 2 classes, else macro); ``mcc``
(Matthews correlation); ``pearson`` / ``spearman`` (regression outputs);
``loss`` is added by the evaluator itself. All of them are "higher is
better" except ``loss``.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

METRICS = ("accuracy", "f1", "mcc", "pearson", "spearman")


def compute_metrics(names: tuple[str, ...] | list[str], preds: Tensor, targets: Tensor) -> dict[str, float]:
    """Metrics for predictions (class ids, or real values for pearson/spearman) vs targets.

    Token tasks pass (N, T) tensors; positions where targets == -100 are ignored.
    """
    p = preds.detach().cpu().numpy().reshape(-1)
    t = targets.detach().cpu().numpy().reshape(-1)
    if np.issubdtype(t.dtype, np.integer):
        keep = t != -100
        p, t = p[keep], t[keep]
    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            from sklearn.metrics import accuracy_score

            out[name] = float(accuracy_score(t, p))
        elif name == "f1":
            from sklearn.metrics import f1_score

            binary = len(np.union1d(np.unique(t), np.unique(p))) <= 2 and set(np.unique(t)) <= {0, 1}
            out[name] = float(f1_score(t, p, average="binary" if binary else "macro", zero_division=0))
        elif name == "mcc":
            from sklearn.metrics import matthews_corrcoef

            out[name] = float(matthews_corrcoef(t, p))
        elif name in ("pearson", "spearman"):
            from scipy.stats import pearsonr, spearmanr

            if np.std(p) == 0 or np.std(t) == 0:
                out[name] = 0.0  # undefined correlation of a constant: report no correlation
            else:
                f = pearsonr if name == "pearson" else spearmanr
                out[name] = float(f(p.astype(np.float64), t.astype(np.float64))[0])
        else:
            raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    return out

"""Task metrics against small hand-counted references."""

from __future__ import annotations

import math

import pytest
import torch

from iefcli.train.metrics import compute_metrics


def test_classification_metrics_by_counting():
    t = torch.tensor([1, 1, 1, 0, 0, 0, 1, 0])
    p = torch.tensor([1, 1, 0, 0, 0, 1, 1, 0])
    tp, fp, fn, tn = 3, 1, 1, 3
    m = compute_metrics(["accuracy", "f1", "mcc"], p, t)
    assert m["accuracy"] == pytest.approx((tp + tn) / 8)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert m["mcc"] == pytest.approx(mcc)


def test_multiclass_f1_is_macro_and_padding_ignored():
    t = torch.tensor([[0, 1, -100], [2, 2, -100]])
    p = torch.tensor([[0, 2, 1], [2, 2, 0]])
    m = compute_metrics(["accuracy", "f1"], p, t)
    assert m["accuracy"] == pytest.approx(3 / 4)  # the two padded positions do not count
    # per class F1: class 0: 1; class 1: tp 0 -> 0; class 2: tp 2, fp 1 -> 0.8
    assert m["f1"] == pytest.approx((1 + 0 + 0.8) / 3)


def test_correlations():
    t = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    p = torch.tensor([2.0, 1.0, 4.0, 3.0, 10.0], dtype=torch.float64)
    m = compute_metrics(["pearson", "spearman"], p, t)
    pc, tc = p - p.mean(), t - t.mean()
    assert m["pearson"] == pytest.approx(float((pc @ tc) / (pc.norm() * tc.norm())))
    # ranks of p: 2,1,4,3,5 vs 1..5: d^2 = 1+1+1+1+0 = 4 -> 1 - 6*4/(5*24)
    assert m["spearman"] == pytest.approx(1 - 6 * 4 / (5 * 24))
    assert compute_metrics(["pearson"], torch.ones(4), t[:4])["pearson"] == 0.0
    with pytest.raises(ValueError):
        compute_metrics(["bleu"], p, t)

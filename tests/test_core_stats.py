"""Gradient-norm imbalance statistics against hand-computable examples."""

from __future__ import annotations

import math

import pytest
import torch

import reference as ref
from cases import make_case
from iefcli.core import batch_grads, batch_imbalance, imbalance


def test_imbalance_twenty_norms():
    # norms 1..20 (shuffled): max/min = 20 / 1; 10% of 20 = 2 per tail:
    # (19 + 20) / 2 over (1 + 2) / 2 = 19.5 / 1.5 = 13.
    norms = torch.tensor([float(v) for v in (7, 1, 20, 3, 19, 2, 12, 5, 9, 4, 6, 8, 10, 11, 13, 14, 15, 16, 17, 18)])
    out = imbalance(norms)
    assert float(out["max_min"]) == pytest.approx(20.0, rel=1e-15)
    assert float(out["top_bottom"]) == pytest.approx(13.0, rel=1e-15)


def test_imbalance_small_batch_uses_one_per_tail():
    # N = 5: ceil(0.1 * 5) = 1 sample per tail, so both ratios are max / min = 8 / 0.5.
    out = imbalance(torch.tensor([3.0, 0.5, 2.0, 8.0, 1.0]))
    assert float(out["max_min"]) == pytest.approx(16.0, rel=1e-15)
    assert float(out["top_bottom"]) == pytest.approx(16.0, rel=1e-15)


def test_imbalance_fraction_and_zero_norm():
    # frac 0.25 of 8 norms = 2 per tail: (7 + 9) / 2 over (0.5 + 1) / 2.
    norms = torch.tensor([1.0, 9.0, 2.0, 0.5, 3.0, 7.0, 4.0, 5.0])
    out = imbalance(norms, frac=0.25)
    assert float(out["top_bottom"]) == pytest.approx(8.0 / 0.75, rel=1e-15)
    assert float(out["max_min"]) == pytest.approx(18.0, rel=1e-15)
    assert math.isinf(float(imbalance(torch.tensor([0.0, 1.0, 2.0]))["max_min"]))


def test_batch_imbalance_keys_and_values():
    grad_norms = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    logit_norms = torch.tensor([0.1, 0.3, 0.2, 0.9], dtype=torch.float64)
    out = batch_imbalance(grad_norms**2, logit_norms**2)  # takes squared norms (Gram diagonal, s)
    assert set(out) == {"grad_norm_max_min", "grad_norm_top10_bottom10",
                        "logit_grad_norm_max_min", "logit_grad_norm_top10_bottom10"}
    assert float(out["grad_norm_max_min"]) == pytest.approx(8.0, rel=1e-12)
    assert float(out["grad_norm_top10_bottom10"]) == pytest.approx(8.0, rel=1e-12)  # N=4: one per tail
    assert float(out["logit_grad_norm_max_min"]) == pytest.approx(9.0, rel=1e-12)
    assert float(out["logit_grad_norm_top10_bottom10"]) == pytest.approx(9.0, rel=1e-12)


def test_batch_imbalance_on_a_case_uses_per_sample_norms():
    case = make_case("mlp_ce", torch.float64)
    bg = batch_grads(case.model, case.params, case.inputs, case.targets, case.loss_fn, jacobian="vmap")
    J = ref.per_sample_grads(case)
    lnorm = ref.logit_grad(case, ref.logits(case), case.targets).norm(dim=1)
    out = batch_imbalance(torch.diagonal(bg.rows.gram()), bg.s)
    gn = J.norm(dim=1)
    assert float(out["grad_norm_max_min"]) == pytest.approx(float(gn.max() / gn.min()), rel=1e-10)
    assert float(out["logit_grad_norm_max_min"]) == pytest.approx(float(lnorm.max() / lnorm.min()), rel=1e-10)

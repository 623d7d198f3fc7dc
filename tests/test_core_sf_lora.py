"""SF on a tiny LoRA transformer (BERT + peft, with padding) against a dense float64
reference, on the fast and the plain path, at damping 1e-8; and the float32 case where
the sampled rows span g (a confident model), which used to give d^T g < 0.

Reference: per-sample gradients by one ordinary forward of the sample ALONE (trimmed
to its length: no padding, no mask) + autograd.grad per label; SF by the SVD of
Jhat: V (S^2 + lam)^{-1} V^T g + (g - V V^T g) / lam.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import reference as ref
from hf_tiny import BERT

pytest.importorskip("transformers", reason="transformers not installed")
pytest.importorskip("peft", reason="peft not installed")

from iefcli import directions  # noqa: E402
from iefcli.core import CrossEntropy, batch_grads, sampled_rows, trainable_params  # noqa: E402
from iefcli.hf.models import build_model  # noqa: E402

EPS64 = torch.finfo(torch.float64).eps
LENGTHS = [8, 5, 6, 3]
K = 2
LORA = {"method": "lora", "r": 2, "alpha": 4, "target_modules": ["query", "value"]}


def _model(dtype):
    built = build_model({"arch": "classifier", "config": dict(BERT), "num_labels": 3, "peft": LORA},
                        dtype=dtype, seed=3)
    model = built.model.eval()
    with torch.no_grad():  # LoRA B non-zero, so that A's gradients are not trivially zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    gen = torch.Generator().manual_seed(4)
    n, t = len(LENGTHS), max(LENGTHS)
    mask = (torch.arange(t)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    ids = torch.randint(5, BERT["vocab_size"], (n, t), generator=gen) * mask
    y = torch.randint(0, 3, (n,), generator=gen)
    return built, model, {"input_ids": ids, "attention_mask": mask}, y




def _rows(model, inputs, labels):
    """Per-sample CE gradients at ``labels``, each sample alone and trimmed (reference.module_rows)."""
    ce = lambda z, y: F.cross_entropy(z, y, reduction="sum")  # noqa: E731
    return ref.module_rows(model, inputs["input_ids"], labels, ce, lengths=LENGTHS)


@pytest.mark.parametrize("jacobian", ["vmap", "fast"])
def test_sf_on_lora_transformer_matches_dense_float64(jacobian):
    built, model, inputs, y = _model(torch.float64)
    bg = batch_grads(model, trainable_params(model), inputs, y, CrossEntropy(), jacobian=jacobian, forward=built.forward)
    J = _rows(model, inputs, y)
    assert ref.rel_err(bg.g, J.mean(0)) < 1e-10
    yhat = CrossEntropy().sample(bg.logits, y, K, torch.Generator().manual_seed(5))
    R = sampled_rows(bg, K, torch.Generator().manual_seed(5))
    Jh = torch.cat([_rows(model, inputs, yhat[i]) for i in range(K)]) / math.sqrt(K)
    g = J.mean(0)
    lam = 1e-8
    for rows, label in ((R, "sampled"), (bg.rows, "true labels: g in the rows' span")):
        Jr = Jh if label == "sampled" else J
        expect = ref.sf_svd(Jr, g, lam)
        d = directions.sf(rows, bg.g, lam)
        # Both forms carry ~eps * ||g|| / lam absolute error from g - V V^T g.
        tol = 1e-9 + 1e3 * EPS64 * float(g.norm()) / (lam * float(expect.norm()))
        assert ref.rel_err(d, expect) < tol, label
        assert float(d @ g) > 0, label
        assert float(d @ g) == pytest.approx(float(expect @ g), rel=tol), label


@pytest.mark.parametrize("jacobian", ["vmap", "fast"])
def test_float32_sf_is_a_descent_direction_when_g_is_in_the_span(jacobian):
    """The regression: float32 LoRA transformer, rows = the true-label gradients (what a
    confident model's label draws give), small damping. The answer for the very rows the
    path applies (read out exactly as J^T e_m in float64) is within float32 rounding of
    g, and d^T g > 0."""
    built, model, inputs, y = _model(torch.float32)
    bg = batch_grads(model, trainable_params(model), inputs, y, CrossEntropy(), jacobian=jacobian, forward=built.forward)
    eye = torch.eye(bg.rows.n_rows, dtype=torch.float64)
    J64 = torch.stack([bg.rows.combine(e, dtype=torch.float64) for e in eye])
    g = bg.g.double()
    for lam in (1e-5, 1e-7, 1e-9):
        d = directions.sf(bg.rows, bg.g, lam)
        expect = ref.sf_svd(J64, g, lam)
        assert float(d.double() @ g) > 0, lam
        assert ref.rel_err(d, expect) < 1e-5, lam

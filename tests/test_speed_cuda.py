"""No host sync inside the fast path's Gram and J^T w on CUDA (torch.cuda.set_sync_debug_mode("error")).
Skipped where no CUDA device exists (no GPU was lent while this was written: run it on one)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from iefcli.core import CrossEntropy, trainable_params
from iefcli.core.fast import FastJacobian

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Tok(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(50, 16), nn.Embedding(8, 16)
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, 3)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device).unsqueeze(0))
        return self.head(self.norm(h).mean(dim=1))


@pytest.mark.parametrize("which", ["mlp", "tokens", "conv"])
def test_fast_rows_gram_and_combine_do_not_sync(which):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    if which == "mlp":
        m, x = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)), torch.randn(6, 8)
    elif which == "tokens":
        m, x = Tok(), torch.randint(0, 50, (6, 8))
    else:
        m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
        x = torch.randn(6, 2, 4, 4)
    m, x = m.to(dev).eval(), x.to(dev)
    y = torch.randint(0, 3, (6,), device=dev)
    jac = FastJacobian(m, trainable_params(m), x)
    u = CrossEntropy().logit_grad(jac.logits, y)[None]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows = jac.rows(u)
        g = rows.gram()
        d = rows.combine(torch.ones(rows.n_rows, dtype=torch.float64, device=dev))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(g).all() and torch.isfinite(d).all()

"""iEF in a LightningModule with manual optimisation: 3 Lightning steps equal 3 functional-core steps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import reference as ref

L = pytest.importorskip("lightning", reason="lightning not installed")

from iefcli.core import CrossEntropy, batch_grads, trainable_params  # noqa: E402
from iefcli.core.methods import compute_direction  # noqa: E402
from iefcli.precond import Preconditioner  # noqa: E402


class LitIEF(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        self.automatic_optimization = False
        self.pre = Preconditioner(self, method="ief", damping=1e-7)
        self.infos = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        loss = self.pre.loss(self(x), y)
        self.manual_backward(loss)
        self.infos.append(self.pre.step())
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=2.0)


def test_lightning_manual_optimisation_equals_core_steps():
    torch.manual_seed(0)
    lit = LitIEF()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 6, generator=gen, dtype=torch.float64)
    y = (x[:, :3]).argmax(1)
    start = copy.deepcopy(lit.net)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(lit, loader)
    params = trainable_params(start)
    for i in range(3):
        bg = batch_grads(start, params, x[8 * i: 8 * i + 8], y[8 * i: 8 * i + 8], CrossEntropy())
        d, _ = compute_direction("ief", bg, 1e-7)
        params = {k: v.clone() for k, v in bg.layout.unflatten(bg.layout.flatten(params) - 2.0 * d).items()}
    got = trainable_params(lit.net)
    assert len(lit.infos) == 3
    for k in params:
        assert ref.rel_err(got[k], params[k]) < 1e-10, k

"""Recurrent modules on `auto`: when the parameters certain to take the whole-model path (an LSTM, a root
parameter, tied weights without rules) hold at least half of the numbers, FastJacobian hands everything
to the plain path (never slower than it: no hooked forward, no layer blocks on top of the per-sample
pass); otherwise only those go through the model per sample. torch.func cannot run a float64 LSTM per
sample (a torch limitation), so the float32 rows are held to 1e-5 against a float64 loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import reference as ref
from iefcli.core import CrossEntropy, batch_grads, trainable_params
from iefcli.core.jacobian import DenseRows


class Last(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.rnn = nn.LSTM(4, hidden, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0][:, -1]


def _model(hidden, head_width):
    torch.manual_seed(0)
    return nn.Sequential(Last(hidden), nn.Linear(hidden, head_width), nn.Tanh(), nn.Linear(head_width, 3)).eval()


def _loop_rows(m, x, y):
    """(N, P) per-sample gradients of the unscaled cross-entropy, one autograd.grad per sample."""
    return ref.module_rows(m, x, y, lambda z, t: nn.functional.cross_entropy(z, t, reduction="sum"))


@pytest.mark.parametrize("hidden,head_width,whole", [(8, 4, True), (3, 64, False)])
def test_recurrent_share_decides_the_path(hidden, head_width, whole):
    m = _model(hidden, head_width)
    x = torch.randn(5, 6, 4, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(1))
    params = trainable_params(m)
    lstm = sum(p.numel() for k, p in params.items() if k.startswith("0."))
    assert (2 * lstm >= sum(p.numel() for p in params.values())) == whole
    bf = batch_grads(m, params, x, y, CrossEntropy(), jacobian="auto")
    paths = bf.jac.param_paths
    assert paths["0.rnn.weight_hh_l0"] == "vmap"
    assert paths["1.weight"] == ("vmap" if whole else "linear"), paths
    assert isinstance(bf.rows, DenseRows) == whole
    if whole:
        assert "plain path for the whole model" in bf.jac.fallback_reasons["1.weight"]
    J = _loop_rows(copy.deepcopy(m).double(), x.double(), y)
    tol = 1e-5
    assert ref.rel_err(bf.rows.gram(), J @ J.T) < tol
    xs = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert ref.rel_err(bf.rows.combine(xs, dtype=torch.float64), J.T @ xs) < tol
    v = torch.randn(J.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert ref.rel_err(bf.rows.dot(v.float()).double(), J @ v) < tol
    assert ref.rel_err(bf.jac.vjp(bf.logit_grads).double(), J.sum(dim=0)) < tol

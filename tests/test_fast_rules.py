"""The per-module fallback of FastJacobian: modules without a rule are replayed per sample ON THEIR OWN
(only their parameters as variables), never the whole model; everything equals the plain vmap path
in float64 (Gram, J^T x, J v and the dense rows) on models mixing covered and uncovered modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference as ref
from iefcli.core import CrossEntropy, batch_grads, trainable_params


class Pool(nn.Module):
    def forward(self, x):
        return x.mean(dim=1) if x.dim() == 3 else x.flatten(1)


class MHA(nn.Module):
    def __init__(self, need_weights: bool, use_weights: bool = False):
        super().__init__()
        self.emb = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.need_weights, self.use_weights = need_weights, use_weights

    def forward(self, x):
        h = torch.tanh(self.emb(x))
        a, w = self.attn(h, h, h, need_weights=self.need_weights)
        out = self.head(a.mean(dim=1))
        if self.use_weights:
            out = out + w.sum(dim=(1, 2))[:, None]
        return out


def _model(name):
    torch.manual_seed(0)
    if name == "conv1d":
        m = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))
        x = torch.randn(5, 2, 6)
    elif name in ("groupnorm", "batchnorm"):
        norm = nn.GroupNorm(2, 4) if name == "groupnorm" else nn.BatchNorm2d(4)
        m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), norm, nn.Tanh(), nn.Flatten(), nn.Linear(64, 3))
        if name == "batchnorm":
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
        x = torch.randn(5, 2, 4, 4)
    elif name == "mha":
        m, x = MHA(need_weights=True), torch.randn(5, 3, 4)
    elif name == "mha_noweights":
        m, x = MHA(need_weights=False), torch.randn(5, 3, 4)
    elif name == "encoder":
        m = nn.Sequential(nn.Linear(4, 8), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                          Pool(), nn.Linear(8, 3))
        x = torch.randn(5, 3, 4)
    elif name == "rmsnorm":
        m = nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6), nn.Tanh(), nn.Linear(6, 3))
        x = torch.randn(5, 4)
    else:
        raise AssertionError(name)
    m = m.double().eval()
    y = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(1))
    return m, x.double(), y


REPLAYED = {
    "conv1d": ["0.weight", "0.bias"],
    "groupnorm": ["1.weight", "1.bias"],
    "batchnorm": ["1.weight", "1.bias"],
    "mha": ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"],
    "mha_noweights": ["attn.in_proj_weight", "attn.out_proj.weight"],
    "encoder": ["1.self_attn.in_proj_weight", "1.self_attn.out_proj.weight"],
    "rmsnorm": ["1.weight"],
}


@pytest.mark.parametrize("name", list(REPLAYED))
def test_per_module_fallback_equals_plain_path(name):
    m, x, y = _model(name)
    params = trainable_params(m)
    bf = batch_grads(m, params, x, y, CrossEntropy(), jacobian="fast")
    bv = batch_grads(m, params, x, y, CrossEntropy(), jacobian="vmap")
    paths = bf.jac.param_paths
    assert all(paths[p] == "replay" for p in REPLAYED[name]), paths
    assert "vmap" not in paths.values(), paths  # never the whole model
    assert any(v not in ("replay", "vmap") for v in paths.values())  # a rule still covers the rest
    rf, rv = bf.rows, bv.rows
    assert ref.rel_err(rf.matrix, rv.matrix) < 1e-12
    assert ref.rel_err(rf.gram(), rv.gram()) < 1e-12
    xs = torch.randn(rf.n_rows, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert ref.rel_err(rf.combine(xs), rv.combine(xs)) < 1e-12
    v = torch.randn(bf.jac.layout.size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert ref.rel_err(rf.dot(v), rv.dot(v)) < 1e-12


def test_attention_weights_used_downstream_take_the_whole_model_path():
    m, x, y = _model("mha")
    m.use_weights = True  # the second output reaches the loss: replaying only output 0 would be wrong
    params = trainable_params(m)
    bf = batch_grads(m, params, x, y, CrossEntropy(), jacobian="fast")
    bv = batch_grads(m, params, x, y, CrossEntropy(), jacobian="vmap")
    assert bf.jac.param_paths["attn.in_proj_weight"] == "vmap"
    assert "tuple" in bf.jac.fallback_reasons["attn.in_proj_weight"]
    assert ref.rel_err(bf.rows.gram(), bv.rows.gram()) < 1e-12


def test_float32_replay_close_to_plain():
    m, x, y = _model("encoder")
    m, x = m.float(), x.float()
    params = trainable_params(m)
    bf = batch_grads(m, params, x, y, CrossEntropy(), jacobian="fast")
    bv = batch_grads(m, params, x, y, CrossEntropy(), jacobian="vmap")
    assert ref.rel_err(bf.rows.gram(), bv.rows.gram()) < 1e-5

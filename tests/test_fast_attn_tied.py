"""Tied weights on the fast path without materialising the tied parameter's per-sample gradients:
Gram = the holders' Grams + the Embedding x Linear cross terms on the rows the ids touch (any other
pair by dense columns). Gram, J^T x, J v, the dense rows equal a loop of torch.autograd.grad in
float64: pooled and per-position (language-model) heads, padding_idx, ids repeated within and across
samples, K = 2 cotangent sets, two Linears sharing a weight, and the dense form iefcli.dist gathers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference as ref
from iefcli.core import CrossEntropy, batch_grads, trainable_params
from iefcli.core.jacobian import make_jacobian

V, D, T = 13, 6, 4


class TiedNet(nn.Module):
    def __init__(self, mode: str, padding_idx=None):
        super().__init__()
        self.mode = mode
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.mix = nn.Linear(D, D)
        self.out = nn.Linear(D, V, bias=mode != "lm_nobias")
        if mode == "two_linears":  # a Linear weight shared by two Linears (no Embedding)
            self.back = nn.Linear(V, D)
            self.out2 = nn.Linear(D, V)
            self.out2.weight = self.out.weight
        else:
            self.out.weight = self.emb.weight

    def forward(self, ids):
        if self.mode == "two_linears":
            h = torch.tanh(self.mix(self.emb(ids).mean(dim=1)))
            return self.out2(torch.tanh(self.back(torch.tanh(self.out(h)))))
        h = torch.tanh(self.mix(self.emb(ids)))  # (N, T, D)
        if self.mode == "pooled":
            return self.out(h.mean(dim=1))  # (N, V)
        return self.out(h)  # a language-model head: (N, T, V)


def _case(mode, padding_idx=None):
    torch.manual_seed(0)
    m = TiedNet(mode, padding_idx).double().eval()
    # ids repeat within and across samples; the padding id 0 occurs
    ids = 2 * torch.randint(0, 7, (5, T), generator=torch.Generator().manual_seed(4))  # even ids only
    ids[0, 1] = 0
    return m, ids


def _loop_rows(m, ids, u):
    """Rows (k, n): grad of <f(ids_n), u_kn>, one autograd.grad per row."""
    ps = [p for p in m.parameters() if p.requires_grad]
    rows = []
    for k in range(u.shape[0]):
        for n in range(ids.shape[0]):
            gs = torch.autograd.grad((m(ids[n : n + 1]) * u[k, n : n + 1]).sum(), ps)
            rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


@pytest.mark.parametrize("grouped", [False, True], ids=["dense", "grouped"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("mode,padding_idx", [("pooled", None), ("pooled", 0), ("lm", None), ("lm_nobias", 0),
                                              ("two_linears", None)])
def test_tied_blocks_equal_the_loop(mode, padding_idx, k, grouped, monkeypatch):
    """The embedding holder's own Gram both ways: dense on the touched rows, and by id groups."""
    from iefcli.core.fast import blocks as fastblocks

    if grouped:
        monkeypatch.setattr(fastblocks, "EMBEDDING_DENSE_MAX_ELEMENTS", 0)
    m, ids = _case(mode, padding_idx)
    params = trainable_params(m)
    jac = make_jacobian(m, params, ids, jacobian="fast")
    tied = "out.weight" if mode == "two_linears" else "emb.weight"
    assert jac.param_paths[tied] == "tied", jac.param_paths
    assert "vmap" not in jac.param_paths.values(), jac.param_paths
    shape = (k, *jac.logits.shape)
    u = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    rf = jac.rows(u)
    ref.check_rows(rf, _loop_rows(m, ids, u))  # every block, the tied one included
    blk = next(b for b in rf.blocks if b.kind == "tied")
    assert ref.rel_err(blk.mats[tied], blk.matrix()) == 0  # the dense form iefcli.dist gathers


@pytest.mark.parametrize("mode", ["pooled", "lm"])
def test_tied_static_form(mode, monkeypatch):
    """The accelerator form (all rows, no unique: EMBEDDING_GRAM_STATIC) forced on CPU."""
    from iefcli.core.fast import blocks as fastblocks

    monkeypatch.setattr(fastblocks, "EMBEDDING_GRAM_STATIC", True)
    m, ids = _case(mode, 0)
    jac = make_jacobian(m, trainable_params(m), ids, jacobian="fast")
    u = torch.randn(2, *jac.logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    J = _loop_rows(m, ids, u)
    assert ref.rel_err(jac.rows(u).gram(), J @ J.T) < 1e-12


def test_bench_tied_model_float32_close_to_plain():
    from iefcli.eval.bench import _Tied

    torch.manual_seed(0)
    m = _Tied(50, 16).eval()
    ids = torch.randint(0, 50, (8, 6), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(2))
    params = trainable_params(m)
    bf = batch_grads(m, params, ids, y, CrossEntropy(), jacobian="fast")
    bv = batch_grads(m, params, ids, y, CrossEntropy(), jacobian="vmap")
    assert bf.jac.param_paths["emb.weight"] == "tied"
    assert ref.rel_err(bf.rows.gram(), bv.rows.gram()) < 1e-5


@pytest.mark.parametrize("grouped", [False, True], ids=["dense", "grouped"])
def test_embedding_gram_group_sizes(grouped, monkeypatch):
    """Ids held by 1, 2, 3, 5 and all rows (several padded size classes) and repeated within a row."""
    from iefcli.core.fast import blocks as fastblocks

    if grouped:
        monkeypatch.setattr(fastblocks, "EMBEDDING_DENSE_MAX_ELEMENTS", 0)
    torch.manual_seed(0)
    m, ids = _case("pooled")
    ids = torch.tensor([[12, 1, 1, 3], [12, 4, 3, 5], [12, 4, 3, 6], [12, 7, 8, 8], [12, 9, 3, 3]])
    ids = torch.cat([ids, ids[:3] % 11], dim=0)  # 8 rows
    jac = make_jacobian(m, trainable_params(m), ids, jacobian="fast")
    u = torch.randn(2, *jac.logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    rf = jac.rows(u)
    emb = next(p for b in rf.blocks if b.kind == "tied" for p in b.parts if p.kind == "embedding")
    mat = emb.matrix()
    assert ref.rel_err(emb.gram(), mat @ mat.T) < 1e-13
    J = _loop_rows(m, ids, u)
    assert ref.rel_err(rf.gram(), J @ J.T) < 1e-12

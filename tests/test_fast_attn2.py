"""Issue 14, round three: the tied parameter's two forms (its per-sample gradients materialised once
when small, the holders' blocks plus cross terms above TIED_MATERIALISE_ELEMENTS) both equal a loop
of torch.autograd.grad in float64 (Gram, J^T x in both result dtypes, J v, the dense rows)."""

from __future__ import annotations

import pytest
import torch

import reference as ref
from iefcli.core import CrossEntropy, batch_grads, trainable_params
from iefcli.core.jacobian import make_jacobian
from test_fast_attn_tied import _case, _loop_rows


@pytest.mark.parametrize("form", ["materialise", "sum"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("mode,padding_idx", [("pooled", None), ("pooled", 0), ("lm", None), ("lm_nobias", 0),
                                              ("two_linears", None)])
def test_tied_forms_equal_the_loop(mode, padding_idx, k, form, monkeypatch):
    from iefcli.core.fast import blocks as fastblocks

    monkeypatch.setattr(fastblocks, "TIED_MATERIALISE_ELEMENTS", 1 << 30 if form == "materialise" else 0)
    m, ids = _case(mode, padding_idx)
    jac = make_jacobian(m, trainable_params(m), ids, jacobian="fast")
    tied = "out.weight" if mode == "two_linears" else "emb.weight"
    assert jac.param_paths[tied] == "tied", jac.param_paths
    u = torch.randn(k, *jac.logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    rf = jac.rows(u)
    blk = next(b for b in rf.blocks if b.kind == "tied")
    assert blk.strategy == form
    J = _loop_rows(m, ids, u)
    assert ref.rel_err(rf.gram(), J @ J.T) < 1e-12
    xs = torch.randn(rf.n_rows, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert ref.rel_err(rf.combine(xs), J.T @ xs) < 1e-12
    v = torch.randn(J.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert ref.rel_err(rf.dot(v), J @ v) < 1e-12
    assert ref.rel_err(rf.matrix, J) < 1e-12
    mat = blk.matrix()
    assert ref.rel_err(blk.gram(), mat @ mat.T) < 1e-12


@pytest.mark.parametrize("form", ["materialise", "sum"])
def test_tied_forms_float32_against_float64(form, monkeypatch):
    """float32 params: the Gram and J^T x (float32 and float64 results) within float32 rounding of the
    float64 loop on the same weights (a wrong column would be O(1) off)."""
    from iefcli.core.fast import blocks as fastblocks
    from iefcli.eval.bench import _Tied

    monkeypatch.setattr(fastblocks, "TIED_MATERIALISE_ELEMENTS", 1 << 30 if form == "materialise" else 0)
    torch.manual_seed(0)
    m32 = _Tied(50, 16).eval()
    ids = torch.randint(0, 50, (8, 6), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(2))
    b32 = batch_grads(m32, trainable_params(m32), ids, y, CrossEntropy(), jacobian="fast")
    blk = next(b for b in b32.rows.blocks if b.kind == "tied")
    assert blk.strategy == form
    m64 = _Tied(50, 16).double().eval()
    m64.load_state_dict({k: v.double() for k, v in m32.state_dict().items()})
    b64 = batch_grads(m64, trainable_params(m64), ids, y, CrossEntropy(), jacobian="vmap")
    assert ref.rel_err(b32.rows.gram(), b64.rows.gram()) < 1e-5
    xs = torch.randn(b32.rows.n_rows, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    want = b64.rows.combine(xs)
    got64 = b32.rows.combine(xs, dtype=torch.float64)
    assert got64.dtype == torch.float64 and ref.rel_err(got64, want) < 1e-5
    got32 = b32.rows.combine(xs)
    assert got32.dtype == torch.float32 and ref.rel_err(got32.double(), want) < 1e-5

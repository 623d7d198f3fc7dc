"""The fast path (iefcli.core.fast) against the plain vmap path and the float64 loop references.

Every case of the core's table: Gram, combine (g), dot and the EF / iEF / SF
directions equal the plain path's (float64: 1e-10 relative; float32: 1e-5);
the rows themselves equal a loop of torch.autograd.grad in float64. Then the
path choice: which layers took the fast rule, and the vmap fallback for
parameters without one (raw nn.Parameter, tied weights, a reused layer, a
weight read outside its layer), sequence strategies, padding, dropout.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reference as ref
from cases import CASE_NAMES, DAMPINGS, make_case
from iefcli import directions
from iefcli.core import CrossEntropy, TokenCrossEntropy, batch_grads, sampled_rows, trainable_params
from iefcli.core.fast import blocks as fastblocks
from iefcli.core.fast import FastJacobian, FastRows
from iefcli.core.jacobian import VmapJacobian, make_jacobian
from iefcli.errors import ModelError

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def both(case, **kw):
    args = (case.model, case.params, case.inputs, case.targets, case.loss_fn)
    return batch_grads(*args, jacobian="fast", **kw), batch_grads(*args, jacobian="vmap", **kw)


def test_auto_picks_fast():
    case = make_case("mlp_ce")
    jac = make_jacobian(case.model, case.params, case.inputs)
    assert isinstance(jac, FastJacobian)


def _sf_at_labels(bg, yhat, lam):
    """SF direction with given sampled labels yhat (k, N, ...) (what sampled_rows draws), so that
    float32 and float64 runs use the same labels."""
    k = yhat.shape[0]
    y = yhat.to(bg.logits.dtype) if yhat.is_floating_point() else yhat
    u = torch.stack([bg.loss_fn.logit_grad(bg.logits, y[i]) for i in range(k)]) / math.sqrt(k)
    return directions.sf(bg.jac.rows(u), bg.g, lam)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_directions_equal_plain_path(name, dtype):
    case = make_case(name, dtype)
    bf, bv = both(case)
    assert isinstance(bf.rows, FastRows)
    tol = TOL[dtype]
    # Gram, g = J^T 1 / N, and R v against the dense rows.
    assert bf.rows.gram().dtype == torch.float64
    assert ref.rel_err(bf.rows.gram(), bv.rows.gram()) < tol
    assert ref.rel_err(bf.g, bv.g) < tol and bf.g.dtype == dtype
    v = torch.randn(bf.layout.size, generator=torch.Generator().manual_seed(3), dtype=dtype)
    assert ref.rel_err(bf.rows.dot(v), bv.rows.dot(v)) < tol
    b64 = both(make_case(name, torch.float64))[1] if dtype != torch.float64 else bv
    for lam in DAMPINGS:
        assert ref.rel_err(directions.ief(bf.rows, bf.s, lam), directions.ief(bv.rows, bv.s, lam)) < tol, lam
        assert ref.rel_err(directions.ef(bf.rows, lam), directions.ef(bv.rows, lam)) < tol, lam
        # SF with k = 2 sampled labels per datum: K = 2 cotangent sets, 2N rows.
        yhat = case.loss_fn.sample(bv.logits, bv.targets, 2, torch.Generator().manual_seed(7))
        sf = {k: _sf_at_labels(b, yhat, lam) for k, b in (("fast", bf), ("plain", bv), ("f64", b64))}
        diff = ref.rel_err(sf["fast"], sf["plain"])
        if diff >= tol:
            # SF's Woodbury form (g - Jhat^T x) / lam cancels at tiny lam: in float32 BOTH paths are
            # then off the exact (float64) direction by ~1e-5 and rounding decides their difference.
            # The fast path must be as close to the exact direction as the plain path (x2) + tol.
            err_fast, err_plain = ref.rel_err(sf["fast"], sf["f64"]), ref.rel_err(sf["plain"], sf["f64"])
            assert err_fast <= 2 * err_plain + tol, (lam, diff, err_fast, err_plain)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_rows_equal_autograd_loop(name):
    """Independent of the vmap path: R (materialised row by row from combine) vs a loop of autograd.grad."""
    case = make_case(name, torch.float64)
    bf, _ = both(case)
    assert ref.rel_err(bf.rows.matrix, ref.per_sample_grads(case)) < 1e-12


def test_sampled_rows_against_loop():
    """Rows for K = 3 label sets (k-major) vs per-sample grads at those labels."""
    case = make_case("transformer_tokce", torch.float64)
    bf, _ = both(case)
    yhat = case.loss_fn.sample(bf.logits, bf.targets, 3, torch.Generator().manual_seed(1))
    rows = sampled_rows(bf, 3, torch.Generator().manual_seed(1))
    want = torch.cat([ref.per_sample_grads(case, yhat[i]) for i in range(3)]) / math.sqrt(3)
    assert ref.rel_err(rows.gram(), want @ want.T) < 1e-12
    x = torch.randn(rows.n_rows, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert ref.rel_err(rows.combine(x), want.T @ x) < 1e-12


EXPECTED_PATHS = {
    "mlp_ce": {"fc1.weight": "linear", "fc1.bias": "linear", "fc2.weight": "linear", "fc2.bias": "linear"},
    "cnn_ce": {"conv.weight": "conv2d", "conv.bias": "conv2d", "fc.weight": "linear", "fc.bias": "linear"},
    "transformer_tokce": {"pos": "vmap", "emb.weight": "embedding", "ln1.weight": "layernorm",
                          "ln1.bias": "layernorm", "q.weight": "linear", "head.bias": "linear"},
    "mlp_mse": {"fc1.weight": "linear", "fc2.bias": "linear"},
    "frozen_ce": {"fc2.weight": "linear", "fc2.bias": "linear"},
}


@pytest.mark.parametrize("name", CASE_NAMES)
def test_fast_path_taken(name):
    case = make_case(name, torch.float32)
    jac = FastJacobian(case.model, case.params, case.inputs)
    want = EXPECTED_PATHS[name]
    assert {k: jac.param_paths[k] for k in want} == want
    assert set(jac.param_paths) == set(case.params)
    assert set(jac.fallback_reasons) == {k for k, v in jac.param_paths.items() if v == "vmap"}


def test_sequence_linear_strategies_agree(monkeypatch):
    """The ghost and materialise forms of a sequence Linear give the same Gram (float64)."""
    case = make_case("transformer_tokce", torch.float64)
    bf, bv = both(case)
    strategies = bf.rows.strategies
    assert strategies["pos"] == "vmap" and strategies["q.weight"].startswith("linear:")
    want = bv.rows.gram()
    for cap, label in ((0, "ghost"), (1 << 40, None)):
        monkeypatch.setattr(fastblocks, "MATERIALISE_MAX_ELEMENTS", cap)
        monkeypatch.setattr(fastblocks, "GHOST_CHUNK_ELEMENTS", 64)  # several row chunks
        rows = FastJacobian(case.model, case.params, case.inputs).rows(bf.logit_grads[None])
        if label:
            assert rows.strategies["q.weight"] == "linear:ghost"
        assert ref.rel_err(rows.gram(), want) < 1e-12


# ---------------------------------------------------------------- fallback and path choice


class RawParam(nn.Module):
    """A custom module with a raw nn.Parameter used in its forward (no fast rule)."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.scale


class Mixed(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.fc1 = nn.Linear(5, 7)
        self.raw = RawParam(7)
        self.fc2 = nn.Linear(7, 7)
        self.head = nn.Linear(7, 3)
        if mode == "tied":
            self.head.weight = nn.Parameter(torch.randn(3, 7, dtype=torch.float64))
            self.fc3 = nn.Linear(7, 3)
            self.fc3.weight = self.head.weight  # the same Parameter in two modules

    def forward(self, x):
        h = torch.tanh(self.raw(self.fc1(x)))
        if self.mode == "reused":
            h = torch.tanh(self.fc2(h))
            h = torch.tanh(self.fc2(h))  # the same layer twice
        elif self.mode == "outside":
            h = torch.tanh(self.fc2(h)) + h @ self.fc2.weight.T  # weight read outside the layer
        elif self.mode == "inplace":
            h = F.relu(self.fc2(h), inplace=True)  # in-place op on the layer's output
        else:
            h = torch.tanh(self.fc2(h))
        out = self.head(h)
        if self.mode == "tied":
            out = out + self.fc3(h)
        return out


def _mixed_case(mode):
    torch.manual_seed(0)  # test-local init; the core never touches the global RNG
    model = Mixed(mode).double().eval()
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    return model, trainable_params(model), x, y


@pytest.mark.parametrize(
    "mode, fast_params, vmap_params",
    [
        ("plain", ["fc1.weight", "fc2.weight", "head.weight"], ["raw.scale"]),
        ("reused", ["fc1.weight", "head.weight"], ["raw.scale", "fc2.weight", "fc2.bias"]),
        ("outside", ["fc1.weight", "fc2.bias", "head.weight"], ["raw.scale", "fc2.weight"]),
        ("inplace", ["fc1.weight", "fc2.weight", "head.weight"], ["raw.scale"]),
        ("tied", ["fc1.weight", "fc2.weight", "head.bias", "fc3.bias", "head.weight"], ["raw.scale"]),
    ],
)
def test_fallback_gives_same_rows(mode, fast_params, vmap_params):
    model, params, x, y = _mixed_case(mode)
    bf = batch_grads(model, params, x, y, CrossEntropy(), jacobian="fast")
    bv = batch_grads(model, params, x, y, CrossEntropy(), jacobian="vmap")
    paths = bf.jac.param_paths
    assert all(paths[p] not in ("vmap", "replay") for p in fast_params), paths
    # raw.scale (a module without a rule) is replayed on its own (the per-module fallback);
    # the rest of the list (reused, read outside, tied) takes the whole-model vmap path
    assert paths["raw.scale"] == "replay", paths
    assert all(paths[p] == "vmap" for p in vmap_params if p != "raw.scale"), paths
    assert all(p in bf.jac.fallback_reasons for p in vmap_params)
    assert ref.rel_err(bf.rows.gram(), bv.rows.gram()) < 1e-12
    assert ref.rel_err(bf.g, bv.g) < 1e-12
    for lam in (1e-8, 1e-2):
        assert ref.rel_err(directions.ief(bf.rows, bf.s, lam), directions.ief(bv.rows, bv.s, lam)) < 1e-10


def test_fallback_reason_is_specific():
    model, params, x, _ = _mixed_case("reused")
    jac = FastJacobian(model, params, x)
    assert "called 2 times" in jac.fallback_reasons["fc2.weight"]
    assert "RawParam" in jac.fallback_reasons["raw.scale"]
    model, params, x, _ = _mixed_case("outside")
    assert "used by 2 operations" in FastJacobian(model, params, x).fallback_reasons["fc2.weight"]


def test_vjp_jvp_match_plain():
    case = make_case("transformer_tokce", torch.float64)
    jf = FastJacobian(case.model, case.params, case.inputs)
    jv = VmapJacobian(case.model, case.params, case.inputs)
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(jv.logits.shape, generator=gen, dtype=torch.float64)
    v = torch.randn(jv.layout.size, generator=gen, dtype=torch.float64)
    assert ref.rel_err(jf.logits, jv.logits) < 1e-14
    assert ref.rel_err(jf.vjp(u), jv.vjp(u)) < 1e-12
    assert ref.rel_err(jf.jvp(v), jv.jvp(v)) < 1e-12
    # a second vjp on the retained graph still works
    assert ref.rel_err(jf.vjp(2 * u), 2 * jv.vjp(u)) < 1e-12


def test_ngd_dense_and_cg_on_fast_path():
    case = make_case("mlp_ce", torch.float64)
    bf, bv = both(case)
    for method in ("dense", "cg"):
        assert ref.rel_err(directions.ngd(bf, 1e-3, method=method), directions.ngd(bv, 1e-3, method=method)) < 1e-8


class PaddedEmbedNet(nn.Module):
    """Embedding with padding_idx, a prompt-tuning-style embedding fed arange ids, per-token head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 4, padding_idx=0)
        self.prompt = nn.Embedding(2, 4)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, 5)

    def forward(self, ids):
        n = ids.shape[0]
        prompt = self.prompt(torch.arange(2).unsqueeze(0).expand(n, 2))  # (N, 2, 4), every sample shares ids
        h = torch.cat([prompt, self.emb(ids)], dim=1)
        return self.head(torch.tanh(self.ln(h)))[:, 2:]


def test_embedding_padding_and_prompt_tokens():
    torch.manual_seed(0)
    model = PaddedEmbedNet().double().eval()
    params = trainable_params(model)
    ids = torch.tensor([[1, 2, 2, 0], [3, 1, 0, 0], [2, 2, 2, 5], [4, 0, 0, 0]])
    y = torch.tensor([[1, 2, 3, -100], [0, 4, -100, -100], [1, 1, 2, 3], [2, -100, -100, -100]])
    loss = TokenCrossEntropy(-100)
    bf = batch_grads(model, params, ids, y, loss, jacobian="fast")
    bv = batch_grads(model, params, ids, y, loss, jacobian="vmap")
    assert bf.jac.param_paths["emb.weight"] == "embedding" and bf.jac.param_paths["prompt.weight"] == "embedding"
    assert ref.rel_err(bf.rows.gram(), bv.rows.gram()) < 1e-12
    assert float(bf.g.abs().max()) > 0
    assert ref.rel_err(bf.rows.matrix, bv.rows.matrix) < 1e-12  # padding row 0 of emb gets no gradient
    assert ref.rel_err(directions.ief(bf.rows, bf.s, 1e-6), directions.ief(bv.rows, bv.s, 1e-6)) < 1e-10


class StridedConv(nn.Module):
    def __init__(self, padding):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=padding, dilation=1)
        self.conv2 = nn.Conv2d(3, 2, kernel_size=2, dilation=2, padding="same", bias=False)
        self.fc = nn.LazyLinear(3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return self.fc(torch.tanh(self.conv2(h)).flatten(1))


@pytest.mark.parametrize("padding", [0, 1])
def test_conv_stride_padding_dilation(padding):
    torch.manual_seed(0)
    model = StridedConv(padding).double().eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2, 7, 7, generator=gen, dtype=torch.float64)
    model(x)  # materialise the lazy layer
    params = trainable_params(model)
    y = torch.randint(0, 3, (4,), generator=gen)
    bf = batch_grads(model, params, x, y, CrossEntropy(), jacobian="fast")
    bv = batch_grads(model, params, x, y, CrossEntropy(), jacobian="vmap")
    assert bf.jac.param_paths["conv.weight"] == "conv2d" and bf.jac.param_paths["conv2.weight"] == "conv2d"
    assert ref.rel_err(bf.rows.gram(), bv.rows.gram()) < 1e-12
    assert ref.rel_err(bf.g, bv.g) < 1e-12


def test_active_dropout_refused_unless_different():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    params = trainable_params(model)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ModelError, match="dropout"):
        FastJacobian(model, params, x)
    jac = FastJacobian(model, params, x, randomness="different")
    assert set(jac.param_paths.values()) == {"linear"}


def test_low_precision_model_gram_upcast():
    """A bf16 model: the Gram is float64 and matches the float64 model's to bf16 precision."""
    case = make_case("mlp_ce", torch.float64)
    z = case.loss_fn.logit_grad(case.call(case.inputs).detach(), case.targets)
    want = FastJacobian(case.model, case.params, case.inputs).rows(z[None]).gram()
    case.model.to(torch.bfloat16)
    params = trainable_params(case.model)
    rows = FastJacobian(case.model, params, case.inputs.to(torch.bfloat16)).rows(z[None].to(torch.bfloat16))
    assert rows.gram().dtype == torch.float64
    assert ref.rel_err(rows.gram(), want) < 5e-2
    assert rows.combine(torch.ones(rows.n_rows, dtype=torch.float64)).dtype == torch.bfloat16


def test_train_mode_batchnorm_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ModelError, match="batch norm"):
        FastJacobian(model.train(), trainable_params(model), x)
    jac = FastJacobian(model.eval(), trainable_params(model), x)
    assert jac.param_paths["1.weight"] == "batchnorm" and jac.param_paths["0.weight"] == "linear"


def test_batch_grads_under_no_grad():
    case = make_case("mlp_ce", torch.float64)
    with torch.no_grad():
        bf, bv = both(case)
        assert ref.rel_err(directions.ief(bf.rows, bf.s, 1e-6), directions.ief(bv.rows, bv.s, 1e-6)) < 1e-10
        v = torch.ones(bf.layout.size, dtype=torch.float64)
        assert ref.rel_err(bf.jac.jvp(v), bv.jac.jvp(v)) < 1e-12
        assert ref.rel_err(bf.jac.vjp(bf.logit_grads), bv.jac.vjp(bv.logit_grads)) < 1e-12


class SeqFirst(nn.Module):
    """A batch-first model around PyTorch's seq-first encoder layer: inside it dim 0 is time."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(d_model=4, nhead=1, dim_feedforward=6, dropout=0.0)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x (N, T, 4)
        h = self.enc(x.transpose(0, 1)).transpose(0, 1)
        return self.head(h.mean(dim=1))


def test_seq_first_layers_fall_back():
    torch.manual_seed(0)
    model = SeqFirst().double().eval()
    params = trainable_params(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)  # N = 3 != T = 5
    y = torch.randint(0, 3, (3,), generator=gen)
    bf = batch_grads(model, params, x, y, CrossEntropy(), jacobian="fast")
    bv = batch_grads(model, params, x, y, CrossEntropy(), jacobian="vmap")
    assert bf.jac.param_paths["enc.linear1.weight"] == "vmap" and bf.jac.param_paths["head.weight"] == "linear"
    assert "leading dim" in bf.jac.fallback_reasons["enc.linear1.weight"]
    assert ref.rel_err(bf.rows.gram(), bv.rows.gram()) < 1e-12


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any op produces while active."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def _wide_models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 4))
    cnn = nn.Sequential(nn.Conv2d(3, 32, 3), nn.Tanh(), nn.Flatten(), nn.Linear(32 * 6 * 6, 4))
    gen = torch.Generator().manual_seed(0)
    return {
        "mlp": (mlp.double().eval(), torch.randn(8, 16, generator=gen, dtype=torch.float64)),
        "cnn": (cnn.double().eval(), torch.randn(8, 3, 8, 8, generator=gen, dtype=torch.float64)),
    }


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_no_n_by_p_tensor_on_fast_path(name):
    """The fast path never creates an N x P tensor (nor anything near it); the plain path does."""
    model, x = _wide_models()[name]
    params = trainable_params(model)
    y = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(1))
    n, p = 8, sum(t.numel() for t in params.values())
    sizes = {}
    for path in ("fast", "vmap"):
        with _LargestTensor() as probe:
            bg = batch_grads(model, params, x, y, CrossEntropy(), jacobian=path)
            directions.ief(bg.rows, bg.s, 1e-6)
            _ = bg.g
        sizes[path] = probe.max_numel
    assert sizes["vmap"] >= n * p
    # the largest is a P-vector (the direction) or an activation, far below N x P
    assert sizes["fast"] * 4 < n * p, (sizes, n * p)


# ---------------------------------------------------------------- each block against its dense twin


def _columns(layout, names, dense):
    """The columns of ``dense`` (M, P) that belong to ``names``, in that order."""
    offsets = dict(zip(layout.names, torch.cumsum(torch.tensor((0,) + layout.numels), 0).tolist()))
    sizes = dict(zip(layout.names, layout.numels))
    return torch.cat([dense[:, offsets[n]: offsets[n] + sizes[n]] for n in names], dim=1)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_every_block_equals_its_dense_twin(name, monkeypatch):
    """Per block, in float64, with K = 2 label sets: matrix() equals the autograd loop's columns, and
    gram / combine / dot equal the products of that dense matrix. The chunk sizes are shrunk so every
    blocked loop (combine over output units, ghost rows, materialised columns) runs more than one block."""
    monkeypatch.setattr(fastblocks, "COMBINE_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(fastblocks, "COMBINE_CHUNK_ELEMENTS_ACCEL", 1)
    monkeypatch.setattr(fastblocks, "GHOST_CHUNK_ELEMENTS", 8)
    case = make_case(name, torch.float64)
    jac = FastJacobian(case.model, case.params, case.inputs)
    yhat = case.loss_fn.sample(jac.logits, case.targets, 2, torch.Generator().manual_seed(4))
    u = torch.stack([case.loss_fn.logit_grad(jac.logits, yhat[i]) for i in range(2)])
    rows = jac.rows(u)
    dense = torch.cat([ref.per_sample_grads(case, yhat[i]) for i in range(2)])  # (2N, P), k-major
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(dense.shape[0], dtype=torch.float64, generator=gen)
    v = torch.randn(jac.layout.size, dtype=torch.float64, generator=gen)
    vd = jac.layout.unflatten(v)
    assert rows.blocks, name
    for block in rows.blocks:
        want = _columns(jac.layout, block.names, dense)
        mat = block.matrix()
        assert mat.shape == want.shape and ref.rel_err(mat, want) < 1e-12, (name, block.kind)
        assert ref.rel_err(block.gram(), want @ want.T) < 1e-12, (name, block.kind)
        assert ref.rel_err(block.dot(vd), want @ _columns(jac.layout, block.names, v[None])[0]) < 1e-12
        views = {n: torch.full(s, float("nan"), dtype=torch.float64) for n, s in zip(jac.layout.names, jac.layout.shapes)}
        block.combine_into(x, views)
        got = torch.cat([views[n].reshape(-1) for n in block.names])
        assert ref.rel_err(got, want.T @ x) < 1e-12, (name, block.kind)


def test_sequence_block_strategies_equal_dense_twin(monkeypatch):
    """The ghost and materialise forms of a sequence Linear against the dense twin, several row chunks."""
    case = make_case("transformer_tokce", torch.float64)
    dense = ref.per_sample_grads(case)
    for cap, label in ((0, "ghost"), (1 << 40, "materialise")):
        monkeypatch.setattr(fastblocks, "MATERIALISE_MAX_ELEMENTS", cap)
        monkeypatch.setattr(fastblocks, "GHOST_CHUNK_ELEMENTS", 16)
        jac = FastJacobian(case.model, case.params, case.inputs)
        z = case.loss_fn.logit_grad(jac.logits, case.targets)
        rows = jac.rows(z[None])
        q = next(b for b in rows.blocks if "q.weight" in b.names)
        assert q.strategy == label
        want = _columns(jac.layout, q.names, dense)
        assert ref.rel_err(q.gram(), want @ want.T) < 1e-12


@pytest.mark.parametrize("name", ["mlp_ce", "transformer_tokce"])
def test_compiled_model_is_not_a_silent_zero(name):
    """batch_grads on a torch.compile wrapper (params named _orig_mod.*): the fast path runs the original
    module (its hooks would not see inside the compiled code: a ZERO direction before) and gives the
    uncompiled model's rows under the wrapper's names; the vmap fallback (the transformer's pos) too."""
    case = make_case(name, torch.float64)
    bg = batch_grads(case.model, case.params, case.inputs, case.targets, case.loss_fn, jacobian="fast")
    compiled = torch.compile(case.model, backend="aot_eager")
    params = trainable_params(compiled)
    assert all(k.startswith("_orig_mod.") for k in params)
    bc = batch_grads(compiled, params, case.inputs, case.targets, case.loss_fn, jacobian="fast")
    assert bc.layout.names == tuple(params)
    assert ref.rel_err(bc.rows.gram(), bg.rows.gram()) < 1e-12
    assert ref.rel_err(directions.ief(bc.rows, bc.s, 1e-6), directions.ief(bg.rows, bg.s, 1e-6)) < 1e-10
    v = torch.randn(bc.layout.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert ref.rel_err(bc.jac.jvp(v), bg.jac.jvp(v)) < 1e-12
    with pytest.raises(ModelError, match="torch.compile wrapper"):
        FastJacobian(compiled, case.params, case.inputs)


@pytest.mark.parametrize("seq", [False, True], ids=["outer", "materialise"])
def test_low_precision_model_combine_matches_float64(seq):
    """A bf16 model: J^T x lands in bf16 from float32 blocks (an outer Linear, and a sequence Linear
    whose kept per-sample gradients are float32), equal to the float64 model's to bf16 precision."""
    torch.manual_seed(0)
    t = 5 if seq else 1
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Flatten(), nn.Linear(6 * t, 3)).double().eval()
    x = torch.randn(7, t, 4, dtype=torch.float64) if seq else torch.randn(7, 4, dtype=torch.float64)
    u = torch.randn(1, 7, 3, dtype=torch.float64)
    coef = torch.randn(7, dtype=torch.float64)
    want = FastJacobian(model, trainable_params(model), x).rows(u).combine(coef)
    model.to(torch.bfloat16)
    rows = FastJacobian(model, trainable_params(model), x.to(torch.bfloat16)).rows(u.to(torch.bfloat16))
    if seq:
        assert rows.strategies["0.weight"] == "linear:materialise"
    rows.gram()  # as in a step: a materialised layer keeps its float32 per-sample gradients for J^T x
    got = rows.combine(coef)
    assert got.dtype == torch.bfloat16
    assert ref.rel_err(got.double(), want) < 5e-2

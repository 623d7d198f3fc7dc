"""The layer rules (Conv1d, BatchNorm in eval mode, GroupNorm, RMSNorm) and the per-module fallback of FastJacobian: modules without a rule are replayed per sample ON THEIR OWN
(only their parameters as variables), never the whole model; everything equals a loop of
torch.autograd.grad in float64 (Gram, J^T x, J v and the dense rows) on models mixing covered and
uncovered modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference as ref
from iefcli.core import CrossEntropy, batch_grads, trainable_params


class Pool(nn.Module):
    def forward(self, x):
        return x.mean(dim=1) if x.dim() == 3 else x.flatten(1)


class Scale(nn.Module):
    """A module without a rule: the per-module fallback replays it alone."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.scale + torch.sin(self.scale)


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
    elif name == "conv1d_strided":
        m = nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=2), nn.Tanh(), nn.Flatten(),
                          nn.Linear(12, 3))
        x = torch.randn(5, 2, 8)
    elif name == "batchnorm1d_seq":
        norm = nn.BatchNorm1d(4)
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        m = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), norm, nn.Tanh(), nn.Flatten(), nn.Linear(24, 3))
        x = torch.randn(5, 2, 6)
    elif name == "tied":
        from iefcli.eval.bench import _Tied

        m, x = _Tied(13, 6), torch.randint(0, 13, (5, 4))
    elif name == "custom":
        m = nn.Sequential(nn.Linear(4, 6), Scale(6), nn.Tanh(), nn.Linear(6, 3))
        x = torch.randn(5, 4)
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
    return m, (x if name == "tied" else x.double()), y


PATHS = {  # parameter -> the path it must take
    "conv1d": {"0.weight": "conv1d", "0.bias": "conv1d"},
    "conv1d_strided": {"0.weight": "conv1d", "0.bias": "conv1d"},
    "groupnorm": {"1.weight": "groupnorm", "1.bias": "groupnorm", "0.weight": "conv2d"},
    "batchnorm": {"1.weight": "batchnorm", "1.bias": "batchnorm"},
    "batchnorm1d_seq": {"1.weight": "batchnorm", "1.bias": "batchnorm"},
    "rmsnorm": {"1.weight": "rmsnorm"},
    "mha": {p: "attention" for p in ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                                     "attn.out_proj.bias")},
    "mha_noweights": {"attn.in_proj_weight": "attention", "attn.out_proj.weight": "attention"},
    "encoder": {"1.self_attn.in_proj_weight": "attention", "1.self_attn.out_proj.weight": "attention",
                "1.linear1.weight": "linear", "1.norm1.weight": "layernorm"},
    "custom": {"1.scale": "replay", "0.weight": "linear"},
    "tied": {"emb.weight": "tied", "out.bias": "linear", "mix.weight": "linear"},
}


def _loop_rows(m, x, y):
    """(N, P) per-sample gradients of the unscaled cross-entropy, one autograd.grad per sample."""
    return ref.module_rows(m, x, y, lambda z, t: nn.functional.cross_entropy(z, t, reduction="sum"))


@pytest.mark.parametrize("conv", ["grouped", "patches", "unfold"])
@pytest.mark.parametrize("name", list(PATHS))
def test_rules_and_per_module_fallback_equal_the_loop(name, conv, monkeypatch):
    """Convolutions: per-sample weight gradients by one grouped weight-gradient convolution or by
    strided-view patches and a bmm (few input channels), J^T x by torch's weight-gradient kernel; and
    by unfolded patches throughout (layers whose per-sample gradients would exceed
    MATERIALISE_MAX_ELEMENTS). Each form forced here."""
    if conv != "grouped" and "conv" not in name and name not in ("groupnorm", "batchnorm", "batchnorm1d_seq"):
        pytest.skip("no convolution")
    from iefcli.core.fast import blocks as fastblocks

    unfold = conv == "unfold"
    if unfold:
        monkeypatch.setattr(fastblocks, "MATERIALISE_MAX_ELEMENTS", 1)
    big = 1 << 30 if conv == "patches" else 0
    monkeypatch.setattr(fastblocks, "IM2COL_MAX_FAN_IN_1D", big)
    monkeypatch.setattr(fastblocks, "IM2COL_MAX_FAN_IN_2D", big)
    m, x, y = _model(name)
    params = trainable_params(m)
    bf = batch_grads(m, params, x, y, CrossEntropy(), jacobian="fast")
    paths = bf.jac.param_paths
    assert all(paths[p] == want for p, want in PATHS[name].items()), paths
    assert "vmap" not in paths.values(), paths  # never the whole model
    rf = bf.rows
    ref.check_rows(rf, _loop_rows(m, x, y))  # and each block's gram equals its dense twin's
    for blk in rf.blocks:
        if blk.kind.startswith("conv"):
            assert (blk.strategy == "native") != unfold, blk.strategy


def test_attention_weights_used_downstream_take_the_whole_model_path():
    """On the attention rule E is the total derivative, so weights reaching the loss are exact; the
    replay's tuple check (weights reaching the loss -> whole model) is in tests/test_fast_attn.py."""
    m, x, y = _model("mha")
    m.use_weights = True  # the second output reaches the loss: replaying only output 0 would be wrong
    bf, bv = ref.fast_and_plain(m, x, y)
    assert bf.jac.param_paths["attn.in_proj_weight"] == "attention"
    assert ref.rel_err(bf.rows.gram(), bv.rows.gram()) < 1e-12


def test_float32_replay_close_to_plain():
    m, x, y = _model("encoder")
    m, x = m.float(), x.float()
    bf, bv = ref.fast_and_plain(m, x, y)
    assert ref.rel_err(bf.rows.gram(), bv.rows.gram()) < 1e-5


class ScaleOutside(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.s, self.b = nn.Linear(4, 6), Scale(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.s(self.a(x)))) + self.s.scale[:3]  # the module's parameter read outside it


def test_parameter_used_outside_its_replayed_module_takes_the_whole_model_path():
    torch.manual_seed(0)
    m = ScaleOutside().double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(1))
    bf = batch_grads(m, trainable_params(m), x, y, CrossEntropy(), jacobian="fast")
    assert bf.jac.param_paths["s.scale"] == "vmap"
    assert "outside the module" in bf.jac.fallback_reasons["s.scale"]
    J = _loop_rows(m, x, y)
    assert ref.rel_err(bf.rows.gram(), J @ J.T) < 1e-12


def test_gru_is_named_in_one_line():
    from iefcli.errors import ModelError

    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 8, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0][:, -1]

    torch.manual_seed(0)
    m = nn.Sequential(Last(), nn.Linear(8, 3)).eval()
    x, y = torch.randn(5, 6, 4), torch.randint(0, 3, (5,))
    with pytest.raises(ModelError, match=r"module 0\.rnn \(GRU\) has no fast rule") as e:
        batch_grads(m, trainable_params(m), x, y, CrossEntropy(), jacobian="fast").rows.gram()
    assert "\n" not in str(e.value)


class PosModel(nn.Module):
    """Token + position embeddings, the position ids shared by the batch (leading dim 1), as in BERT."""

    def __init__(self, squeeze: bool = False):
        super().__init__()
        self.tok, self.pos = nn.Embedding(11, 6), nn.Embedding(7, 6)
        self.head = nn.Linear(6, 3)
        self.squeeze = squeeze

    def forward(self, ids):
        p = self.pos(torch.arange(ids.shape[1]).unsqueeze(0))
        if self.squeeze:
            p = p.reshape(ids.shape[1], 6)  # shape-specific code: the expansion must not break it
        return self.head(torch.tanh(self.tok(ids) + p).mean(dim=1))


@pytest.mark.parametrize("static", [False, True], ids=["unique", "static"])
@pytest.mark.parametrize("squeeze", [False, True])
def test_broadcast_position_embedding(squeeze, static, monkeypatch):
    """Also the embedding Gram's static-shape form (accelerators: no host sync), forced on CPU,
    with repeated token ids and K = 1."""
    from iefcli.core.fast import blocks as fastblocks

    monkeypatch.setattr(fastblocks, "EMBEDDING_GRAM_STATIC", static)
    monkeypatch.setattr(fastblocks, "GHOST_CHUNK_ELEMENTS", 40)  # several row chunks
    torch.manual_seed(0)
    m = PosModel(squeeze).double().eval()
    x = torch.randint(0, 5, (5, 4), generator=torch.Generator().manual_seed(4))  # ids repeat within and across rows
    y = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(1))
    bf = batch_grads(m, trainable_params(m), x, y, CrossEntropy(), jacobian="fast")
    assert bf.jac.param_paths["pos.weight"] == ("vmap" if squeeze else "embedding"), bf.jac.param_paths
    J = _loop_rows(m, x, y)
    rf = bf.rows
    assert ref.rel_err(rf.matrix, J) < 1e-12
    assert ref.rel_err(rf.gram(), J @ J.T) < 1e-12
    for blk in rf.blocks:
        mat = blk.matrix()
        assert ref.rel_err(blk.gram(), mat @ mat.T) < 1e-12, blk.kind
    v = torch.randn(J.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert ref.rel_err(rf.dot(v), J @ v) < 1e-12


@pytest.mark.parametrize("m,k", [(1, 3), (3, 5), (5, 2), (7, 9), (8, 8), (13, 4)])
def test_symmetric_gram_by_blocks_equals_the_product(m, k, monkeypatch):
    from iefcli.core.fast import blocks as fastblocks

    monkeypatch.setattr(fastblocks, "SYMMETRIC_GRAM_MIN_ROWS", 1)
    monkeypatch.setattr(fastblocks, "SYMMETRIC_GRAM_MIN_COLS", 1)
    a = torch.randn(m, k, dtype=torch.float64, generator=torch.Generator().manual_seed(m * k))
    want = torch.stack([torch.stack([a[i] @ a[j] for j in range(m)]) for i in range(m)])
    assert ref.rel_err(fastblocks._aat(a), want) < 1e-14


@pytest.mark.parametrize("name", ["encoder", "tied", "groupnorm", "conv1d"])
def test_rules_with_symmetric_block_grams_equal_the_loop(name, monkeypatch):
    from iefcli.core.fast import blocks as fastblocks

    monkeypatch.setattr(fastblocks, "SYMMETRIC_GRAM_MIN_ROWS", 1)
    monkeypatch.setattr(fastblocks, "SYMMETRIC_GRAM_MIN_COLS", 1)
    m, x, y = _model(name)
    bf = batch_grads(m, trainable_params(m), x, y, CrossEntropy(), jacobian="fast")
    ref.check_rows(bf.rows, _loop_rows(m, x, y))

"""The attention rule (nn.MultiheadAttention / TransformerEncoderLayer without a per-sample replay):
its forward equals nn.MultiheadAttention's, and Gram, J^T x, J v and the dense rows equal a loop of
torch.autograd.grad in float64 over a table of variants (batch_first both ways, attn_mask bool/float
2-D/3-D, key_padding_mask, bias on/off, kdim/vdim, cross-attention, need_weights, weights used
downstream, is_causal); what the rule does not cover is replayed as before and still exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference as ref
from iefcli.core import CrossEntropy, batch_grads, trainable_params
from iefcli.core.fast.attention import attention_forward, attention_rule

L = 4  # sequence length (query); the source is S = 5 in cross-attention cases
D = 8


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, D))

    def forward(self, x):
        return x * self.s + torch.sin(self.s)


class AttnNet(nn.Module):
    """Batch-first input (N, L, 4) -> logits (N, 3) through one nn.MultiheadAttention, in many configurations.
    Masks are functions of each sample, so the per-sample loop sees the same masks."""

    def __init__(self, *, batch_first=True, bias=True, kdim=None, vdim=None, cross=False, kv_same=True,
                 mask=None, kpm=False, need_weights=False, average=True, use_weights=False, causal=False,
                 add_bias_kv=False, heads=2, scale=False):
        super().__init__()
        self.emb = nn.Linear(4, D)
        cross = cross or kdim is not None or vdim is not None
        self.src = nn.Linear(4, kdim or D) if cross else None
        self.src_v = nn.Linear(4, vdim or D) if cross and not (kv_same and kdim == vdim) else None
        self.attn = nn.MultiheadAttention(D, heads, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first,
                                          add_bias_kv=add_bias_kv)
        # a module without a rule (replayed on its own) or a root parameter (the whole-model path)
        self.scale = Scale() if scale == "module" else nn.Parameter(torch.linspace(0.5, 1.5, D)) if scale else None
        self.head = nn.Linear(D, 3)
        self.cfg = dict(cross=cross, kv_same=kv_same and kdim == vdim,
                        mask=mask, kpm=kpm, need_weights=need_weights, average=average, use_weights=use_weights,
                        causal=causal, heads=heads)

    def forward(self, x):
        c, bf = self.cfg, self.attn.batch_first
        h = torch.tanh(self.emb(x))  # (N, L, D)
        if c["cross"]:
            xs = torch.cat([x, x[:, :1] * 0.5], dim=1)  # source length 5
            k = torch.tanh(self.src(xs))
            v = k if c["kv_same"] else torch.tanh(self.src_v(xs))
        else:
            k = v = h
        n, s = x.shape[0], k.shape[1]
        kw = {}
        if c["mask"] == "bool2d":
            kw["attn_mask"] = torch.triu(torch.ones(L, s, dtype=torch.bool), diagonal=1)
        elif c["mask"] == "float3d":  # per sample and head
            m = -(x[:, :, 1:2] ** 2) * torch.arange(1, s + 1, dtype=x.dtype)  # (N, L, S)
            kw["attn_mask"] = (m[:, None] * torch.arange(1, c["heads"] + 1, dtype=x.dtype)[None, :, None, None]
                               ).reshape(n * c["heads"], L, s)
        if c["causal"]:
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, dtype=x.dtype)
            kw["is_causal"] = True
        if c["kpm"]:  # ignore source positions with a large first feature, never position 0
            xs = x if s == L else torch.cat([x, x[:, :1] * 0.5], dim=1)
            pad = xs[..., 0] > 0.7
            pad[:, 0] = False
            kw["key_padding_mask"] = pad
        q = h
        if not bf:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
            if q is not k and not c["cross"]:
                k = v = q
        a, w = self.attn(q, k, v, need_weights=c["need_weights"], average_attn_weights=c["average"], **kw)
        if not bf:
            a = a.transpose(0, 1)
        if isinstance(self.scale, nn.Module):
            a = self.scale(a)
        elif self.scale is not None:
            a = a * self.scale
        out = self.head(a.mean(dim=1))
        if c["use_weights"]:
            out = out + w.reshape(n, -1).sum(dim=1, keepdim=True) * torch.tensor([1.0, -0.5, 0.25], dtype=x.dtype)
        return out


CASES = {
    "self": {},
    "seq_first": {"batch_first": False},
    "no_bias": {"bias": False},
    "bool2d_mask": {"mask": "bool2d"},
    "float3d_mask": {"mask": "float3d"},
    "kpm": {"kpm": True},
    "kpm_mask_seq_first": {"kpm": True, "mask": "float3d", "batch_first": False},
    "weights": {"need_weights": True},
    "weights_per_head_used": {"need_weights": True, "average": False, "use_weights": True, "mask": "float3d"},
    "causal": {"causal": True},
    "causal_weights": {"causal": True, "need_weights": True},
    "cross_packed": {"cross": True, "kpm": True},
    "cross_packed_kv_differ": {"cross": True, "kv_same": False},
    "kdim_vdim": {"kdim": 6, "vdim": 5, "kv_same": False, "need_weights": True},
    "kdim_vdim_no_bias_seq_first": {"kdim": 6, "vdim": 5, "bias": False, "batch_first": False},
    "with_replayed_module": {"scale": "module"},
    "with_root_parameter": {"scale": True, "batch_first": False},
}


def _batch(n=5):
    """The fixed float64 inputs (n, L, 4) and labels every test here uses."""
    x = torch.randn(n, L, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(1))
    return x, y


def _case(name, n=5):
    torch.manual_seed(0)
    m = AttnNet(**CASES[name]).double().eval()
    return (m, *_batch(n))


def _fast(m):
    """(x, y, the fast path's BatchGrads) of ``m`` on the fixed batch."""
    x, y = _batch()
    return x, y, batch_grads(m, trainable_params(m), x, y, CrossEntropy(), jacobian="fast")


def _loop_rows(m, x, y):
    """(N, P) per-sample gradients of the unscaled cross-entropy, one autograd.grad per sample."""
    return ref.module_rows(m, x, y, lambda z, t: nn.functional.cross_entropy(z, t, reduction="sum"))


_check_rows = ref.check_rows


@pytest.mark.parametrize("name", list(CASES))
def test_attention_rule_equals_the_loop(name):
    m, x, y = _case(name)
    params = trainable_params(m)
    bf = batch_grads(m, params, x, y, CrossEntropy(), jacobian="fast")
    paths = bf.jac.param_paths
    attn = [p for p in paths if p.startswith("attn.")]
    assert attn and all(paths[p] == "attention" for p in attn), (paths, bf.jac.fallback_reasons)
    if name == "with_replayed_module":
        assert paths["scale.s"] == "replay", paths
    if name == "with_root_parameter":  # a root parameter takes the whole-model path, the attention held fixed
        assert paths.pop("scale") == "vmap", paths
    assert "vmap" not in paths.values(), paths
    _check_rows(bf.rows, _loop_rows(m, x, y))


@pytest.mark.parametrize("strategy", ["ghost", "materialise"])
def test_attention_rule_both_sequence_strategies(strategy, monkeypatch):
    """The in/out projections are sequence Linear blocks: both Gram forms, K = 2 cotangent sets."""
    from iefcli.core.fast import blocks as fastblocks
    from iefcli.core.jacobian import make_jacobian

    if strategy == "ghost":
        monkeypatch.setattr(fastblocks, "MATERIALISE_MAX_ELEMENTS", 1)
    m, x, y = _case("kpm")
    params = trainable_params(m)
    jac = make_jacobian(m, params, x, jacobian="fast")
    u = torch.randn(2, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    rf = jac.rows(u)
    assert {b.strategy for b in rf.blocks if b.kind == "attention"} == {strategy}
    # reference: rows (k, n) = J_n^T u_kn by one autograd.grad per row
    named = dict(m.named_parameters())
    names = list(params)
    ps = [named[p] for p in names]
    rows = []
    for k in range(2):
        for n in range(5):
            gs = torch.autograd.grad((m(x[n : n + 1]) * u[k, n : n + 1]).sum(), ps)
            rows.append(torch.cat([g.reshape(-1) for g in gs]))
    assert names == list(rf.layout.names)
    _check_rows(rf, torch.stack(rows))


@pytest.mark.parametrize("name", ["self", "seq_first", "kpm_mask_seq_first", "weights_per_head_used", "causal_weights",
                                  "cross_packed_kv_differ", "kdim_vdim"])
def test_attention_forward_equals_the_module(name):
    m, x, _ = _case(name)
    seen = {}

    def grab(mod, args, kwargs, out):
        seen["args"], seen["kwargs"], seen["out"] = args, kwargs, out

    h = m.attn.register_forward_hook(grab, with_kwargs=True)
    m(x)
    h.remove()
    (out, w), parts = attention_forward(m.attn, *seen["args"], **seen["kwargs"])
    want, want_w = seen["out"]
    assert ref.rel_err(out, want) < 1e-14
    assert (w is None) == (want_w is None)
    if w is not None:
        assert ref.rel_err(w, want_w) < 1e-14
    assert parts["z_o"].shape[0] == x.shape[0]  # batch-first inside, whatever batch_first says


def test_float32_attention_close_to_plain():
    m, x, y = _case("kpm_mask_seq_first")
    m, x = m.float(), x.float()
    bf, bv = ref.fast_and_plain(m, x, y)
    assert bf.jac.param_paths["attn.in_proj_weight"] == "attention"
    assert ref.rel_err(bf.rows.gram(), bv.rows.gram()) < 1e-5


def test_encoder_layers_take_the_attention_rule():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True)
    m = nn.Sequential(nn.Linear(4, D), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                      nn.Flatten(), nn.Linear(L * D, 3)).double().eval()
    x, y, bf = _fast(m)
    paths = bf.jac.param_paths
    assert paths["1.layers.1.self_attn.in_proj_weight"] == "attention"
    assert paths["1.layers.0.self_attn.out_proj.bias"] == "attention"
    assert set(paths.values()) <= {"attention", "linear", "layernorm"}, paths
    _check_rows(bf.rows, _loop_rows(m, x, y))


def test_not_covered_is_replayed_and_exact():
    """add_bias_kv is not covered: the module is replayed on its own, as before the rule."""
    torch.manual_seed(0)
    m = AttnNet(add_bias_kv=True).double().eval()
    assert "add_bias_kv" in attention_rule(m.attn)
    x, y, bf = _fast(m)
    assert bf.jac.param_paths["attn.in_proj_weight"] == "replay"
    assert "add_bias_kv" in bf.jac.fallback_reasons["attn.in_proj_weight"]
    _check_rows(bf.rows, _loop_rows(m, x, y))


def test_not_covered_with_weights_used_takes_the_whole_model_path():
    """The replay replays output 0 only: attention weights reaching the loss send it to the whole model."""
    torch.manual_seed(0)
    m = AttnNet(add_bias_kv=True, need_weights=True, use_weights=True).double().eval()
    x, y, bf = _fast(m)
    assert bf.jac.param_paths["attn.in_proj_weight"] == "vmap"
    assert "tuple" in bf.jac.fallback_reasons["attn.in_proj_weight"]
    _check_rows(bf.rows, _loop_rows(m, x, y))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.attn, self.head = nn.Linear(4, D), nn.MultiheadAttention(D, 2, batch_first=True), nn.Linear(D, 3)

    def forward(self, x):
        h = torch.tanh(self.emb(x))
        h = self.attn(h, h, h, need_weights=False)[0]
        h = self.attn(h, h, h, need_weights=False)[0]  # the same module twice: no per-layer rule
        return self.head(h.mean(dim=1))


def test_attention_called_twice_falls_back_exactly():
    torch.manual_seed(0)
    m = Twice().double().eval()
    x, y, bf = _fast(m)
    assert bf.jac.param_paths["attn.in_proj_weight"] == "vmap"
    assert "called 2 times" in bf.jac.fallback_reasons["attn.in_proj_weight"]
    assert "forward" not in m.attn.__dict__  # the rule's forward is removed after the batched forward
    _check_rows(bf.rows, _loop_rows(m, x, y))


def test_attention_dropout_in_train_mode_is_not_covered():
    mha = nn.MultiheadAttention(D, 2, dropout=0.1).train()
    assert "dropout" in attention_rule(mha)
    assert attention_rule(mha.eval()) == ""


class ReadOutside(Twice):
    def forward(self, x):
        h = torch.tanh(self.emb(x))
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(dim=1)) + self.attn.out_proj.bias[:3]  # a parameter read outside the module


def test_attention_parameter_read_outside_falls_back_exactly():
    torch.manual_seed(0)
    m = ReadOutside().double().eval()
    x, y, bf = _fast(m)
    assert bf.jac.param_paths["attn.out_proj.bias"] == "vmap"
    assert "outside the module" in bf.jac.fallback_reasons["attn.out_proj.bias"]
    _check_rows(bf.rows, _loop_rows(m, x, y))


@pytest.mark.parametrize("name", ["self", "cross_packed", "kdim_vdim", "tied"])
def test_micro_batches_rebuild_the_attention_and_tied_blocks(name):
    """iefcli.dist concatenates each block's factors over micro-batches and rebuilds the same block types:
    the attention blocks (Linear / dense) and the tied block (its dense form) equal one batch."""
    from iefcli.core.methods import compute_direction
    from iefcli.dist.comm import Comm
    from iefcli.dist.grads import global_batch_grads

    if name == "tied":
        from iefcli.eval.bench import _Tied

        torch.manual_seed(0)
        m = _Tied(13, 6).double().eval()
        x = torch.randint(0, 13, (6, 4), generator=torch.Generator().manual_seed(2))
        y = torch.randint(0, 13, (6,), generator=torch.Generator().manual_seed(1))
    else:
        m, x, y = _case(name, n=6)
    p = trainable_params(m)
    one = batch_grads(m, p, x, y, CrossEntropy(), jacobian="fast")
    acc = global_batch_grads(m, p, x, y, CrossEntropy(), comm=Comm.local(), accumulate=3, keep_jacobians=True,
                             jacobian="fast")
    assert set(one.jac.param_paths.values()) & {"attention", "tied"}
    assert ref.rel_err(acc.rows.gram(), one.rows.gram()) < 1e-12
    d1, _ = compute_direction("ief", one, 1e-4)
    d2, _ = compute_direction("ief", acc, 1e-4)
    assert ref.rel_err(d2, d1) < 1e-10


def test_rule_forward_failure_falls_back_to_the_replay(monkeypatch):
    """An input the rule's forward rejects: the module's own forward runs, and the module is replayed."""
    from iefcli.core.fast import attention as fastattn

    def boom(*a, **k):
        raise RuntimeError("not covered")

    monkeypatch.setattr(fastattn, "attention_forward", boom)
    m, x, y = _case("kpm")
    bf = batch_grads(m, trainable_params(m), x, y, CrossEntropy(), jacobian="fast")
    assert bf.jac.param_paths["attn.in_proj_weight"] == "replay"
    assert "not covered" in bf.jac.fallback_reasons["attn.in_proj_weight"]
    _check_rows(bf.rows, _loop_rows(m, x, y))


class InPlaceAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.attn, self.head = nn.Linear(4, D), nn.MultiheadAttention(D, 2, batch_first=True), nn.Linear(D, 3)

    def forward(self, x):
        h = torch.tanh(self.emb(x))
        a = self.attn(h, h, h, need_weights=False)[0]
        a.mul_(2.0).tanh_()  # in place on the attention output
        return self.head(a.mean(dim=1))


def test_in_place_ops_on_the_attention_output():
    torch.manual_seed(0)
    m = InPlaceAfter().double().eval()
    x, y, bf = _fast(m)
    assert bf.jac.param_paths["attn.out_proj.weight"] == "attention"
    _check_rows(bf.rows, _loop_rows(m, x, y))


def test_large_packed_cross_attention_is_replayed(monkeypatch):
    """Packed weights on three different inputs are materialised (M x 3 E d): above the bound, the replay."""
    from iefcli.core.fast import blocks as fastblocks

    monkeypatch.setattr(fastblocks, "MATERIALISE_MAX_ELEMENTS", 5 * 3 * D * D - 1)
    m, x, y = _case("cross_packed_kv_differ")
    bf = batch_grads(m, trainable_params(m), x, y, CrossEntropy(), jacobian="fast")
    assert bf.jac.param_paths["attn.in_proj_weight"] == "replay"
    assert "too large" in bf.jac.fallback_reasons["attn.in_proj_weight"]
    _check_rows(bf.rows, _loop_rows(m, x, y))
    monkeypatch.setattr(fastblocks, "MATERIALISE_MAX_ELEMENTS", 5 * 3 * D * D)
    bf = batch_grads(m, trainable_params(m), x, y, CrossEntropy(), jacobian="fast")
    assert bf.jac.param_paths["attn.in_proj_weight"] == "attention"


@pytest.mark.parametrize("frozen", ["in_proj", "out_proj", "below_and_in_proj"])
def test_frozen_parts_of_the_attention(frozen):
    """Only some of the module's parameters trainable (the in-projection outputs are constants when the
    in-projection and everything below it are frozen)."""
    m, x, y = _case("kpm")
    for name, p in m.named_parameters():
        if (frozen in ("in_proj", "below_and_in_proj") and name.startswith("attn.in_proj")) or \
                (frozen == "out_proj" and name.startswith("attn.out_proj")) or \
                (frozen == "below_and_in_proj" and name.startswith("emb.")):
            p.requires_grad_(False)
    params = trainable_params(m)
    bf = batch_grads(m, params, x, y, CrossEntropy(), jacobian="fast")
    assert {bf.jac.param_paths[p] for p in params if p.startswith("attn.")} == {"attention"}
    _check_rows(bf.rows, _loop_rows(m, x, y))

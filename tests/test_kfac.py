"""K-FAC / eK-FAC / ieK-FAC maths against float64 references (loops of torch.autograd.grad, dense matrices)."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from iefcli.core.losses import CrossEntropy, TokenCrossEntropy
from iefcli.core.params import ParamLayout
from iefcli.kfac import factors as kf
from iefcli.kfac.capture import find_layers
from iefcli.kfac.optim import BatchCurvature, KFACOptions, batch_state, kfac_direction, layer_grad
from iefcli.optim.base import ModelFn

DT = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


def _ref_rows(model, x, targets, loss_fn, labels=None):
    """Per-sample gradients grad l_n (dict name -> (N, *shape)) by a loop of torch.autograd.grad."""
    labels = targets if labels is None else labels
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    ps = [p for p in model.parameters() if p.requires_grad]
    rows = {k: [] for k in names}
    for n in range(x.shape[0]):
        z = model(x[n:n + 1])
        l = loss_fn.per_sample(z, labels[n:n + 1]).sum()
        for k, g in zip(names, torch.autograd.grad(l, ps)):
            rows[k].append(g)
    return {k: torch.stack(v) for k, v in rows.items()}


def _ref_layer_rows(rule, rows):
    """(N, d_out, d_in[+1]) per-sample gradients of a layer in linear form."""
    return torch.stack([layer_grad(rule, {k: v[n] for k, v in rows.items()}) for n in range(next(iter(rows.values())).shape[0])])


class Seq(nn.Module):
    """A token model: (N, T, d) -> Linear -> tanh -> Linear -> (N, T, C)."""

    def __init__(self, d=3, h=4, c=3):
        super().__init__()
        self.l1 = nn.Linear(d, h)
        self.l2 = nn.Linear(h, c)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class EmbNet(nn.Module):
    def __init__(self, v=6, d=3, c=3):
        super().__init__()
        self.emb = nn.Embedding(v, d)
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, c)

    def forward(self, ids):
        return self.fc(self.norm(self.emb(ids)).mean(dim=1))


def _mlp(seed=0, sizes=(5, 4, 3)):
    torch.manual_seed(seed)  # test-local init
    layers = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(DT)


def _case(kind, n=5, seed=0):
    """(model, inputs, targets, loss_fn) for a small float64 case."""
    g = _gen(seed)
    torch.manual_seed(seed)
    if kind == "mlp":
        m = _mlp(seed)
        return m, torch.randn(n, 5, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g), CrossEntropy()
    if kind == "seq":
        m = Seq().to(DT)
        return m, torch.randn(n, 4, 3, generator=g, dtype=DT), torch.randint(0, 3, (n, 4), generator=g), TokenCrossEntropy()
    if kind == "conv":
        m = ConvNet().to(DT)
        return m, torch.randn(n, 2, 5, 5, generator=g, dtype=DT), torch.randint(0, 4, (n,), generator=g), CrossEntropy()
    if kind == "emb":
        m = EmbNet().to(DT)
        return m, torch.randint(0, 6, (n, 4), generator=g), torch.randint(0, 3, (n,), generator=g), CrossEntropy()
    raise ValueError(kind)


def _bc(model, x, y, loss_fn, fisher_type="empirical", seed=0):
    params = _params(model)
    rules, fb = find_layers(model, list(params))
    return BatchCurvature(ModelFn(model, loss_fn), params, x, y, rules, list(fb), fisher_type=fisher_type,
                          generator=_gen(seed)), rules, fb


# ----------------------------------------------------------------------------- capture and factors


@pytest.mark.parametrize("kind", ["mlp", "seq", "conv", "emb"])
def test_captured_a_e_give_the_per_sample_gradients(kind):
    """sum_t e_nt a_nt^T from the hooks equals the per-sample gradient from a loop of autograd.grad."""
    model, x, y, loss_fn = _case(kind)
    bc, rules, fb = _bc(model, x, y, loss_fn)
    rows = _ref_rows(model, x, y, loss_fn)
    assert rules
    for r in rules:
        got = kf.per_sample_layer_grads(bc.a[r.name], bc.e_true[r.name])
        torch.testing.assert_close(got, _ref_layer_rows(r, rows), rtol=1e-10, atol=1e-12)
    # the mean-loss gradient too
    for k, v in rows.items():
        torch.testing.assert_close(bc.grads[k], v.mean(0), rtol=1e-10, atol=1e-12)


def _explicit_patches(x, conv):
    """Unfolded patches by explicit slicing: (N, L, C_in*kh*kw), position-major over (i, j)."""
    p = conv.padding[0]
    xp = torch.nn.functional.pad(x, (p, p, p, p))
    k, s = conv.kernel_size[0], conv.stride[0]
    ho = (xp.shape[2] - k) // s + 1
    out = []
    for i in range(ho):
        for j in range(ho):
            out.append(xp[:, :, i * s:i * s + k, j * s:j * s + k].reshape(x.shape[0], -1))
    return torch.stack(out, dim=1)


def _out_grads(model, layer, x, y, loss_fn):
    """dl_n/dz_n at ``layer``'s output for every n, by a loop of autograd.grad on a forward hook's output."""
    outs = []
    h = layer.register_forward_hook(lambda m, i, o: outs.append(o))
    es = []
    for n in range(x.shape[0]):
        outs.clear()
        z = model(x[n:n + 1])
        (e,) = torch.autograd.grad(loss_fn.per_sample(z, y[n:n + 1]).sum(), outs[0])
        es.append(e[0])
    h.remove()
    return torch.stack(es)


@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_sequence_linear_factors_equal_explicit_sums(mode):
    model, x, y, loss_fn = _case("seq", n=4)
    bc, rules, _ = _bc(model, x, y, loss_fn)
    r = rules[0]  # l1 on raw inputs
    A, G = bc.factors(r, mode)
    e = _out_grads(model, model.l1, x, y, loss_fn)  # (N, T, d_out)
    a = torch.cat([x, torch.ones(*x.shape[:2], 1, dtype=DT)], dim=-1)
    N, T = x.shape[:2]
    if mode == "expand":
        A_ref = sum(torch.outer(a[n, t], a[n, t]) for n in range(N) for t in range(T)) / (N * T)
        G_ref = sum(torch.outer(e[n, t], e[n, t]) for n in range(N) for t in range(T)) / N
    else:
        A_ref = sum(torch.outer(a[n].mean(0), a[n].mean(0)) for n in range(N)) / N
        G_ref = sum(torch.outer(e[n].sum(0), e[n].sum(0)) for n in range(N)) / N
    torch.testing.assert_close(A, A_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(G, G_ref, rtol=1e-12, atol=1e-14)


def test_conv2d_factors_equal_explicit_sums():
    model, x, y, loss_fn = _case("conv", n=3)
    bc, rules, _ = _bc(model, x, y, loss_fn)
    r = next(r for r in rules if r.kind == "conv2d")
    A, G = bc.factors(r, "expand")
    a = _explicit_patches(x, model.conv)
    a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=DT)], dim=-1)
    e = _out_grads(model, model.conv, x, y, loss_fn).flatten(2).transpose(1, 2)  # (N, L, C_out)
    N, L = a.shape[:2]
    A_ref = sum(torch.outer(a[n, t], a[n, t]) for n in range(N) for t in range(L)) / (N * L)
    G_ref = sum(torch.outer(e[n, t], e[n, t]) for n in range(N) for t in range(L)) / N
    torch.testing.assert_close(A, A_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(G, G_ref, rtol=1e-12, atol=1e-14)


def test_linear_factors_equal_explicit_sums_and_embedding_is_diagonal():
    model, x, y, loss_fn = _case("mlp", n=6)
    bc, rules, _ = _bc(model, x, y, loss_fn)
    A, G = bc.factors(rules[0], "expand")
    a = torch.cat([x, torch.ones(6, 1, dtype=DT)], 1)
    e = _out_grads(model, model[0], x, y, loss_fn)
    torch.testing.assert_close(A, sum(torch.outer(v, v) for v in a) / 6, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(G, sum(torch.outer(v, v) for v in e) / 6, rtol=1e-12, atol=1e-14)
    m2, ids, y2, l2 = _case("emb", n=3)
    bc2, rules2, fb2 = _bc(m2, ids, y2, l2)
    r = next(r for r in rules2 if r.kind == "embedding")
    A2, _ = bc2.factors(r, "reduce")  # an embedding is always expanded: A is the token frequencies
    torch.testing.assert_close(A2, torch.bincount(ids.reshape(-1), minlength=6).to(DT) / ids.numel())
    assert set(fb2) == {"norm.weight", "norm.bias"}  # LayerNorm: the diagonal fallback


def test_sampled_factors_use_the_generator_and_sampled_labels():
    model, x, y, loss_fn = _case("mlp", n=4)
    bc1, rules, _ = _bc(model, x, y, loss_fn, fisher_type="sampled", seed=3)
    bc2, _, _ = _bc(model, x, y, loss_fn, fisher_type="sampled", seed=3)
    torch.testing.assert_close(bc1.e_fac["0"], bc2.e_fac["0"], rtol=0, atol=0)
    yhat = loss_fn.sample(model(x).detach(), y, 1, _gen(3))[0]
    rows = _ref_rows(model, x, y, loss_fn, labels=yhat)
    for r in rules:
        torch.testing.assert_close(kf.per_sample_layer_grads(bc1.a[r.name], bc1.e_fac[r.name]),
                                   _ref_layer_rows(r, rows), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- K-FAC


def _one_linear(n=1, bias=True, seed=0):
    torch.manual_seed(seed)
    m = nn.Linear(4, 3, bias=bias).to(DT)
    g = _gen(seed)
    return m, torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g), CrossEntropy()


@pytest.mark.parametrize("bias", [True, False])
def test_kfac_block_of_one_linear_layer_batch_of_one_is_exact(bias):
    """N = 1: (1/N) G (x) A is exactly the paper-scale matrix j_a j_a^T (j_a = grad l / N), and the
    K-FAC direction is (j_a j_a^T + lam I)^{-1} g."""
    model, x, y, loss_fn = _one_linear(1, bias)
    bc, rules, _ = _bc(model, x, y, loss_fn)
    r = rules[0]
    A, G = bc.factors(r, "expand")
    j = _ref_layer_rows(r, _ref_rows(model, x, y, loss_fn)).reshape(1, -1)
    torch.testing.assert_close(torch.kron(G, A), j.T @ j, rtol=1e-12, atol=1e-14)
    lam = 1e-3
    d, _ = kfac_direction("kfac", model, _params(model), x, y, loss_fn, lambda m, p, i: torch.func.functional_call(m, p, (i,)),
                          lam, options=KFACOptions(fisher_type="empirical"))
    g = j[0]
    d_ref = torch.linalg.solve(j.T @ j + lam * torch.eye(j.shape[1], dtype=DT), g)
    d_lin = layer_grad(r, ParamLayout.of(_params(model)).unflatten(d)).reshape(-1)
    torch.testing.assert_close(d_lin, d_ref, rtol=1e-9, atol=1e-12)


def test_kfac_direction_is_the_damped_kronecker_inverse_and_pi_damping():
    """N = 6, two layers: per layer d = (G/N (x) A + lam I)^{-1} g, and with pi-damping
    d = ((G/N + dG I) (x) (A + dA I))^{-1} g, dA dG = lam, dense references."""
    model, x, y, loss_fn = _case("mlp", n=6)
    params = _params(model)
    bc, rules, _ = _bc(model, x, y, loss_fn)
    lam = 1e-2
    layout = ParamLayout.of(params)
    fwd = lambda m, p, i: torch.func.functional_call(m, p, (i,))  # noqa: E731
    for split in ("eigen", "pi"):
        d, _ = kfac_direction("kfac", model, params, x, y, loss_fn, fwd, lam,
                              options=KFACOptions(fisher_type="empirical", damping_split=split))
        dd = layout.unflatten(d)
        for r in rules:
            A, G = bc.factors(r, "expand")
            g = layer_grad(r, bc.grads).reshape(-1)
            Gs = G / 6
            if split == "eigen":
                M = torch.kron(Gs, A) + lam * torch.eye(g.numel(), dtype=DT)
            else:
                dA, dG = kf.pi_split(A, G, 1 / 6, lam)
                pi = ((torch.trace(A) / A.shape[0]) / (torch.trace(Gs) / Gs.shape[0])).sqrt().item()  # Martens & Grosse
                assert pi != pytest.approx(1.0, abs=1e-3)  # the split is not the symmetric one here
                assert dA == pytest.approx(pi * lam ** 0.5, rel=1e-12) and dG == pytest.approx(lam ** 0.5 / pi, rel=1e-12)
                M = torch.kron(Gs + dG * torch.eye(Gs.shape[0], dtype=DT), A + dA * torch.eye(A.shape[0], dtype=DT))
            torch.testing.assert_close(layer_grad(r, dd).reshape(-1), torch.linalg.solve(M, g), rtol=1e-8, atol=1e-12)


# ----------------------------------------------------------------------------- eK-FAC and ieK-FAC


def _projected_ref(model, x, y, loss_fn, r, UA, UG, weights=None, labels=None):
    """1/N sum_n w_n (U_G^T J_n U_A)^2 from a loop of autograd.grad."""
    J = _ref_layer_rows(r, _ref_rows(model, x, y, loss_fn, labels=labels))
    w = torch.ones(J.shape[0], dtype=DT) if weights is None else weights
    P = torch.stack([UG.T @ Jn @ (UA if UA is not None else torch.eye(Jn.shape[1], dtype=DT)) for Jn in J])
    return (w[:, None, None] * P.pow(2)).mean(0)


@pytest.mark.parametrize("kind", ["mlp", "seq", "conv", "emb"])
def test_ekfac_diagonal_is_the_projected_second_moment(kind):
    model, x, y, loss_fn = _case(kind)
    bc, rules, _ = _bc(model, x, y, loss_fn)
    layers, _ = batch_state(bc, "ekfac", "expand")
    for r in rules:
        st = layers[r.name]
        ref = _projected_ref(model, x, y, loss_fn, r, st.get("UA"), st["UG"])
        torch.testing.assert_close(st["S"], ref, rtol=1e-9, atol=1e-13)
        # the basis is the factors' eigenbasis: U^T G U is diagonal
        Gd = st["UG"].T @ st["G"] @ st["UG"]
        torch.testing.assert_close(Gd, torch.diag(torch.diagonal(Gd)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "seq", "conv"])
def test_iekfac_diagonal_uses_ief_scaling(kind):
    """S_iEF = 1/N sum_n (U_G^T J_n U_A)^2 / s_n (true labels), s_n = ||dl_n/dz_n||^2."""
    model, x, y, loss_fn = _case(kind)
    bc, rules, _ = _bc(model, x, y, loss_fn, fisher_type="sampled")
    layers, _ = batch_state(bc, "iekfac", "expand")
    s = loss_fn.s(model(x).detach(), y)
    for r in rules:
        st = layers[r.name]
        ref = _projected_ref(model, x, y, loss_fn, r, st.get("UA"), st["UG"], weights=1 / s)
        torch.testing.assert_close(st["S"], ref, rtol=1e-9, atol=1e-13)


def test_iekfac_batch_of_one_equals_ief_matrix_block_in_the_eigenbasis():
    """N = 1: scale * S equals the diagonal of U^T M_iEF U, M_iEF = sum_n j_n j_n^T / s_n
    (the iEF matrix, scale-free under the paper's convention), for every layer of an MLP."""
    model, x, y, loss_fn = _case("mlp", n=1)
    bc, rules, _ = _bc(model, x, y, loss_fn)
    layers, _ = batch_state(bc, "iekfac", "expand")
    s = loss_fn.s(model(x).detach(), y)[0]
    rows = _ref_rows(model, x, y, loss_fn)
    for r in rules:
        j = _ref_layer_rows(r, rows).reshape(-1)
        M = torch.outer(j, j) / s
        U = torch.kron(layers[r.name]["UG"], layers[r.name]["UA"])
        got = (1 * layers[r.name]["S"]).reshape(-1)  # scale = N = 1
        torch.testing.assert_close(got, torch.diagonal(U.T @ M @ U), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("method", ["ekfac", "iekfac"])
def test_ekfac_direction_is_the_damped_eigenbasis_inverse(method):
    model, x, y, loss_fn = _case("mlp", n=6)
    params = _params(model)
    bc, rules, _ = _bc(model, x, y, loss_fn)
    layers, _ = batch_state(bc, method, "expand")
    lam = 1e-3
    fwd = lambda m, p, i: torch.func.functional_call(m, p, (i,))  # noqa: E731
    d, _ = kfac_direction(method, model, params, x, y, loss_fn, fwd, lam, options=KFACOptions(fisher_type="empirical"))
    dd = ParamLayout.of(params).unflatten(d)
    scale = 6.0 if method == "iekfac" else 1 / 6
    for r in rules:
        st = layers[r.name]
        U = torch.kron(st["UG"], st["UA"])
        M = U @ torch.diag(scale * st["S"].reshape(-1) + lam) @ U.T
        g = layer_grad(r, bc.grads).reshape(-1)
        torch.testing.assert_close(layer_grad(r, dd).reshape(-1), torch.linalg.solve(M, g), rtol=1e-8, atol=1e-12)


def test_fallback_diagonal_for_layers_without_a_rule():
    """LayerNorm parameters: d = g / (scale D + lam), D = 1/N sum_n j_n^2 (ekfac) or with 1/s_n (iekfac)."""
    model, ids, y, loss_fn = _case("emb", n=5)
    params = _params(model)
    fwd = lambda m, p, i: torch.func.functional_call(m, p, (i,))  # noqa: E731
    rows = _ref_rows(model, ids, y, loss_fn)
    s = loss_fn.s(model(ids).detach(), y)
    lam = 1e-3
    for method, w, scale in (("ekfac", torch.ones(5, dtype=DT), 1 / 5), ("iekfac", 1 / s, 5.0)):
        d, info = kfac_direction(method, model, params, ids, y, loss_fn, fwd, lam, options=KFACOptions(fisher_type="empirical"))
        dd = ParamLayout.of(params).unflatten(d)
        assert int(info["kfac_fallback_params"]) == 2
        for k in ("norm.weight", "norm.bias"):
            D = (w[:, None] * rows[k].pow(2)).mean(0)
            torch.testing.assert_close(dd[k], rows[k].mean(0) / (scale * D + lam), rtol=1e-9, atol=1e-13)


def test_capture_during_an_ordinary_forward_and_mean_loss_backward():
    """The hooks work on a user's plain model(x); loss.mean().backward() (e is then e/N: grad_scale=N)."""
    from iefcli.kfac.capture import Capture

    model, x, y, loss_fn = _case("conv", n=3)
    rules, fb = find_layers(model, [k for k, _ in model.named_parameters()])
    assert not fb
    with Capture(model, rules, grad_scale=3.0) as cap:
        loss_fn.per_sample(model(x), y).mean().backward()
    assert cap.check(3) == {}
    rows = _ref_rows(model, x, y, loss_fn)
    for r in rules:
        torch.testing.assert_close(kf.per_sample_layer_grads(cap.a(r), cap.e(r)), _ref_layer_rows(r, rows),
                                   rtol=1e-10, atol=1e-12)
    # hooks are gone after the block: another forward records nothing
    model(x)
    assert all(rec.calls == 1 for rec in cap.recs.values())


def test_a_layer_called_twice_is_refused_and_falls_back():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))

    torch.manual_seed(0)
    model = Twice().to(DT)
    g = _gen(1)
    x, y = torch.randn(4, 3, generator=g, dtype=DT), torch.randint(0, 2, (4,), generator=g)
    fwd = lambda m, p, i: torch.func.functional_call(m, p, (i,))  # noqa: E731
    d, info = kfac_direction("ekfac", model, _params(model), x, y, CrossEntropy(), fwd, 1e-3)
    assert int(info["kfac_layers"]) == 1 and int(info["kfac_fallback_params"]) == 2
    assert torch.isfinite(d).all()


def test_optim_config_and_kfac_options_share_their_defaults():
    """OptimConfig repeats KFACOptions' defaults (each module importing the other would be an import
    cycle through iefcli.optim): a recipe without K-FAC keys and the library's KFACOptions() must agree."""
    import dataclasses

    from iefcli.optim.base import OptimConfig

    config_fields = {f.name: f for f in dataclasses.fields(OptimConfig)}
    for f in dataclasses.fields(KFACOptions):
        assert f.name in config_fields, f.name
        assert config_fields[f.name].default == f.default, (f.name, config_fields[f.name].default, f.default)

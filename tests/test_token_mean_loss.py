"""TokenMeanCrossEntropy (the authors' token-level convention) against explicit float64 loops.

The reference is written in the AUTHORS' terms: L = (1/K) sum over the batch's valid tokens of
ce(z_nt, y_nt); their per-sample gradient is that of sample n's share of L, j_n = grad (1/K)
sum_t ce_nt; s_n = ||dL/dz_n||^2; iEF = J^T (J J^T + lam I)^{-1} s, EF = J^T (J J^T + lam I)^{-1} 1,
SF = (Jhat^T Jhat + lam I)^{-1} g with Jhat's rows the gradients of (1/N) ce at the drawn
first-token label. Each is built by loops over samples and tokens with torch.autograd.grad and
dense float64 solves, then compared with iefcli's internal convention at damping N^2 lam
(docs/DESIGN.md: the authors' damping is lam / N^2 of the internal one).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from iefcli import directions
from iefcli.core.jacobian import batch_grads, sampled_rows
from iefcli.core.losses import TokenCrossEntropy, TokenMeanCrossEntropy, get_loss
from iefcli.core.params import trainable_params
from iefcli.gamma import gamma

IGN = -100
DT = torch.float64


class SeqNet(nn.Module):
    """z_nt = tanh(x_nt A + mean_t(x_n) B) W: tokens of one sample share a context term."""

    def __init__(self, f: int = 3, h: int = 4, c: int = 5):
        super().__init__()
        self.a = nn.Parameter(torch.randn(f, h, dtype=DT))
        self.b = nn.Parameter(torch.randn(f, h, dtype=DT))
        self.w = nn.Parameter(torch.randn(h, c, dtype=DT))

    def forward(self, x):
        return torch.tanh(x @ self.a + x.mean(dim=1, keepdim=True) @ self.b) @ self.w


def _case():
    torch.manual_seed(0)
    model = SeqNet()
    n, t, c = 5, 4, 5
    x = torch.randn(n, t, 3, dtype=DT)
    y = torch.randint(0, c, (n, t))
    y[1, 0] = IGN  # sample 1: padding first (its first LABEL token is at t=1)
    y[2, 2:] = IGN
    y[4, 1:] = IGN
    return model, x, y


def _ce(zt, yt):
    return torch.logsumexp(zt, -1) - zt[yt]


def _token_list(y, first_only=False):
    out = []
    for n in range(y.shape[0]):
        ts = [t for t in range(y.shape[1]) if int(y[n, t]) != IGN]
        out.append(ts[:1] if first_only else ts)
    return out


def _authors_rows(model, x, y, first_only=False, labels=None):
    """(N, P) per-sample gradients of each sample's share of the authors' token-mean loss."""
    toks = _token_list(y, first_only)
    k = sum(len(ts) for ts in toks)
    params = list(model.parameters())
    rows = []
    for n in range(x.shape[0]):
        z = model(x)  # the context term couples the batch only within a sample; full forward is simplest
        share = sum((_ce(z[n, t], (labels if labels is not None else y)[n, t]) for t in toks[n]), torch.zeros((), dtype=DT)) / k
        gs = torch.autograd.grad(share, params, allow_unused=True) if share.requires_grad else [None] * len(params)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)]))
    return torch.stack(rows)


def _authors_s(model, x, y, first_only=False):
    z = model(x).detach().requires_grad_(True)
    toks = _token_list(y, first_only)
    k = sum(len(ts) for ts in toks)
    L = sum(_ce(z[n, t], y[n, t]) for n in range(len(toks)) for t in toks[n]) / k
    (gz,) = torch.autograd.grad(L, z)
    return gz.reshape(z.shape[0], -1).pow(2).sum(1), L.detach()


def _bg(model, x, y, loss):
    return batch_grads(model, trainable_params(model), x, y, loss, jacobian="vmap")


def test_loss_logit_grad_hvp_match_the_authors_batch_mean():
    model, x, y = _case()
    loss = TokenMeanCrossEntropy(IGN)
    z = model(x).detach()
    n = z.shape[0]
    s_ref, L_ref = _authors_s(model, x, y)
    # the batch mean of l_n is the authors' token mean
    assert torch.allclose(loss.per_sample(z, y).mean(), L_ref, rtol=1e-13, atol=0)
    # logit grads: l_n = N * (sample n's share), so dl_n/dz_n = N dL/dz_n and s = N^2 s_authors
    assert torch.allclose(loss.s(z, y), n * n * s_ref, rtol=1e-12, atol=0)
    # Hessian-vector product: N * the Hessian of L w.r.t. z_n (autograd double backward)
    v = torch.randn_like(z)
    zz = z.clone().requires_grad_(True)
    toks = _token_list(y)
    k = sum(len(ts) for ts in toks)
    L = sum(_ce(zz[i, t], y[i, t]) for i in range(n) for t in toks[i]) / k
    (gz,) = torch.autograd.grad(L, zz, create_graph=True)
    (hv,) = torch.autograd.grad((gz * v).sum(), zz)
    assert torch.allclose(loss.hvp(z, y, v), n * hv, rtol=1e-12, atol=1e-15)


def test_relation_to_the_per_sample_sum():
    """l_n = (N/K) * the summed token CE: the step is tokens-per-sample times smaller, the iEF direction the same."""
    model, x, y = _case()
    z = model(x).detach()
    n, k = y.shape[0], int((y != IGN).sum())
    summed, mean = TokenCrossEntropy(IGN), TokenMeanCrossEntropy(IGN)
    assert torch.allclose(mean.per_sample(z, y), summed.per_sample(z, y) * n / k, rtol=1e-13)
    b_sum, b_mean = _bg(model, x, y, summed), _bg(model, x, y, mean)
    lam = 1e-3
    d_sum = directions.ief(b_sum.rows, b_sum.s, lam, dup_threshold=None)
    d_mean = directions.ief(b_mean.rows, b_mean.s, lam * (n / k) ** 2, dup_threshold=None)
    assert torch.allclose(d_mean, d_sum * n / k, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("lam", [1e-1, 1e-4, 1e-8])
def test_ief_and_ef_match_the_authors_formulas(lam):
    model, x, y = _case()
    n = y.shape[0]
    Ja = _authors_rows(model, x, y)
    sa, _ = _authors_s(model, x, y)
    A = Ja @ Ja.T + lam * torch.eye(n, dtype=DT)
    d_ief_ref = Ja.T @ torch.linalg.solve(A, sa)
    d_ef_ref = Ja.T @ torch.linalg.solve(A, torch.ones(n, dtype=DT))
    bg = _bg(model, x, y, TokenMeanCrossEntropy(IGN))
    # internal convention: damping N^2 lam; iEF has the same scale, EF is N^2 smaller
    d_ief = directions.ief(bg.rows, bg.s, n * n * lam, dup_threshold=None)
    d_ef = directions.ef(bg.rows, n * n * lam, dup_threshold=None)
    assert torch.allclose(d_ief, d_ief_ref, rtol=1e-8, atol=1e-12 * d_ief_ref.abs().max())
    assert torch.allclose(n * n * d_ef, d_ef_ref, rtol=1e-8, atol=1e-12 * d_ef_ref.abs().max())
    # the mean gradient is the authors' gradient of L
    assert torch.allclose(bg.g, Ja.sum(0), rtol=1e-12, atol=1e-15)


def test_sf_resamples_only_the_first_label_token():
    model, x, y = _case()
    n = y.shape[0]
    loss = TokenMeanCrossEntropy(IGN)
    bg = _bg(model, x, y, loss)
    yhat = loss.sample(bg.logits, y, 1, torch.Generator().manual_seed(3))[0]
    first = [ts[:1] for ts in _token_list(y)]
    for i in range(n):  # exactly the first valid position is drawn, all else is padding
        assert [t for t in range(y.shape[1]) if int(yhat[i, t]) != IGN] == first[i]
    lam = 1e-3
    # authors: rows = grad of (1/N) ce(z_{n,first}, yhat_n), SF = (Jhat^T Jhat + lam I)^{-1} g
    Jh = _authors_rows(model, x, yhat, first_only=True)
    ga = _authors_rows(model, x, y).sum(0)
    p = Jh.shape[1]
    d_ref = torch.linalg.solve(Jh.T @ Jh + lam * torch.eye(p, dtype=DT), ga)
    rows = sampled_rows(bg, 1, torch.Generator().manual_seed(3))
    d = n * n * directions.sf(rows, bg.g, n * n * lam)
    assert torch.allclose(d, d_ref, rtol=1e-8, atol=1e-12 * d_ref.abs().max())


def test_first_token_scoring_gamma():
    """tokens='first': g, J, s and the GGN are those of the first label token's CE (the authors' gamma)."""
    model, x, y = _case()
    n = y.shape[0]
    bg = _bg(model, x, y, TokenMeanCrossEntropy(IGN, tokens="first"))
    toks = _token_list(y, first_only=True)
    params = list(model.parameters())
    # dense GGN of the first-token MEAN loss: (1/N) sum_n Jz_n^T H_n Jz_n, by loops
    G = 0
    for i in range(n):
        t = toks[i][0]
        jz = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(model(x)[i, t, c], params)])
                          for c in range(5)])  # (C, P)
        pr = torch.softmax(model(x)[i, t].detach(), -1)
        G = G + jz.T @ (torch.diag(pr) - torch.outer(pr, pr)) @ jz / n
    ga = _authors_rows(model, x, y, first_only=True).sum(0)
    assert torch.allclose(bg.g, ga, rtol=1e-12, atol=1e-15)
    d = torch.randn(ga.numel(), dtype=DT)
    d = d if torch.dot(d, ga) > 0 else -d
    ref = torch.sqrt(d @ G @ d) / torch.dot(d, ga)
    assert torch.allclose(gamma(bg, d), ref, rtol=1e-10)
    # and the first-token loss differs from the all-token one (the option does something)
    assert not torch.allclose(bg.g, _bg(model, x, y, TokenMeanCrossEntropy(IGN)).g)


def test_registry_and_bad_option():
    loss = get_loss("token_mean_cross_entropy", ignore_index=-1, tokens="first")
    assert isinstance(loss, TokenMeanCrossEntropy) and loss.ignore_index == -1 and loss.tokens == "first"
    with pytest.raises(ValueError, match="tokens"):
        TokenMeanCrossEntropy(tokens="last")


def test_sample_draws_from_the_first_label_tokens_predictive():
    """Near one-hot logits: the draw must follow the FIRST VALID position's predictive (not position 0)."""
    loss = TokenMeanCrossEntropy(IGN)
    y = torch.tensor([[2, 1, IGN], [IGN, 4, 0], [IGN, IGN, IGN]])
    z = torch.full((3, 3, 5), -50.0, dtype=DT)
    for i, (t, c) in enumerate([(0, 3), (0, 0), (0, 2)]):
        z[i, t, c] = 50.0
    z[0, 1, 4] = z[1, 1, 1] = z[1, 2, 2] = z[2, 1, 3] = 50.0
    yhat = loss.sample(z, y, 4, torch.Generator().manual_seed(0))
    assert yhat.shape == (4, 3, 3)
    assert (yhat[:, 0] == torch.tensor([3, IGN, IGN])).all()  # sample 0: position 0, its argmax 3
    assert (yhat[:, 1] == torch.tensor([IGN, 1, IGN])).all()  # sample 1: position 1 (0 is padding)
    assert (yhat[:, 2] == IGN).all()  # all padding: nothing drawn


def test_fast_jacobian_path_agrees():
    """The fast per-sample path only sees the logit-gradient cotangents: same Gram and g as vmap."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).to(DT)
    x = torch.randn(5, 4, 3, dtype=DT)
    y = torch.randint(0, 5, (5, 4))
    y[1, 0], y[2, 2:] = IGN, IGN
    loss = TokenMeanCrossEntropy(IGN)
    a = batch_grads(model, trainable_params(model), x, y, loss, jacobian="vmap")
    b = batch_grads(model, trainable_params(model), x, y, loss, jacobian="fast")
    assert torch.allclose(a.rows.gram(), b.rows.gram(), rtol=1e-12, atol=1e-14)
    assert torch.allclose(a.g, b.g, rtol=1e-12, atol=1e-15)

"""Per-sample losses with their closed-form logit gradients, Hessians and samplers.

Scale convention (used everywhere in iefcli): the per-sample loss l_n is not
divided by anything; the BATCH loss is the MEAN L = (1/N) sum_n l_n. The
gradients and directions of :mod:`iefcli.directions` are those of this mean.

Every loss gives, for logits z (N, ...) and targets y:
- ``per_sample(z, y)``  -> (N,)      l_n
- ``logit_grad(z, y)``  -> like z    d l_n / d z_n
- ``s(z, y)``           -> (N,)      s_n = ||d l_n / d z_n||_2^2
- ``hvp(z, y, v)``      -> like z    H_n v_n with H_n = d^2 l_n / d z_n^2
- ``hessian(z, y)``     -> (N, D, D) dense H_n over the flattened logits (tiny models, tests)
- ``sample(z, y, k, generator)`` -> (k, N, ...) targets drawn from the model's
  predictive p(y | z_n); randomness only from the explicit ``generator``.
- ``ggn_rank(z)``       -> K, rows per sample of the factor below
- ``ggn_factor(z, y)``  -> (U (K, N, ...), b (K, N)), float64, with
  sum_k U_kn U_kn^T = H_n and sum_k b_kn U_kn = d l_n / d z_n (exact NG, see
  :func:`iefcli.directions.ngd`).
For these losses the Fisher equals the generalised Gauss-Newton matrix.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class Loss(Protocol):
    name: str

    def per_sample(self, z: Tensor, y: Tensor) -> Tensor: ...
    def logit_grad(self, z: Tensor, y: Tensor) -> Tensor: ...
    def hvp(self, z: Tensor, y: Tensor, v: Tensor) -> Tensor: ...
    def hessian(self, z: Tensor, y: Tensor) -> Tensor: ...
    def sample(self, z: Tensor, y: Tensor, k: int, generator: torch.Generator | None) -> Tensor: ...
    def s(self, z: Tensor, y: Tensor) -> Tensor: ...


def _squared_norm_per_sample(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).pow(2).sum(dim=1)


class _Base:
    name = "base"

    def s(self, z: Tensor, y: Tensor) -> Tensor:
        """s_n = ||d l_n / d z_n||^2, shape (N,)."""
        return _squared_norm_per_sample(self.logit_grad(z, y))

    def ggn_rank(self, z: Tensor) -> int:
        """K, the number of factor rows per sample (generic: one per logit)."""
        return z[0].numel()

    def ggn_factor(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(U, b): H_n = sum_k U_kn U_kn^T, dl_n/dz_n = sum_k b_kn U_kn (float64).

        Generic form from the dense Hessian: H_n = V E V^T, U_kn = sqrt(e_k) v_k,
        b_kn = v_k . (dl_n/dz_n) / sqrt(e_k) (0 on eigenvalues at round-off level;
        exact when dl_n/dz_n lies in the range of H_n, as it does for losses whose
        Fisher is their GGN). Subclasses give closed forms.
        """
        z64 = z.detach().to(torch.float64)
        n, d = z64.shape[0], z64[0].numel()
        e, v = torch.linalg.eigh(self.hessian(z64, y))  # (N, D), (N, D, D)
        cut = e.abs().amax(dim=1, keepdim=True) * d * torch.finfo(torch.float64).eps
        live = e > cut
        root = torch.where(live, e.clamp_min(0).sqrt(), torch.zeros_like(e))
        u = (v * root[:, None, :]).permute(2, 0, 1)  # (D, N, D): U_kn = sqrt(e_k) v_k
        lg = self.logit_grad(z64, y).reshape(n, d)
        proj = torch.einsum("ndk,nd->kn", v, lg)
        b = torch.where(live.T, proj / torch.where(live, root, torch.ones_like(root)).T, torch.zeros_like(proj))
        return u.reshape(d, *z64.shape), b

    def hessian(self, z: Tensor, y: Tensor) -> Tensor:
        """Dense per-sample Hessians (N, D, D), D = numel of one sample's logits, from hvp."""
        n = z.shape[0]
        d = z[0].numel()
        eye = torch.eye(d, dtype=z.dtype, device=z.device)
        cols = [self.hvp(z, y, eye[i].expand(n, d).reshape(z.shape)).reshape(n, d) for i in range(d)]
        return torch.stack(cols, dim=2)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CrossEntropy(_Base):
    """Softmax cross-entropy on (N, C) logits with integer labels (N,).

    l_n = logsumexp(z_n) - z_n[y_n];  dl/dz = p - onehot(y);  H = diag(p) - p p^T.
    """

    name = "cross_entropy"

    def per_sample(self, z: Tensor, y: Tensor) -> Tensor:
        return torch.logsumexp(z, dim=-1) - z.gather(-1, y.unsqueeze(-1)).squeeze(-1)

    def logit_grad(self, z: Tensor, y: Tensor) -> Tensor:
        p = torch.softmax(z, dim=-1)
        return p - torch.nn.functional.one_hot(y, z.shape[-1]).to(z.dtype)

    def hvp(self, z: Tensor, y: Tensor, v: Tensor) -> Tensor:
        p = torch.softmax(z, dim=-1)
        return p * v - p * (p * v).sum(dim=-1, keepdim=True)

    def sample(self, z: Tensor, y: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        p = torch.softmax(z.detach().to(torch.float64), dim=-1)
        draws = torch.multinomial(p, k, replacement=True, generator=generator)  # (N, k)
        return draws.transpose(0, 1).contiguous()

    def ggn_rank(self, z: Tensor) -> int:
        return z.shape[-1] - 1

    def ggn_factor(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """C-1 rows per sample: U_k = -(w * q_k), b_k = q_k[y] / w_y (float64).

        w = sqrt(p) is a unit vector; q_1..q_{C-1} are the columns of the
        Householder reflector I - v v^T / (1 + w_j), v = w + e_j (j = argmax p),
        other than column j: an orthonormal basis of w's complement. Then
        sum_k U_k U_k^T = D_w (I - w w^T) D_w = diag(p) - p p^T = H, and
        sum_k b_k U_k = -w * (Q Q^T e_y / w_y) = -w * (e_y / w_y - w) = p - e_y
        (Q Q^T = I - w w^T and w^T e_y / w_y = 1). No subtraction of nearly equal
        numbers; the structural null direction of H (along 1) is not a row.
        """
        return _ce_factor(z.detach().to(torch.float64), y)


class TokenCrossEntropy(_Base):
    """Token-level cross-entropy for sequence outputs: logits (N, T, C), labels (N, T).

    Positions whose label equals ``ignore_index`` (padding) contribute nothing.
    The per-sample loss is the SUM over that sample's valid tokens,
    l_n = sum_t [y_nt != ignore] ce(z_nt, y_nt), so s_n and H_n cover all of its
    tokens (H_n is block-diagonal over tokens, zero on padding).
    """

    name = "token_cross_entropy"

    def __init__(self, ignore_index: int = -100):
        self.ignore_index = ignore_index

    def _mask_labels(self, y: Tensor) -> tuple[Tensor, Tensor]:
        mask = y != self.ignore_index
        return mask, torch.where(mask, y, torch.zeros_like(y))

    def per_sample(self, z: Tensor, y: Tensor) -> Tensor:
        mask, yy = self._mask_labels(y)
        tok = torch.logsumexp(z, dim=-1) - z.gather(-1, yy.unsqueeze(-1)).squeeze(-1)
        return (tok * mask.to(z.dtype)).sum(dim=-1)

    def logit_grad(self, z: Tensor, y: Tensor) -> Tensor:
        mask, yy = self._mask_labels(y)
        p = torch.softmax(z, dim=-1)
        grad = p - torch.nn.functional.one_hot(yy, z.shape[-1]).to(z.dtype)
        return grad * mask.unsqueeze(-1).to(z.dtype)

    def hvp(self, z: Tensor, y: Tensor, v: Tensor) -> Tensor:
        mask, _ = self._mask_labels(y)
        p = torch.softmax(z, dim=-1)
        hv = p * v - p * (p * v).sum(dim=-1, keepdim=True)
        return hv * mask.unsqueeze(-1).to(z.dtype)

    def sample(self, z: Tensor, y: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        mask, _ = self._mask_labels(y)
        n, t, c = z.shape
        p = torch.softmax(z.detach().to(torch.float64), dim=-1).reshape(n * t, c)
        draws = torch.multinomial(p, k, replacement=True, generator=generator)  # (N*T, k)
        draws = draws.transpose(0, 1).reshape(k, n, t)
        return torch.where(mask.unsqueeze(0), draws, torch.full_like(draws, self.ignore_index))

    def ggn_rank(self, z: Tensor) -> int:
        return z.shape[1] * (z.shape[2] - 1)

    def ggn_factor(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """T*(C-1) rows per sample, k = t*(C-1) + c: CrossEntropy's factor of token t,
        placed at position t, zero on padding (whose H and dl/dz are zero)."""
        mask, yy = self._mask_labels(y)
        n, t, c = z.shape
        u, b = _ce_factor(z.detach().to(torch.float64).reshape(n * t, c), yy.reshape(n * t))  # (C-1, N*T, C)
        m = mask.reshape(n * t).to(torch.float64)
        u = (u * m[None, :, None]).reshape(c - 1, n, t, c)
        b = (b * m[None, :]).reshape(c - 1, n, t)
        eye_t = torch.eye(t, dtype=torch.float64, device=z.device)
        # U[(t0, k), n, t, :] = delta(t0, t) u[k, n, t, :]
        big_u = torch.einsum("knxc,sx->sknxc", u, eye_t).reshape(t * (c - 1), n, t, c)
        big_b = b.permute(2, 0, 1).reshape(t * (c - 1), n)
        return big_u, big_b

    def __repr__(self) -> str:
        return f"TokenCrossEntropy(ignore_index={self.ignore_index})"


class MSE(_Base):
    """Half squared error summed over output dims: l_n = 0.5 ||z_n - y_n||^2.

    dl/dz = z - y;  H = I;  the predictive is N(z_n, I).
    """

    name = "mse"

    def per_sample(self, z: Tensor, y: Tensor) -> Tensor:
        return 0.5 * _squared_norm_per_sample(z - y)

    def logit_grad(self, z: Tensor, y: Tensor) -> Tensor:
        return z - y

    def hvp(self, z: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return v

    def sample(self, z: Tensor, y: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        zd = z.detach()
        noise = torch.randn((k, *zd.shape), dtype=zd.dtype, device=zd.device, generator=generator)
        return zd.unsqueeze(0) + noise

    def ggn_factor(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """H = I: U_k = e_k (one row per output), b_k = the residual's k-th entry."""
        z64 = z.detach().to(torch.float64)
        n, d = z64.shape[0], z64[0].numel()
        eye = torch.eye(d, dtype=torch.float64, device=z.device)
        u = eye[:, None, :].expand(d, n, d).reshape(d, *z64.shape)
        return u, (z64 - y.to(torch.float64)).reshape(n, d).T.contiguous()


def _ce_factor(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """CrossEntropy.ggn_factor on float64 (M, C) logits: U (C-1, M, C), b (C-1, M)."""
    m, c = z.shape
    logp = torch.log_softmax(z, dim=-1)
    w = torch.exp(0.5 * logp)  # sqrt(p), from log p so that it never underflows before p does
    j = logp.argmax(dim=-1)  # w_j >= 1 / sqrt(C): 1 + w_j has no cancellation
    v = w + torch.nn.functional.one_hot(j, c).to(z.dtype)
    eye = torch.eye(c, dtype=z.dtype, device=z.device)
    house = eye - v[:, :, None] * v[:, None, :] / (1.0 + w.gather(1, j[:, None]))[:, :, None]  # (M, C, C)
    # Drop column j (it is -w): columns idx = 0..C-2 shifted past j. Static shapes.
    idx = torch.arange(c - 1, device=z.device)[None, :]
    idx = idx + (idx >= j[:, None]).to(idx.dtype)  # (M, C-1)
    q = house.gather(2, idx[:, None, :].expand(m, c, c - 1))  # (M, C, C-1), orthonormal, orthogonal to w
    u = -(w[:, :, None] * q).permute(2, 0, 1)  # (C-1, M, C)
    inv_wy = torch.exp(-0.5 * logp.gather(1, y[:, None]))  # 1 / sqrt(p_y)
    b = (q.gather(1, y[:, None, None].expand(m, 1, c - 1)).squeeze(1) * inv_wy).T  # (C-1, M)
    return u, b.contiguous()


LOSSES = {"cross_entropy": CrossEntropy, "token_cross_entropy": TokenCrossEntropy, "mse": MSE}


def get_loss(name: str, **kwargs) -> Loss:
    """A loss by its recipe name: cross_entropy, token_cross_entropy, mse."""
    try:
        return LOSSES[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}") from None


# --- Token-level CE in the authors' convention (helper "repro", issue 15 point 3) ---------------------------------


class TokenMeanCrossEntropy(_Base):
    """Token cross-entropy averaged over ALL non-padding tokens of the batch (the authors' T5 convention).

    Logits (N, T, C), labels (N, T); positions with ``ignore_index`` are padding. With K the
    number of valid tokens in the BATCH, the authors' loss is L = (1/K) sum_{n,t} ce(z_nt, y_nt).
    In iefcli's convention (batch loss = mean of per-sample losses) that is

        l_n = (N / K) sum_t [y_nt != ignore] ce(z_nt, y_nt),   so   (1/N) sum_n l_n = L.

    l_n therefore depends on the whole batch through K: ``per_sample``/``logit_grad``/``hvp``
    must be called on the full batch (as ``batch_grads`` does), never one sample at a time.
    Versus :class:`TokenCrossEntropy` (per-sample SUM) every per-sample gradient is scaled by
    N/K = 1/(tokens per sample): the iEF direction at damping lam*(N/K)^2 is N/K times the
    summed one (the same direction; the step is tokens-per-sample times smaller).

    ``tokens="first"`` keeps only the FIRST valid token of each sample (then K = N and l_n is the
    plain CE of that token): the authors' gamma evaluation scores the first label token only.
    ``sample`` (SF's label draws) resamples only the first valid token and marks every other
    position as padding, as the authors' SF does; the sampled rows are then gradients of the
    first-token CE (K = N for the drawn labels), i.e. SF's Fisher is that of the first label
    token's predictive.
    """

    name = "token_mean_cross_entropy"

    def __init__(self, ignore_index: int = -100, tokens: str = "all"):
        if tokens not in ("all", "first"):
            raise ValueError(f"tokens must be 'all' or 'first', got {tokens!r}")
        self.ignore_index = ignore_index
        self.tokens = tokens

    def _first_mask(self, y: Tensor) -> Tensor:
        valid = y != self.ignore_index
        return valid & (torch.cumsum(valid.to(torch.int64), dim=-1) == 1)

    def _mask_scale(self, y: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """(mask (N, T) as dtype, labels with padding set to 0, N / K as a 0-d tensor)."""
        mask = self._first_mask(y) if self.tokens == "first" else y != self.ignore_index
        yy = torch.where(mask, y, torch.zeros_like(y))
        k = mask.sum().clamp(min=1).to(dtype)
        return mask.to(dtype), yy, y.shape[0] / k

    def per_sample(self, z: Tensor, y: Tensor) -> Tensor:
        mask, yy, scale = self._mask_scale(y, z.dtype)
        tok = torch.logsumexp(z, dim=-1) - z.gather(-1, yy.unsqueeze(-1)).squeeze(-1)
        return scale * (tok * mask).sum(dim=-1)

    def logit_grad(self, z: Tensor, y: Tensor) -> Tensor:
        mask, yy, scale = self._mask_scale(y, z.dtype)
        grad = torch.softmax(z, dim=-1) - torch.nn.functional.one_hot(yy, z.shape[-1]).to(z.dtype)
        return grad * (scale * mask).unsqueeze(-1)

    def hvp(self, z: Tensor, y: Tensor, v: Tensor) -> Tensor:
        mask, _, scale = self._mask_scale(y, z.dtype)
        p = torch.softmax(z, dim=-1)
        hv = p * v - p * (p * v).sum(dim=-1, keepdim=True)
        return hv * (scale * mask).unsqueeze(-1)

    def sample(self, z: Tensor, y: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        first = self._first_mask(y)  # (N, T)
        has = first.any(dim=-1)
        pos = first.to(torch.int64).argmax(dim=-1)  # first valid position (0 when none)
        n = z.shape[0]
        zf = z.detach()[torch.arange(n, device=z.device), pos].to(torch.float64)  # (N, C)
        draws = torch.multinomial(torch.softmax(zf, dim=-1), k, replacement=True, generator=generator)  # (N, k)
        out = torch.full((k, *y.shape), self.ignore_index, dtype=y.dtype, device=y.device)
        put = draws.transpose(0, 1).to(y.dtype)  # (k, N)
        out[:, torch.arange(n, device=y.device), pos] = torch.where(has.unsqueeze(0), put, out[:, torch.arange(n, device=y.device), pos])
        return out

    def __repr__(self) -> str:
        return f"TokenMeanCrossEntropy(ignore_index={self.ignore_index}, tokens={self.tokens!r})"


LOSSES["token_mean_cross_entropy"] = TokenMeanCrossEntropy

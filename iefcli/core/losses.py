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

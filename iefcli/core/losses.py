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

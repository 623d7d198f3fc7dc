"""Per-sample gradients, and the model-level entry point :func:`batch_grads`.

Everything the directions need from a model at (theta, batch) goes through an
:class:`OutputJacobian`: the Jacobian Jz of the logits z (N, ...) with respect
to the trainable parameters theta (P,), one block Jz_n per sample.

- ``vjp(V)``:  sum_n Jz_n^T V_n -> (P,)          (one backward pass)
- ``jvp(v)``:  Jz v            -> (N, ...)        (one forward-mode pass)
- ``rows(U)``: per-sample gradient rows r_{kn} = Jz_n^T U_{kn} for K cotangent
  sets U (K, N, ...), as a :class:`Rows` object, ordered k-major (row k*N + n).

A per-sample loss gradient is such a row: grad_theta l_n = Jz_n^T (dl_n/dz_n),
so J = rows(logit_grads[None]). SF's sampled-label gradients are rows of the
same Jacobian with other cotangents.

:class:`Rows` is what the N x N solves consume: the Gram matrix R R^T (float64)
and weighted sums R^T x. Neither needs R itself, which is what lets a fast
path skip materialising per-sample gradients; :class:`DenseRows` is the plain
implementation that holds R.

:class:`VmapJacobian` is the plain path: ``functional_call`` + ``vmap`` over
samples of a per-sample ``vjp``, chunked by ``chunk_size`` so that at most
chunk_size x K x P numbers of per-sample gradient are live while they are
computed (the assembled rows are M x P).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap
from torch.utils._pytree import tree_map

from iefcli.core.losses import Loss
from iefcli.core.params import ParamLayout, Params
from iefcli.errors import ModelError

Inputs = Any  # a Tensor, a tuple of Tensors (positional args) or a dict (keyword args); leading dim N
Forward = Callable[[nn.Module, Params, Inputs], Tensor]
Randomness = Literal["error", "different", "same"]


def default_forward(model: nn.Module, params: Params, inputs: Inputs) -> Tensor:
    """Call ``model`` with ``params`` substituted; return its logits.

    ``inputs`` is a Tensor, a tuple (positional arguments) or a dict (keyword
    arguments). Outputs with a ``.logits`` attribute (Hugging Face) are unwrapped.
    Parameters not in ``params`` (frozen ones, buffers) come from the module.
    """
    if isinstance(inputs, dict):
        out = functional_call(model, params, (), inputs)
    elif isinstance(inputs, tuple):
        out = functional_call(model, params, inputs)
    else:
        out = functional_call(model, params, (inputs,))
    return out.logits if hasattr(out, "logits") else out


def batch_size_of(inputs: Inputs) -> int:
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    leaves = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    return leaves[0].shape[0]


class Rows(Protocol):
    """M gradient rows R (M x P), seen through what the solves need."""

    n_rows: int

    def gram(self) -> Tensor:
        """R R^T, (M, M), float64."""
        ...

    def combine(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """R^T x for x (M,): (P,) in ``dtype`` (default: the parameters' dtype)."""
        ...

    def dot(self, v: Tensor) -> Tensor:
        """R v for v (P,): (M,) float64."""
        ...


class DenseRows:
    """Rows held as a dense M x P matrix (the plain path, and the public matrix API)."""

    def __init__(self, matrix: Tensor):
        if matrix.dim() != 2:
            raise ValueError(f"expected an M x P matrix of gradient rows, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.n_rows = matrix.shape[0]
        self._m64: Tensor | None = None
        self._gram: Tensor | None = None

    def _as64(self) -> Tensor:
        if self._m64 is None:
            self._m64 = self.matrix.to(torch.float64)
        return self._m64

    def gram(self) -> Tensor:
        if self._gram is None:
            m = self._as64()
            self._gram = m @ m.T
        return self._gram

    def combine(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        # In float64: with tiny damping x can be large and the sum cancels.
        return (self._as64().T @ x.to(torch.float64)).to(dtype or self.matrix.dtype)

    def dot(self, v: Tensor) -> Tensor:
        return self._as64() @ v.to(torch.float64)


class OutputJacobian(Protocol):
    """The logits' Jacobian at one (theta, batch); see the module docstring."""

    logits: Tensor
    layout: ParamLayout

    def vjp(self, cotangent: Tensor) -> Tensor: ...
    def jvp(self, tangent: Tensor) -> Tensor: ...
    def rows(self, cotangents: Tensor) -> Rows: ...


class VmapJacobian:
    """Plain path: torch.func over the whole model, per-sample rows by vmap.

    ``randomness`` is passed to vmap: "error" (default) refuses random ops such
    as dropout in train mode; "different" gives each sample its own dropout
    mask (then the per-sample forward differs from the batched one); put the
    model in eval mode to avoid the question.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Params,
        inputs: Inputs,
        *,
        forward: Forward = default_forward,
        chunk_size: int | None = None,
        randomness: Randomness = "error",
    ):
        self.model = model
        self.params = params
        self.inputs = inputs
        self.forward = forward
        self.chunk_size = chunk_size
        self.randomness = randomness
        self.layout = ParamLayout.of(params)
        self.logits, self._vjp_fn = vjp(lambda p: forward(model, p, inputs), params)

    def _f(self, p: Params) -> Tensor:
        return self.forward(self.model, p, self.inputs)

    def vjp(self, cotangent: Tensor) -> Tensor:
        (grads,) = self._vjp_fn(cotangent.to(self.logits.dtype))
        return self.layout.flatten(grads)

    def jvp(self, tangent: Tensor) -> Tensor:
        _, out = jvp(self._f, (self.params,), (self.layout.unflatten(tangent.to(self._dtype())),))
        return out

    def _dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    def rows(self, cotangents: Tensor) -> DenseRows:
        """Rows Jz_n^T U_{kn}, (K*N, P), k-major, from cotangents (K, N, ...)."""
        model, forward, layout, params = self.model, self.forward, self.layout, self.params

        def one_sample(x_n: Inputs, u_n: Tensor) -> Tensor:
            def f(p: Params) -> Tensor:
                return forward(model, p, tree_map(lambda t: t.unsqueeze(0), x_n)).squeeze(0)

            _, vjp_n = vjp(f, params)
            return vmap(lambda u: layout.flatten(vjp_n(u)[0]))(u_n)  # (K, P)

        k, n = cotangents.shape[:2]
        per_sample = vmap(one_sample, in_dims=(0, 1), chunk_size=self.chunk_size, randomness=self.randomness)
        r = per_sample(self.inputs, cotangents.to(self.logits.dtype))  # (N, K, P)
        return DenseRows(r.transpose(0, 1).reshape(k * n, layout.size))


def check_all_params_used(model: nn.Module, params: Params, inputs: Inputs, forward: Forward = default_forward) -> None:
    """Raise :class:`ModelError` naming every trainable parameter that the logits do not depend on.

    torch.func returns zeros for such parameters, which would silently give
    them a zero direction; one ordinary backward with ``allow_unused`` tells.
    """
    live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        out = forward(model, live, tree_map(lambda t: t[:1], inputs))
        grads = torch.autograd.grad(out.float().sum(), list(live.values()), allow_unused=True)
    missing = [name for name, g in zip(live, grads) if g is None]
    if missing:
        raise ModelError(
            "trainable parameter(s) received no per-sample gradient (not used by the forward pass): "
            + ", ".join(missing)
        )


@dataclass
class BatchGrads:
    """What one step's directions consume, from one pass over a batch.

    loss:        (N,) per-sample losses l_n (the batch loss is their mean)
    logits:      (N, ...) z_n
    logit_grads: (N, ...) dl_n/dz_n
    s:           (N,) s_n = ||dl_n/dz_n||^2
    rows:        the N per-sample gradient rows J (gram(), combine())
    g:           (P,) gradient of the MEAN loss, J^T 1 / N, computed on first use
                 (EF/iEF never need it; a fast-path step then skips one J^T x and a P-vector)
    jac:         the OutputJacobian (sampled rows, jvp for GGN products)
    targets, loss_fn: kept for GGN products and SF sampling
    """

    loss: Tensor
    logits: Tensor
    logit_grads: Tensor
    s: Tensor
    rows: Rows
    jac: OutputJacobian
    targets: Tensor
    loss_fn: Loss
    _g: Tensor | None = field(default=None, repr=False)

    @property
    def g(self) -> Tensor:
        """(P,) gradient of the mean loss, J^T 1 / N (cached)."""
        if self._g is None:
            n = self.rows.n_rows
            self._g = self.rows.combine(torch.full((n,), 1.0 / n, dtype=torch.float64, device=self.logits.device))
        return self._g

    @property
    def n(self) -> int:
        return self.loss.shape[0]

    @property
    def layout(self) -> ParamLayout:
        return self.jac.layout

    def per_sample_grads(self) -> Tensor:
        """J (N, P), materialised. Only for rows that hold it (the plain path)."""
        if not isinstance(self.rows, DenseRows):
            raise TypeError("this path does not materialise per-sample gradients; use jacobian='vmap'")
        return self.rows.matrix


JacobianFactory = Callable[..., OutputJacobian]
_JACOBIANS: dict[str, JacobianFactory] = {"vmap": VmapJacobian}


def register_jacobian(name: str, factory: JacobianFactory) -> None:
    """Register another OutputJacobian implementation (e.g. a fast path) under ``name``."""
    _JACOBIANS[name] = factory


def make_jacobian(
    model: nn.Module,
    params: Params,
    inputs: Inputs,
    *,
    jacobian: str = "auto",
    forward: Forward = default_forward,
    chunk_size: int | None = None,
    randomness: Randomness = "error",
) -> OutputJacobian:
    """Build the OutputJacobian by name: "vmap" (plain), or "auto" (the fastest registered, else vmap)."""
    name = jacobian
    if name == "auto":
        name = "fast" if "fast" in _JACOBIANS else "vmap"
    try:
        factory = _JACOBIANS[name]
    except KeyError:
        raise ValueError(f"unknown jacobian path {jacobian!r}; choose one of auto, {', '.join(_JACOBIANS)}") from None
    return factory(model, params, inputs, forward=forward, chunk_size=chunk_size, randomness=randomness)


def batch_grads(
    model: nn.Module,
    params: Params,
    inputs: Inputs,
    targets: Tensor,
    loss_fn: Loss,
    *,
    jacobian: str = "auto",
    forward: Forward = default_forward,
    chunk_size: int | None = None,
    randomness: Randomness = "error",
) -> BatchGrads:
    """The model-level entry point: per-sample losses, logits, logit gradients,
    s, the per-sample gradient rows J and the mean gradient g, in one pass.

    An iEF step is this call followed by :func:`iefcli.directions.ief`.
    ``params`` holds the TRAINABLE parameters only (see
    :func:`iefcli.core.params.trainable_params`).
    """
    jac = make_jacobian(
        model, params, inputs, jacobian=jacobian, forward=forward, chunk_size=chunk_size, randomness=randomness
    )
    z = jac.logits.detach()
    lg = loss_fn.logit_grad(z, targets)
    rows = jac.rows(lg.unsqueeze(0))
    n = z.shape[0]
    return BatchGrads(
        loss=loss_fn.per_sample(z, targets),
        logits=z,
        logit_grads=lg,
        s=lg.reshape(n, -1).pow(2).sum(dim=1),
        rows=rows,
        jac=jac,
        targets=targets,
        loss_fn=loss_fn,
    )


def per_sample_grads(
    model: nn.Module,
    params: Params,
    inputs: Inputs,
    targets: Tensor,
    loss_fn: Loss,
    *,
    forward: Forward = default_forward,
    chunk_size: int | None = None,
    randomness: Randomness = "error",
) -> Params:
    """Per-sample gradients grad_theta l_n of the trainable params: dict name -> (N, *shape).

    ``vmap(grad(loss_one))`` over samples, ``chunk_size`` samples at a time.
    """

    def loss_one(p: Params, x_n: Inputs, y_n: Tensor) -> Tensor:
        z = forward(model, p, tree_map(lambda t: t.unsqueeze(0), x_n))
        return loss_fn.per_sample(z, y_n.unsqueeze(0)).squeeze(0)

    return vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0), chunk_size=chunk_size, randomness=randomness)(
        params, inputs, targets
    )


def sampled_rows(bg: BatchGrads, k: int, generator: torch.Generator | None) -> Rows:
    """SF's rows: per-sample gradients at k labels drawn from p(y|z_n) per datum,
    each scaled by 1/sqrt(k), so that R^T R estimates the Fisher (= GGN) of the
    summed loss. (k*N rows, k-major.)"""
    yhat = bg.loss_fn.sample(bg.logits, bg.targets, k, generator)  # (k, N, ...)
    z = bg.logits.unsqueeze(0).expand(k, *bg.logits.shape)
    u = torch.stack([bg.loss_fn.logit_grad(z[i], yhat[i]) for i in range(k)]) / math.sqrt(k)
    return bg.jac.rows(u)

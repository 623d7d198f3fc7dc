"""The global batch's BatchGrads over ranks and micro-batches, and the DDP ModelFn.

:func:`global_batch_grads` is :func:`iefcli.core.jacobian.batch_grads` for a batch that
this process sees WHOLE (every rank builds the same global batch from the same seeded
order) but computes only in part: rank r takes its contiguous shard of the N samples
(:func:`iefcli.dist.rows.piece_bounds`), splits it into ``accumulate`` micro-batches,
and runs the ordinary model-level path on each (one forward, the fast path's captured
factors). The result is a BatchGrads of the GLOBAL batch: losses, logits, s and targets
of all N samples (gathered with the factors, in the same all_gather) and
:class:`iefcli.dist.rows.ShardedRows`, so that
:func:`iefcli.core.methods.compute_direction` runs unchanged with N = the global batch
size (damping on the paper's scale), the N x N solve replicated on every rank.

SF's label draws (documented choice): the method table draws them from the GLOBAL
batch's logits with the step's generator (``seed * 1000003 + 7919 + step``), the same
generator on every rank; every rank therefore draws the same N labels, exactly the
ones a single process draws, and each forms the rows of its own samples' draws
(:class:`ShardedJacobian`). The cost is the gathered logits (N x outputs numbers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from iefcli.core.jacobian import BatchGrads, batch_size_of, default_forward, make_jacobian
from iefcli.core.params import Params
from iefcli.dist.comm import Comm
from iefcli.dist.rows import LocalFactors, Piece, piece_bounds, shard_rows
from iefcli.errors import ModelError
from iefcli.optim.base import ModelFn

__all__ = ["global_batch_grads", "ShardedJacobian", "DistModelFn", "take"]


def take(inputs: Any, lo: int, hi: int) -> Any:
    """Samples [lo, hi) of a batch's inputs (a tensor, or a tuple / dict of them)."""
    return tree_map(lambda t: t[lo:hi] if isinstance(t, Tensor) else t, inputs)


class ShardedJacobian:
    """What the method table may ask of ``bg.jac`` for a sharded batch: ``logits`` (global),
    ``layout`` and ``rows(U)`` for global cotangents U (K, N, ...): each rank forms its own
    samples' rows from its kept micro-batch Jacobians, then gathers the factors."""

    def __init__(self, logits: Tensor, layout, jacs: list, bounds: list[tuple[int, int]], offset: int,
                 counts: list[int], comm: Comm):
        self.logits, self.layout, self._jacs, self._bounds = logits, layout, jacs, bounds
        self._offset, self._counts, self._comm = offset, counts, comm

    def rows(self, cotangents: Tensor):
        if any(j is None for j in self._jacs):
            raise ModelError("iefcli.dist: rows for new cotangents need the micro-batch Jacobians "
                             "(global_batch_grads(..., keep_jacobians=True))")
        k = cotangents.shape[0]
        pieces = []
        for jac, (lo, hi) in zip(self._jacs, self._bounds):
            u = cotangents[:, self._offset + lo : self._offset + hi]
            pieces.append(Piece(jac.rows(u), hi - lo))
        rows, _ = shard_rows(pieces, k, self._comm, self._counts)
        return rows

    def vjp(self, cotangent: Tensor) -> Tensor:
        raise ModelError("ngd is not available across ranks or micro-batches (it needs products through the "
                         "whole batch's model); use ef, ief or sf")

    jvp = vjp


def global_batch_grads(model, params: Params, inputs: Any, targets: Tensor, loss_fn, *, comm: Comm,
                       accumulate: int = 1, keep_jacobians: bool = False, jacobian: str = "auto",
                       forward=default_forward, chunk_size: int | None = None,
                       randomness: str = "error") -> BatchGrads:
    """The BatchGrads of the whole batch ``(inputs, targets)`` (see the module docstring).
    ``keep_jacobians``: keep each micro-batch's Jacobian (its graph) for later rows (SF)."""
    n_global = batch_size_of(inputs)
    lo, hi = piece_bounds(n_global, comm.world)[comm.rank] if n_global >= comm.world else (0, 0)
    if hi <= lo:
        raise ModelError(f"a batch of {n_global} samples cannot be split over {comm.world} ranks "
                         "(each needs at least one sample)")
    bounds = piece_bounds(hi - lo, accumulate)
    kept, jacs, per_sample = LocalFactors(1, hi - lo, comm.distributed), [], []
    layout = None
    for a, b in bounds:
        x, y = take(inputs, lo + a, lo + b), targets[lo + a : lo + b]
        jac = make_jacobian(model, params, x, jacobian=jacobian, forward=forward, chunk_size=chunk_size,
                            randomness=randomness)
        z = jac.logits.detach()
        lg = loss_fn.logit_grad(z, y)
        rows = jac.rows(lg.unsqueeze(0))
        layout = layout or _layout(rows, params)
        kept.add(Piece(rows, b - a))  # its factors copied into the rank's buffers; the micro-batch's rows go
        per_sample.append((loss_fn.per_sample(z, y).detach(), z, lg))
        jacs.append(jac if keep_jacobians else None)
        del jac, rows  # without keep_jacobians the micro-batch's graph goes now: memory set by the micro-batch
    loss = torch.cat([p[0] for p in per_sample])
    z = torch.cat([p[1] for p in per_sample])
    lg = torch.cat([p[2] for p in per_sample])
    n_local = hi - lo
    y_local = targets[lo:hi]
    counts = [b - a for a, b in piece_bounds(n_global, comm.world)]
    extra = [loss.unsqueeze(0), z.unsqueeze(0), lg.unsqueeze(0)]
    assert n_local == counts[comm.rank]
    rows, (loss_g, z_g, lg_g) = kept.finish(comm, counts, extra=extra)
    loss_g, z_g, lg_g = loss_g[0], z_g[0], lg_g[0]
    jac = ShardedJacobian(z_g, layout, jacs, bounds, lo, counts, comm)
    return BatchGrads(loss=loss_g, logits=z_g, logit_grads=lg_g, s=lg_g.reshape(n_global, -1).pow(2).sum(dim=1),
                      rows=rows, jac=jac, targets=targets, loss_fn=loss_fn)


def _layout(rows, params: Params):
    from iefcli.core.params import ParamLayout

    return getattr(rows, "layout", None) or ParamLayout.of(params)


@dataclass
class DistModelFn(ModelFn):
    """The optimisers' ModelFn over ranks and micro-batches (set by :func:`iefcli.dist.train.setup_plan`).

    ``batch_grads``: the curvature optimisers' hook (:mod:`iefcli.optim.curvature`): the
    global batch's BatchGrads. ``mean_loss_and_grad``: SGD / AdamW / Adafactor's ordinary
    DDP semantics: each micro-batch's mean-loss gradient weighted by its share of the
    global batch, summed, one all_reduce (the loss rides in the same vector)."""

    comm: Comm = field(default_factory=Comm.local)
    accumulate: int = 1
    keep_jacobians: bool = False

    def batch_grads(self, model, params, inputs, targets, loss_fn, *, jacobian="auto", forward=default_forward,
                    chunk_size=None, randomness="error") -> BatchGrads:
        return global_batch_grads(model, params, inputs, targets, loss_fn, comm=self.comm,
                                  accumulate=self.accumulate, keep_jacobians=self.keep_jacobians,
                                  jacobian=jacobian, forward=forward, chunk_size=chunk_size, randomness=randomness)

    def mean_loss_and_grad(self, params: Params, inputs: Any, targets: Tensor) -> tuple[Tensor, Params]:
        from iefcli.core.params import ParamLayout

        comm = self.comm
        n_global = batch_size_of(inputs)
        lo, hi = piece_bounds(n_global, comm.world)[comm.rank]
        layout = ParamLayout.of(params)
        acc = torch.zeros(layout.size + 1, dtype=torch.float64, device=targets.device)
        for a, b in piece_bounds(hi - lo, self.accumulate):
            loss, grads = ModelFn.mean_loss_and_grad(self, params, take(inputs, lo + a, lo + b),
                                                     targets[lo + a : lo + b])
            w = (b - a) / n_global
            acc[:-1] += w * layout.flatten(grads).to(torch.float64)
            acc[-1] += w * loss.to(torch.float64)
        dtype = next(iter(params.values())).dtype
        out = comm.all_reduce_(acc.to(dtype) if dtype != torch.float64 else acc)
        return out[-1].to(dtype), layout.unflatten(out[:-1].to(dtype))

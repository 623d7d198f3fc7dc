"""ef, sf, ief, ngd: the core's directions behind the pure optimiser contract.

One step: ``batch_grads`` (per-sample losses, logit gradients, rows J, mean
gradient g) -> direction d from the method table
(:func:`iefcli.core.methods.compute_direction`, paper-scale damping) -> optional heavy-ball
momentum (buf <- momentum * buf + d; d <- buf) -> decoupled weight decay
(d <- d + wd * theta) -> theta <- theta - lr * d (then the shared clipping).

Metrics (0-d tensors): loss, solve_residual, rows_kept, cond_estimate,
solve_fallback (ef/sf/ief), cg_iterations/cg_residual/cg_converged (ngd), the gradient-norm
imbalance of :func:`iefcli.core.batch_imbalance` (from the Gram diagonal),
mean_target_prob (cross-entropy), grad_norm, update_norm, cos_update_grad.
"""

from __future__ import annotations

from typing import Any

import torch

from iefcli.core.jacobian import batch_grads
from iefcli.core.methods import CURVATURE_METHODS, compute_direction, get_method
from iefcli.core.params import Params
from iefcli.core.stats import batch_imbalance
from iefcli.optim.base import ModelFn, OptimConfig, State, _norm, finish_step, momentum_and_decay


class CurvatureOptimizer:
    def __init__(self, config: OptimConfig, fn: ModelFn):
        if config.name not in CURVATURE_METHODS:
            raise ValueError(f"not a curvature optimiser: {config.name}")
        self.method = get_method(config.name)
        if self.method.needs_damping and not config.damping > 0:
            raise ValueError(f"{config.name} needs damping > 0")
        self.options = config.method_options()
        self.config = config
        self.name = config.name
        self.fn = fn

    def init(self, params: Params) -> State:
        if self.config.momentum > 0:
            return {"momentum": {k: torch.zeros_like(v) for k, v in params.items()}}
        return {}

    def direction(self, params: Params, batch: Any, key: int, diagnostics: bool = True):
        """(bg, d (P,), metrics) for one batch: the raw direction (paper scale), before momentum.
        ``diagnostics`` False: metrics hold the loss and the solve's info only."""
        c, fn = self.config, self.fn
        # hook: a ModelFn with its own batch_grads (iefcli.dist: ranks / micro-batches) serves the global batch
        bg = getattr(fn, "batch_grads", batch_grads)(fn.model, params, batch.inputs, batch.targets, fn.loss_fn,
                         jacobian=c.jacobian, forward=fn.forward, chunk_size=c.chunk_size)
        gen = torch.Generator(device=bg.logits.device).manual_seed(int(key)) if self.method.random else None
        rec = _CombineRecorder(bg.rows)
        bg.rows = rec
        try:
            d, info = compute_direction(c.name, bg, c.damping, generator=gen, options=self.options)
        finally:
            bg.rows = rec.inner
        self._last_x = rec.xs[0] if len(rec.xs) == 1 and bg._g is None else None
        m: dict[str, torch.Tensor] = {"loss": bg.loss.mean().detach()}
        m.update(info)
        if not diagnostics:
            return bg, d, m
        m.update(batch_imbalance(torch.diagonal(bg.rows.gram()), bg.s))
        if bg.loss_fn.name == "cross_entropy":  # the paper also logs the mean target probability
            m["mean_target_prob"] = torch.softmax(bg.logits.to(torch.float64), -1).gather(
                -1, bg.targets.unsqueeze(-1)).mean()
        return bg, d, m

    def _grad_stats(self, bg, d: torch.Tensor):
        """(||g||, <d, g>) from the Gram matrix when d = a R^T x came from ONE combine (ef, ief):
        <R^T x, g> = x^T G 1 / N, so the diagnostics need no second J^T w for g. Else None."""
        x = self._last_x
        if x is None:
            return None
        gram = bg.rows.gram()
        w = gram.sum(dim=1) / bg.rows.n_rows  # G 1 / N
        gnorm = torch.sqrt((w.sum() / bg.rows.n_rows).clamp_min(0))
        scale = float(bg.n) ** self.method.direction_power
        return gnorm, scale * (x.to(torch.float64) @ w)

    def update(self, params: Params, state: State, batch: Any, *, key: int, lr: float, diagnostics: bool = True):
        c = self.config
        bg, d, metrics = self.direction(params, batch, key, diagnostics)
        plain = c.momentum == 0 and c.weight_decay == 0
        # which tail runs depends on the config and the method only, never on ``diagnostics``: the new
        # params are bitwise the same on logging and other steps
        lean = plain and self._last_x is not None and c.clip_update_norm is None
        stats = self._grad_stats(bg, d) if plain and diagnostics else None
        if lean:
            # the lean tail: theta_k - lr d_k per tensor (one pass, no flat copies), the metrics from
            # ||d|| and the Gram (update = lr d exactly up to the one rounding of the subtraction)
            dv = bg.layout.unflatten(d)
            new_params = {k: torch.add(v, dv[k], alpha=-lr) for k, v in params.items()}
            unorm = abs(lr) * _norm(d)
            # a step whose new params overflow (inf / nan) must read as non-finite, as theta - new would
            ext = torch.stack([t for v in new_params.values() for t in torch.aminmax(v)]).to(torch.float64)
            unorm = torch.where(torch.isfinite(ext).all(), unorm, torch.full_like(unorm, float("inf")))
            metrics["update_norm"] = unorm
            if stats is not None:
                gnorm, dot = stats[0], lr * stats[1]
                metrics["grad_norm"] = gnorm
                metrics["cos_update_grad"] = dot / (unorm * gnorm).clamp_min(1e-300)
            return new_params, {}, metrics
        layout = bg.layout
        d, theta, new_state = momentum_and_decay(layout, d, params, state, c)
        if diagnostics and stats is None and bg._g is None and hasattr(bg.rows, "grad_dot"):
            # iefcli.dist rows (ranks / micro-batches): ||g|| from the Gram and <d, g> = 1^T R d / M, so
            # g itself (a second P-sized all_reduce under ranks) is never formed
            gnorm = torch.sqrt((bg.rows.gram().sum() / bg.rows.n_rows**2).clamp_min(0))
            stats = (gnorm, bg.rows.grad_dot(d))
        if stats is not None:
            new_params, metrics = finish_step(layout, theta, theta - lr * d, None, c, metrics,
                                              grad_norm=stats[0], step_dot_grad=lr * stats[1])
        else:  # g (a second J^T w unless the direction formed it) only when the diagnostics are wanted
            new_params, metrics = finish_step(layout, theta, theta - lr * d, bg.g if diagnostics else None, c, metrics)
        return new_params, new_state, metrics


class _CombineRecorder:
    """The rows, seen through: records the coefficient vectors of combine (R^T x) calls."""

    def __init__(self, inner):
        self.inner = inner
        self.xs: list[torch.Tensor] = []

    def combine(self, x, *args, **kwargs):
        self.xs.append(x)
        return self.inner.combine(x, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)

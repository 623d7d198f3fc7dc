"""ef, sf, ief, ngd: the core's directions behind the pure optimiser contract.

One step: ``batch_grads`` (per-sample losses, logit gradients, rows J, mean
gradient g) -> direction d from :mod:`iefcli.directions` -> optional heavy-ball
momentum (buf <- momentum * buf + d; d <- buf) -> decoupled weight decay
(d <- d + wd * theta) -> theta <- theta - lr * d (then the shared clipping).

Metrics (0-d tensors): loss, solve_residual, rows_kept, cond_estimate,
solve_fallback (ef/sf/ief), cg_iterations/cg_residual (ngd), the gradient-norm
imbalance of :func:`iefcli.core.batch_imbalance` (from the Gram diagonal),
mean_target_prob (cross-entropy), grad_norm, update_norm, cos_update_grad.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from iefcli import directions
from iefcli.core.jacobian import batch_grads, sampled_rows
from iefcli.core.params import Params
from iefcli.core.stats import batch_imbalance
from iefcli.optim.base import ModelFn, OptimConfig, State, finish_step


class CurvatureOptimizer:
    def __init__(self, config: OptimConfig, fn: ModelFn):
        if config.name not in ("ef", "sf", "ief", "ngd"):
            raise ValueError(f"not a curvature optimiser: {config.name}")
        if config.name == "sf" and not config.damping > 0:
            raise ValueError("sf needs damping > 0")
        self.config = config
        self.name = config.name
        self.fn = fn

    def init(self, params: Params) -> State:
        if self.config.momentum > 0:
            return {"momentum": {k: torch.zeros_like(v) for k, v in params.items()}}
        return {}

    def direction(self, params: Params, batch: Any, key: int):
        """(bg, d (P,), metrics) for one batch: the raw direction, before momentum."""
        c, fn = self.config, self.fn
        bg = batch_grads(fn.model, params, batch.inputs, batch.targets, fn.loss_fn,
                         jacobian=c.jacobian, forward=fn.forward, chunk_size=c.chunk_size)
        m: dict[str, torch.Tensor] = {"loss": bg.loss.mean().detach()}
        if c.name in ("ef", "ief", "sf"):
            if c.name == "ef":
                d, info = directions.ef(bg.rows, c.damping, dup_threshold=c.dup_threshold, return_info=True)
            elif c.name == "ief":
                d, info = directions.ief(bg.rows, bg.s, c.damping, dup_threshold=c.dup_threshold, return_info=True)
            else:
                dev = bg.g.device
                gen = torch.Generator(device=dev).manual_seed(int(key))
                # A diverged step leaves NaN/Inf logits, on which sampling would raise; sample from
                # finite stand-ins instead and let the shell reject the step (its loss is not finite).
                safe = dataclasses.replace(bg, logits=torch.nan_to_num(bg.logits, nan=0.0, posinf=0.0, neginf=0.0))
                rows = sampled_rows(safe, c.mc_samples, gen)
                # No duplicate filter for SF: repeated label draws are Monte-Carlo weight, and damping > 0.
                d, info = directions.sf(rows, bg.g, c.damping, return_info=True)
            m.update({"solve_residual": info.residual, "rows_kept": info.rows_kept,
                      "cond_estimate": info.cond, "solve_fallback": info.fallback})
        else:
            d, info = directions.ngd(bg, c.damping, method="cg", tol=c.cg_tol, maxiter=c.cg_maxiter, return_info=True)
            m.update({"cg_iterations": torch.tensor(info.iterations), "cg_residual": torch.tensor(info.residual)})
        m.update(batch_imbalance(torch.diagonal(bg.rows.gram()), bg.s))
        if bg.loss_fn.name == "cross_entropy":  # the paper also logs the mean target probability
            m["mean_target_prob"] = torch.softmax(bg.logits.to(torch.float64), -1).gather(
                -1, bg.targets.unsqueeze(-1)).mean()
        return bg, d, m

    def update(self, params: Params, state: State, batch: Any, *, key: int, lr: float):
        c = self.config
        bg, d, metrics = self.direction(params, batch, key)
        layout = bg.layout
        new_state: State = {}
        if c.momentum > 0:
            buf = c.momentum * layout.flatten(state["momentum"]) + d
            new_state["momentum"] = {k: v.clone() for k, v in layout.unflatten(buf).items()}
            d = buf
        theta = layout.flatten(params)
        if c.weight_decay > 0:
            d = d + c.weight_decay * theta
        new_params, metrics = finish_step(layout, theta, theta - lr * d, bg.g, c, metrics)
        return new_params, new_state, metrics

"""sgd, adamw, adafactor: torch.optim's own implementations, driven from a pure step.

The torch.optim instance is built ONCE (per optimiser object, on the first update) over its own
leaf tensors, and stepped in place: each ``update`` copies the incoming params into those leaves
and the incoming state into the instance's state tensors (``copy_``, no new allocations), sets
the mean-loss gradient as ``.grad``, calls ``step()`` and returns CLONES of the new params and
state. Inputs are never modified, so the step stays a pure function of (params, state, batch, lr)
and --resume is exact (the state round-trips through safetensors); the cost is one copy in and
one out per tensor, with torch's foreach kernels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from iefcli.core.params import ParamLayout, Params
from iefcli.optim.base import ModelFn, OptimConfig, State, finish_step, step_metrics


class TorchOptimizer:
    """One of torch.optim.SGD / AdamW / Adafactor behind the pure contract."""

    def __init__(self, config: OptimConfig, fn: ModelFn):
        self.config = config
        self.name = config.name
        self.fn = fn

    def _make(self, leaves: list[Tensor], lr: float) -> torch.optim.Optimizer:
        c = self.config
        if c.name == "sgd":
            return torch.optim.SGD(leaves, lr=lr, momentum=c.momentum, nesterov=c.nesterov,
                                   weight_decay=c.weight_decay)
        if c.name == "adamw":
            return torch.optim.AdamW(leaves, lr=lr, betas=tuple(c.betas), eps=c.eps,
                                     weight_decay=c.weight_decay)
        if c.name == "adafactor":
            return torch.optim.Adafactor(leaves, lr=lr, beta2_decay=c.beta2_decay,
                                         weight_decay=c.weight_decay)
        raise ValueError(f"not a torch.optim optimiser: {c.name}")

    def init(self, params: Params) -> State:
        # torch.optim creates its state lazily on the first step; an empty
        # per-parameter dict means "not started".
        return {name: {} for name in params}

    def _instance(self, params: Params, lr: float):
        """(optimizer, leaves): built once for these names/shapes/dtypes, reused after."""
        sig = tuple((n, tuple(v.shape), v.dtype, v.device) for n, v in params.items())
        if getattr(self, "_sig", None) != sig:
            leaves = [v.detach().clone().requires_grad_(True) for v in params.values()]
            self._opt, self._leaves, self._sig = self._make(leaves, lr), leaves, sig
        for group in self._opt.param_groups:
            group["lr"] = lr
        return self._opt, self._leaves

    def update(self, params: Params, state: State, batch: Any, *, key: int, lr: float):
        loss, grads = self.fn.mean_loss_and_grad(params, batch.inputs, batch.targets)
        names = list(params)
        opt, leaves = self._instance(params, lr)
        with torch.no_grad():
            torch._foreach_copy_(leaves, [params[n].detach() for n in names])
        for leaf, n in zip(leaves, names):
            leaf.grad = grads[n].detach()  # a fresh tensor from torch.func.grad: no copy needed
            saved = state.get(n)
            if not saved:
                opt.state.pop(leaf, None)
                continue
            mine = opt.state.get(leaf)
            if mine is not None and mine.keys() == saved.keys() and all(
                    isinstance(mine[k], Tensor) and mine[k].shape == saved[k].shape and mine[k].dtype == saved[k].dtype
                    for k in saved):
                for k, v in saved.items():
                    mine[k].copy_(v)
            else:
                opt.state[leaf] = {k: v.clone() for k, v in saved.items()}
        opt.step()
        for leaf in leaves:
            leaf.grad = None
        new_params = {n: leaf.detach().clone() for n, leaf in zip(names, leaves)}
        new_state = {n: {k: v.detach().clone() for k, v in opt.state[leaf].items() if isinstance(v, Tensor)}
                     for n, leaf in zip(names, leaves)}
        if self.config.clip_update_norm is None:  # the metrics per tensor: no flat copies
            old = [params[n].detach() for n in names]
            new = [new_params[n] for n in names]
            return new_params, new_state, step_metrics(old, new, [grads[n] for n in names], {"loss": loss})
        layout = ParamLayout.of(params)
        new_params, metrics = finish_step(layout, layout.flatten(params), layout.flatten(new_params),
                                          layout.flatten(grads), self.config, {"loss": loss})
        return new_params, new_state, metrics

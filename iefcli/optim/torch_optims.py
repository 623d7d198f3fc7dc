"""sgd, adamw, adafactor: torch.optim's own implementations, driven from a pure step.

Each ``update`` clones the params into fresh leaf tensors, gives them the
mean-loss gradient as ``.grad``, installs a CLONE of the saved per-parameter
state in a throw-away ``torch.optim`` instance, calls ``step()`` once and reads
the new params and state back. Inputs are never modified, so the step is a
pure function of (params, state, batch, lr); the cost is O(P) copies.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from iefcli.core.params import ParamLayout, Params
from iefcli.optim.base import ModelFn, OptimConfig, State, finish_step


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
                                   weight_decay=c.weight_decay, foreach=False)
        if c.name == "adamw":
            return torch.optim.AdamW(leaves, lr=lr, betas=tuple(c.betas), eps=c.eps,
                                     weight_decay=c.weight_decay, foreach=False)
        if c.name == "adafactor":
            return torch.optim.Adafactor(leaves, lr=lr, beta2_decay=c.beta2_decay,
                                         weight_decay=c.weight_decay, foreach=False)
        raise ValueError(f"not a torch.optim optimiser: {c.name}")

    def init(self, params: Params) -> State:
        # torch.optim creates its state lazily on the first step; an empty
        # per-parameter dict means "not started".
        return {name: {} for name in params}

    def update(self, params: Params, state: State, batch: Any, *, key: int, lr: float):
        loss, grads = self.fn.mean_loss_and_grad(params, batch.inputs, batch.targets)
        names = list(params)
        leaves = [params[n].detach().clone().requires_grad_(True) for n in names]
        for leaf, n in zip(leaves, names):
            leaf.grad = grads[n].detach().clone()
        opt = self._make(leaves, lr)
        for leaf, n in zip(leaves, names):
            if state.get(n):
                opt.state[leaf] = {k: v.clone() for k, v in state[n].items()}
        opt.step()
        new_params = {n: leaf.detach() for n, leaf in zip(names, leaves)}
        new_state = {n: {k: v.detach() for k, v in opt.state[leaf].items() if isinstance(v, Tensor)}
                     for n, leaf in zip(names, leaves)}
        layout = ParamLayout.of(params)
        new_params, metrics = finish_step(layout, layout.flatten(params), layout.flatten(new_params),
                                          layout.flatten(grads), self.config, {"loss": loss})
        return new_params, new_state, metrics

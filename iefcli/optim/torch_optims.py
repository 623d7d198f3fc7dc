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

    def _mean_loss_and_grads(self, leaves: list[Tensor], names: list[str], batch: Any) -> tuple[Tensor, list[Tensor]]:
        """(mean loss, its gradient per leaf) by ordinary autograd through the leaves (no torch.func
        transform: the same backward a plain torch loop runs). An unused leaf gets zeros."""
        fn = self.fn
        with torch.enable_grad():
            z = fn.forward(fn.model, dict(zip(names, leaves)), batch.inputs)
            loss = fn.loss_fn.per_sample(z, batch.targets).mean()
            grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        return loss.detach(), list(grads)

    def update(self, params: Params, state: State, batch: Any, *, key: int, lr: float):
        names = list(params)
        opt, leaves = self._instance(params, lr)
        old = [params[n].detach() for n in names]
        # The leaves read the INPUT tensors for the forward/backward (``.data`` swaps storage, no copy;
        # nothing writes to them), then take ONE fresh copy each, which torch.optim steps in place and
        # which are returned: the inputs stay untouched and nothing is copied twice.
        for leaf, t in zip(leaves, old):
            leaf.data = t
        loss, grads = self._mean_loss_and_grads(leaves, names, batch)
        new = [t.clone() for t in old]
        for leaf, t, g, n in zip(leaves, new, grads, names):
            leaf.data = t
            leaf.grad = g
            saved = state.get(n)
            if saved:  # one copy of the incoming state, stepped in place and returned
                opt.state[leaf] = {k: v.clone() if isinstance(v, Tensor) else v for k, v in saved.items()}
            else:
                opt.state.pop(leaf, None)
        opt.step()
        for leaf in leaves:
            leaf.grad = None
        new_params = dict(zip(names, new))
        new_state = {n: {k: v for k, v in opt.state[leaf].items() if isinstance(v, Tensor)}
                     for n, leaf in zip(names, leaves)}
        if self.config.clip_update_norm is None:  # the metrics per tensor: no flat copies
            return new_params, new_state, step_metrics(old, new, grads, {"loss": loss})
        layout = ParamLayout.of(params)
        new_params, metrics = finish_step(layout, layout.flatten(params), layout.flatten(new_params),
                                          layout.flatten(dict(zip(names, grads))), self.config, {"loss": loss})
        return new_params, new_state, metrics

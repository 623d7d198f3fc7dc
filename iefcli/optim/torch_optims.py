"""sgd, adamw, adafactor: torch.optim's own implementations, driven from a pure step.

The torch.optim instance is built ONCE (per optimiser object, on the first update) over its own
leaf tensors, and stepped in place: each ``update`` takes the mean-loss gradient by ordinary
autograd (:meth:`iefcli.optim.base.ModelFn.mean_loss_and_grad`), gives each leaf ONE fresh copy of
the incoming param (``leaf.data = param.clone()``: the leaf object, and so the optimiser's state
key, stays) and the instance ONE copy of the incoming state, sets the gradient as ``.grad``, calls
``step()`` and returns those very tensors. Inputs are never modified, so the step stays a pure
function of (params, state, batch, lr) and --resume is exact (the state round-trips through
safetensors); the cost over a plain torch loop is one copy of params and state per step and the
step's diagnostics (:func:`iefcli.optim.base.step_metrics`).
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

    def update(self, params: Params, state: State, batch: Any, *, key: int, lr: float, diagnostics: bool = True):
        names = list(params)
        opt, leaves = self._instance(params, lr)
        old = [params[n].detach() for n in names]
        loss, gd = self.fn.mean_loss_and_grad(params, batch.inputs, batch.targets)
        grads = [gd[n] for n in names]
        # The leaves take ONE fresh copy of the input params each (``.data`` swaps their storage, so the
        # torch.optim state keyed by them stays), which torch.optim steps in place and which are
        # returned: the inputs stay untouched and nothing is copied twice.
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
            return new_params, new_state, step_metrics(old, new, grads if diagnostics else None, {"loss": loss})
        layout = ParamLayout.of(params)
        new_params, metrics = finish_step(layout, layout.flatten(params), layout.flatten(new_params),
                                          layout.flatten(dict(zip(names, grads))) if diagnostics else None,
                                          self.config, {"loss": loss})
        return new_params, new_state, metrics

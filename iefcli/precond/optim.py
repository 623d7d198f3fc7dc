"""IEF: a torch.optim.Optimizer built on the Preconditioner (the one-object case).

    opt = IEF(model, lr=50, damping=1e-7)          # paper-scale damping and learning rate
    for x, y in loader:
        opt.zero_grad()
        loss = opt.loss(model(x), y)               # = opt.preconditioner.loss(...)
        loss.backward()
        opt.step()                                 # direction -> momentum -> weight decay -> p -= lr d

The update per parameter group, the CLI's curvature optimisers' rule: d = the
direction (written into .grad by the preconditioner); with momentum
buf <- momentum * buf + d, d <- buf; with weight decay d <- d + wd * p
(decoupled from the preconditioning); p <- p - lr * d. lr, momentum and
weight_decay are per group (schedulers change group["lr"] as usual); method
and damping are the preconditioner's (one Gram over all trainable params).
``state_dict`` holds the momentum buffers, the groups and the preconditioner's
state (step count, SF's generator), so a resumed run continues identically.
With a GradScaler: ``scaler.scale(loss).backward(); scaler.step(opt);
scaler.update()`` (scaler.step unscales .grad before opt.step computes the direction).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from iefcli.errors import ModelError
from iefcli.precond.preconditioner import Preconditioner

__all__ = ["IEF"]


class IEF(torch.optim.Optimizer):
    """iEF (or ``method="ef"``/``"sf"``) as a torch optimiser; see the module docstring.

    ``params``: optional parameter groups (dicts with "params" and any of lr, momentum,
    weight_decay) over the model's trainable parameters; every trainable parameter must be in
    exactly one group. Default: one group of all of them.
    """

    def __init__(self, model: nn.Module, lr: float = 50.0, damping: float = 1e-7, *, method: str = "ief",
                 momentum: float = 0.0, weight_decay: float = 0.0, loss: Any = "cross_entropy",
                 params: Any = None, options: Any = None, seed: int = 0):
        for key, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not float(value) >= 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        pre = Preconditioner(model, method=method, damping=damping, loss=loss, options=options, seed=seed)
        groups = list(pre.params.values()) if params is None else params
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.preconditioner = pre
        grouped = [p for g in self.param_groups for p in g["params"]]
        ids = {id(p) for p in grouped}
        missing = [n for n, p in pre.params.items() if id(p) not in ids]
        extra = len(ids - {id(p) for p in pre.params.values()})
        if missing or extra or len(ids) != len(grouped):
            raise ModelError("IEF param groups must hold every trainable parameter of the model exactly once"
                             + (f" (missing: {', '.join(missing)})" if missing else "")
                             + (f" ({extra} not trainable in the model)" if extra else ""))
        self.last_info: dict[str, Tensor] = {}

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The mean per-sample loss, recorded for the next step (see Preconditioner.loss)."""
        return self.preconditioner.loss(logits, targets)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_info = self.preconditioner.step()
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if momentum > 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(momentum).add_(d)
                    d = buf
                if wd > 0:
                    d = d.add(p, alpha=wd)
                p.add_(d, alpha=-lr)
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["preconditioner"] = self.preconditioner.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        pre = state_dict.pop("preconditioner", None)
        super().load_state_dict(state_dict)
        if pre is not None:
            self.preconditioner.load_state_dict(pre)

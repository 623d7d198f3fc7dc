"""Layer rules and the capture layer of the fast path.

:func:`rule_for` says which modules have a per-layer rule (Linear, Conv2d,
LayerNorm, Embedding) and why a module has none. :class:`Layer` is one hooked
module: its forward hook records the input X and keeps the output Z (in the
graph) so that the output gradients E = dL/dZ can be had either by
``torch.autograd.grad`` from the logits (the functional forward of
:class:`iefcli.core.fast.jacobian.FastJacobian`) or by a tensor hook during an
ordinary ``loss.backward()`` (:class:`iefcli.precond.Preconditioner`): one
capture layer for both. :func:`leaf_uses` counts autograd consumers of each
parameter (a parameter used outside its layer breaks the per-layer rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["Layer", "rule_for", "conv_padding", "leaf_uses", "active_dropout", "train_mode_batchnorm"]

def _stock_forward(module: nn.Module, cls: type) -> bool:
    return isinstance(module, cls) and type(module).forward is cls.forward


def conv_padding(m: nn.Conv2d) -> tuple[int, int] | None:
    """Symmetric integer padding of a Conv2d, or None when unfold cannot express it."""
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(m.kernel_size, m.dilation):
            total = d * (k - 1)
            if total % 2:
                return None  # 'same' with asymmetric padding
            pads.append(total // 2)
        return tuple(pads)
    return tuple(m.padding)


def rule_for(module: nn.Module) -> tuple[str | None, str]:
    """(kind, reason): the rule that covers ``module``, or None and why not."""
    if _stock_forward(module, nn.Linear):
        return "linear", ""
    if _stock_forward(module, nn.LayerNorm):
        if not module.elementwise_affine:
            return None, "LayerNorm without affine parameters"
        return "layernorm", ""
    if _stock_forward(module, nn.Embedding):
        if module.max_norm is not None or module.scale_grad_by_freq:
            return None, "Embedding with max_norm or scale_grad_by_freq"
        return "embedding", ""
    if _stock_forward(module, nn.Conv2d):
        if module.groups != 1:
            return None, "grouped Conv2d"
        if module.padding_mode != "zeros":
            return None, f"Conv2d with padding_mode={module.padding_mode!r}"
        if conv_padding(module) is None:
            return None, "Conv2d with asymmetric 'same' padding"
        return "conv2d", ""
    return None, f"no fast rule for {type(module).__name__}"


@dataclass
class Layer:
    """One hooked module: what the forward hook saw."""

    name: str
    module: nn.Module
    kind: str
    roles: dict[str, str]  # "weight"/"bias" -> qualified parameter name (trainable ones only)
    calls: int = 0
    x: Tensor | None = None  # the input, detached
    x_version: int = 0
    x_ref: Tensor | None = None  # the input object itself, to re-read its version counter
    out: Tensor | None = None  # the module's own output (in the graph), before any later in-place op
    reason: str = ""

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        self.calls += 1
        if self.calls > 1:
            return None
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor) or not isinstance(output, Tensor) or not output.requires_grad:
            self.reason = "hook could not see a tensor input and a differentiable output"
            return None
        self.x_ref, self.x_version, self.x = x, x._version, x.detach()
        self.out = output
        # Downstream code may modify the output in place (e.g. ReLU(inplace=True)),
        # which would move the autograd history of ``output``; it gets a copy.
        return output.clone()

    def validate(self, uses: dict[int, int], leaves: dict[str, Tensor]) -> dict[str, str]:
        """Parameter name -> why the rule does not apply exactly to it ('' when it does)."""
        if self.calls != 1:
            reason = f"module called {self.calls} times in one forward"
        elif self.reason:
            reason = self.reason
        elif self.x_ref._version != self.x_version:
            reason = "layer input modified in place after the call"
        else:
            reason = ""
        out = {}
        for pname in self.roles.values():
            n_uses = uses.get(id(leaves[pname]), 0)
            out[pname] = reason or (
                "" if n_uses == 1 else f"parameter used by {n_uses} operations (shared or used outside the layer)"
            )
        return out


def leaf_uses(root: Tensor, leaves: dict[str, Tensor]) -> dict[int, int]:
    """For each leaf (by id), the number of autograd edges from the graph of ``root`` into it."""
    wanted = {id(t) for t in leaves.values()}
    uses: dict[int, int] = {}
    if root.grad_fn is None:
        return uses
    seen = {root.grad_fn}
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                if id(var) in wanted:
                    uses[id(var)] = uses.get(id(var), 0) + 1
                continue
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return uses


def active_dropout(model: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return name or type(m).__name__
    return None



def train_mode_batchnorm(model: nn.Module) -> str | None:
    """Name of a batch-norm module in train mode, or None. Batch statistics couple the samples:
    a per-sample gradient is not defined (vmap refuses too); eval mode uses the running statistics."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            return name or type(m).__name__
    return None

"""Layer rules and the capture layer of the fast path.

:func:`rule_for` says which modules have a per-layer rule (Linear, Conv1d, Conv2d,
LayerNorm, RMSNorm, GroupNorm, BatchNorm in eval mode, Embedding) and why a module has none. :class:`Layer` is one hooked
module: its forward hook records the input X and keeps the output Z (in the
graph) so that the output gradients E = dL/dZ can be had either by
``torch.autograd.grad`` from the logits (the functional forward of
:class:`iefcli.core.fast.jacobian.FastJacobian`) or by a tensor hook during an
ordinary ``loss.backward()`` (:class:`iefcli.precond.Preconditioner`): one
capture layer for both. :func:`leaf_uses` counts autograd consumers of each
parameter (a parameter used outside its layer breaks the per-layer rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

__all__ = ["Layer", "Call", "plan_layers", "rule_for", "conv_padding", "leaf_uses", "active_dropout", "train_mode_batchnorm"]

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
    for cls, kind in ((nn.Conv2d, "conv2d"), (nn.Conv1d, "conv1d")):
        if _stock_forward(module, cls):
            what = cls.__name__
            if module.groups != 1:
                return None, f"grouped {what}"
            if module.padding_mode != "zeros":
                return None, f"{what} with padding_mode={module.padding_mode!r}"
            if conv_padding(module) is None:
                return None, f"{what} with asymmetric 'same' padding"
            return kind, ""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and type(module).forward is nn.modules.batchnorm._BatchNorm.forward:
        if not module.affine:
            return None, "BatchNorm without affine parameters"
        if module.running_mean is None or module.running_var is None:
            return None, "BatchNorm without running statistics (it normalises with batch statistics)"
        return "batchnorm", ""  # eval mode only: train mode is refused before any rule is looked at
    if _stock_forward(module, nn.GroupNorm):
        if not module.affine:
            return None, "GroupNorm without affine parameters"
        return "groupnorm", ""
    if hasattr(nn, "RMSNorm") and _stock_forward(module, nn.RMSNorm):
        if not module.elementwise_affine:
            return None, "RMSNorm without affine parameters"
        return "rmsnorm", ""
    return None, f"no fast rule for {type(module).__name__}"


class _Capture:
    """What Layer and Call share: the call counting of their forward hook and the tensor hook that
    keeps dL/d(output) from an ordinary backward."""

    def _record_this_call(self) -> bool:
        """Count a call; True only for the first call of an enabled capture (a second call is refused
        by the caller's checks, from ``calls``)."""
        if not self.enabled:
            return False
        self.calls += 1
        return self.calls == 1

    def _keep_grad(self, grad: Tensor) -> None:
        self.grad = grad.detach()


@dataclass
class Layer(_Capture):
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
    enabled: bool = True  # off: the hook does nothing (a forward that is not recorded, or a replay)
    capture_grad: bool = False  # on: a tensor hook keeps dL/dZ from the next ordinary backward in ``grad``
    grad: Tensor | None = None
    batch: int | None = None  # set: an Embedding called on ids of leading dim 1 (position ids shared by the
    # batch) has its ids and output expanded to this batch size, so each sample gets its own output gradient
    expanded: bool = False

    def reset(self) -> None:
        """Forget the last forward (a new one is about to be recorded)."""
        self.calls, self.x, self.x_ref, self.out, self.grad, self.reason = 0, None, None, None, None, ""

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        if not self._record_this_call():
            return None
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor) or not isinstance(output, Tensor) or not output.requires_grad:
            self.reason = "hook could not see a tensor input and a differentiable output"
            return None
        self.x_ref, self.x_version, self.x = x, x._version, x.detach()
        if (self.batch is not None and self.batch > 1 and self.kind == "embedding" and x.dim() >= 2
                and x.shape[0] == 1 and output.dim() >= 2 and output.shape[0] == 1):
            # a broadcast position embedding: out_n = W[ids] for every n; downstream broadcasting
            # gives the same values, and E per sample is the gradient of the expanded output
            self.x = self.x.expand(self.batch, *x.shape[1:])
            output = output.expand(self.batch, *output.shape[1:])
            self.expanded = True
        self.out = output
        if self.capture_grad:
            output.register_hook(self._keep_grad)
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


@dataclass
class Call(_Capture):
    """One module WITHOUT a rule, captured for the per-module replay fallback: its arguments
    (detached), its output (in the graph) and, from the ordinary backward, dL/d(output)."""

    name: str
    module: nn.Module
    roles: dict[str, str]  # attribute (dotted for a submodule's) -> qualified name of the trainable parameter
    calls: int = 0
    args: Any = None
    kwargs: Any = None
    out: Tensor | None = None
    grad: Tensor | None = None
    reason: str = ""
    enabled: bool = True
    pick: int | None = None  # None: the output is a tensor; i: the replayed output is output[i] of a tuple
    extra: list | None = None  # the tuple's other differentiable outputs (they must not reach the loss)

    def reset(self) -> None:
        self.calls, self.args, self.kwargs, self.out, self.grad, self.reason = 0, None, None, None, None, ""
        self.pick, self.extra = None, None

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        if not self._record_this_call():
            return None
        first = output
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            # e.g. nn.MultiheadAttention's (attn_output, attn_weights or None): the first output is
            # replayed; other differentiable outputs must not reach the loss (checked by the caller)
            self.pick, first = 0, output[0]
            self.extra = [t for t in output[1:] if isinstance(t, Tensor) and t.requires_grad]
            if self.extra:
                self.reason = "its output is a tuple whose other tensors are differentiable (attention weights?)"
        if not isinstance(first, Tensor) or not first.requires_grad:
            self.reason = "its output is not a single differentiable tensor"
            return None
        detach = lambda t: t.detach() if isinstance(t, Tensor) else t  # noqa: E731
        self.args, self.kwargs = tree_map(detach, args), tree_map(detach, kwargs)
        self.out = first
        first.register_hook(self._keep_grad)
        return first.clone() if self.pick is None else (first.clone(), *output[1:])


def plan_layers(model: nn.Module, params) -> tuple[list[Layer], dict[str, str]]:
    """The modules holding trainable ``params`` (names) that have a rule, as :class:`Layer` s (not yet
    hooked), and param name -> why it has no rule, for the others (they take a fallback)."""
    fallback_reasons: dict[str, str] = {}
    aliases: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        aliases[id(p)] = aliases.get(id(p), 0) + 1
    modules = dict(model.named_modules(remove_duplicate=False))
    by_module: dict[str, dict[str, str]] = {}
    for name in params:
        mod_name, _, attr = name.rpartition(".")
        by_module.setdefault(mod_name, {})[attr] = name
    layers = []
    for mod_name, roles in by_module.items():
        module = modules.get(mod_name)
        kind, reason = (None, f"no module {mod_name!r}") if module is None else rule_for(module)
        if kind is not None and set(roles) - {"weight", "bias"}:
            kind, reason = None, f"unexpected parameters {sorted(set(roles) - {'weight', 'bias'})}"
        if kind is not None:
            for attr, pname in list(roles.items()):
                if aliases.get(id(getattr(module, attr, None)), 0) > 1:  # tied weights
                    fallback_reasons[pname] = f"{mod_name}: parameter shared with another module"
                    del roles[attr]
            if not roles:
                continue
        if kind is None:
            for pname in roles.values():
                fallback_reasons[pname] = f"{mod_name or type(model).__name__}: {reason}"
            continue
        layers.append(Layer(mod_name, module, kind, roles))
    return layers, fallback_reasons


def leaf_uses(root: Tensor, leaves: dict[str, Tensor]) -> dict[int, int]:
    """For each leaf (by id), the number of autograd consumers of it in the graph of ``root``.

    An edge into the leaf counts once, except through a cast node (autocast caches one cast of
    each parameter per region and reuses it): there every edge into the cast counts.
    """
    wanted = {id(t) for t in leaves.values()}
    uses: dict[int, int] = {}
    if root.grad_fn is None:
        return uses
    indegree: dict[Any, int] = {}
    into_leaf: list[tuple[Any, int]] = []  # (node, leaf id) for each edge node -> wanted leaf
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
                    into_leaf.append((node, id(var)))
                continue
            indegree[nxt] = indegree.get(nxt, 0) + 1
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    for node, leaf in into_leaf:
        cast = type(node).__name__.startswith("ToCopyBackward") and len(node.next_functions) == 1
        uses[leaf] = uses.get(leaf, 0) + (indegree.get(node, 1) if cast else 1)
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


_FUNC_ERRORS = (
    ("data-dependent control flow", "its forward branches on tensor values (e.g. `if mask.all():`), which torch.func "
     "cannot run per sample; for Hugging Face models pass forward=iefcli.hf.vmap_compat.hf_forward"),
    ("calling .item()", "its forward reads a tensor value into Python (.item(), .tolist(), int(t)), which torch.func "
     "cannot run per sample"),
    ("randomness error mode", "it draws random numbers (dropout in train mode?): put the model in eval mode or pass "
     "randomness='different'"),
    ("Batching rule not implemented", "an operation in its forward has no per-sample (vmap) rule"),
)


def translate_func_error(err: Exception, where: str) -> Exception | None:
    """A one-line error for the common torch.func (vmap) failures of a per-sample replay of ``where``,
    or None when ``err`` is not one of them (then it is re-raised as is)."""
    text = str(err)
    for needle, meaning in _FUNC_ERRORS:
        if needle in text:
            from iefcli.errors import ModelError

            return ModelError(f"{where}: per-sample gradients by torch.func failed: {meaning}")
    return None

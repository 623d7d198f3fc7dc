"""FastJacobian: the fast OutputJacobian over a functional forward (see :mod:`iefcli.core.fast`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import jvp as func_jvp

from iefcli.core.fast.blocks import compute_dtype, make_block
from iefcli.core.fast.rows import FastRows
from iefcli.core.fast.rules import (
    Layer,
    active_dropout,
    leaf_uses,
    plan_layers,
    train_mode_batchnorm,
    translate_func_error,
)
from iefcli.core.jacobian import (
    Forward,
    Inputs,
    Randomness,
    VmapJacobian,
    batch_size_of,
    default_forward,
)
from iefcli.core.params import ParamLayout, Params
from iefcli.errors import ModelError

__all__ = ["FastJacobian"]

_COMPILED_PREFIX = "_orig_mod."


def _uncompiled(model: nn.Module, params: Params) -> tuple[nn.Module, str]:
    """(module to run, prefix of the params' names): a torch.compile wrapper's original module, whose
    submodules the hooks can see (the wrapper's compiled code would bypass them: a zero direction)."""
    if hasattr(model, "_orig_mod") and hasattr(model, "dynamo_ctx"):
        if all(k.startswith(_COMPILED_PREFIX) for k in params):
            return model._orig_mod, _COMPILED_PREFIX
        raise ModelError("the model is a torch.compile wrapper but the params are not named after it "
                         "(trainable_params(compiled_model)); pass the original module instead")
    return model, ""


class FastJacobian:
    """The fast OutputJacobian (see the module docstring).

    Attributes after construction:
      logits (N, ...) detached; layout (all trainable params);
      param_paths: param name -> "linear" | "layernorm" | "embedding" | "conv2d" | "vmap";
      layer_paths: hooked module name -> its kind, for the modules on the fast path;
      fallback_reasons: param name -> why it takes the vmap path.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Params,
        inputs: Inputs,
        *,
        forward: Forward = default_forward,
        chunk_size: int | None = None,
        randomness: Randomness = "error",
    ):
        where = train_mode_batchnorm(model)
        if where is not None:
            raise ModelError(f"batch norm {where} is in train mode; put the model in eval mode")
        if randomness == "error":
            where = active_dropout(model)
            if where is not None:
                raise ModelError(
                    f"dropout module {where} is active (train mode); put the model in eval mode "
                    "or pass randomness='different'"
                )
        self.model, self.params, self.inputs, self.forward = model, params, inputs, forward
        self.chunk_size, self.randomness = chunk_size, randomness
        self.layout = ParamLayout.of(params)
        self._dtype = next(iter(params.values())).dtype
        self.fallback_reasons: dict[str, str] = {}

        # A compiled model runs as its original module here (functional_call never used the compiled
        # code's speed anyway); the params keep the caller's names outside.
        self._inner, self._prefix = _uncompiled(model, params)
        layers, reasons = plan_layers(self._inner, self._strip(params))
        for layer in layers:
            layer.roles = {r: self._prefix + p for r, p in layer.roles.items()}
        self.fallback_reasons.update({self._prefix + k: v for k, v in reasons.items()})
        self._leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        handles = [layer.module.register_forward_hook(layer.hook, with_kwargs=True) for layer in layers]
        try:
            with torch.enable_grad():
                out = forward(self._inner, self._strip(self._leaves), inputs)
        finally:
            for h in handles:
                h.remove()
        self._out = out
        self.logits = out.detach()

        uses = leaf_uses(out, self._leaves) if out.requires_grad else {}
        n_batch = batch_size_of(inputs)
        self._layers: list[Layer] = []
        for layer in layers:
            reasons = (
                layer.validate(uses, self._leaves) if out.requires_grad
                else {p: "logits do not require grad" for p in layer.roles.values()}
            )
            if layer.x is not None and (layer.x.dim() == 0 or layer.x.shape[0] != n_batch):
                # One call shared by all samples (e.g. peft computes the prompt embedding
                # once and expands it): the per-sample rules need the batch as dim 0.
                reasons = {p: r or "layer input's leading dim is not the batch (shared across samples)"
                           for p, r in reasons.items()}
            for pname, reason in reasons.items():
                if reason:
                    self.fallback_reasons[pname] = f"{layer.name}: {reason}"
            # Per parameter: e.g. a bias keeps its rule when only the weight is also used elsewhere.
            layer.roles = {r: p for r, p in layer.roles.items() if not reasons[p]}
            if layer.roles:
                self._layers.append(layer)
            layer.x_ref = None  # only the detached copy is needed from here on
        fast = {p: layer.kind for layer in self._layers for p in layer.roles.values()}
        self.param_paths = {name: fast.get(name, "vmap") for name in params}
        self.layer_paths = {layer.name: layer.kind for layer in self._layers}
        self._fallback_names = [n for n in params if n not in fast]
        self._fallback: VmapJacobian | None = None

    def _strip(self, params: Params) -> Params:
        """The caller's names -> the names inside the module that runs (compiled: without the prefix)."""
        if not self._prefix:
            return params
        k = len(self._prefix)
        return {name[k:]: v for name, v in params.items()}

    # -- the OutputJacobian protocol

    def vjp(self, cotangent: Tensor) -> Tensor:
        """sum_n Jz_n^T V_n, (P,), by one backward pass on the retained graph."""
        leaves = list(self._leaves.values())
        if not self._out.requires_grad:
            return torch.zeros(self.layout.size, dtype=self._dtype, device=self.logits.device)
        with torch.enable_grad():
            grads = torch.autograd.grad(
                self._out, leaves, cotangent.to(self._out.dtype), retain_graph=True, allow_unused=True
            )
        return torch.cat([(torch.zeros_like(t) if g is None else g).reshape(-1) for t, g in zip(leaves, grads)])

    def jvp(self, tangent: Tensor) -> Tensor:
        """Jz v, (N, ...), forward mode over the (hook-free) forward."""
        tangents = self.layout.unflatten(tangent.to(self._dtype))
        _, out = func_jvp(lambda p: self.forward(self._inner, self._strip(p), self.inputs), (self.params,), (tangents,))
        return out

    def _fallback_jacobian(self) -> VmapJacobian:
        if self._fallback is None:
            fixed = {k: v for k, v in self.params.items() if k not in set(self._fallback_names)}
            forward, sub = self.forward, {k: self.params[k] for k in self._fallback_names}

            inner, strip = self._inner, self._strip

            def forward_sub(model: nn.Module, p: Params, inputs: Inputs) -> Tensor:
                return forward(inner, strip({**fixed, **p}), inputs)

            self._fallback = VmapJacobian(
                self.model, sub, self.inputs, forward=forward_sub, chunk_size=self.chunk_size,
                randomness=self.randomness,
            )
        return self._fallback

    def rows(self, cotangents: Tensor) -> FastRows:
        """Rows Jz_n^T U_{kn} (K*N of them, k-major) for cotangents (K, N, ...), as FastRows."""
        k = cotangents.shape[0]
        u = cotangents.to(self._out.dtype)
        targets = [layer.out for layer in self._layers]
        grads: list[list[Tensor]] = [[] for _ in targets]
        if targets:
            with torch.enable_grad():
                for i in range(k):  # one backward pass per cotangent set: E = dL_k / dZ per layer
                    gs = torch.autograd.grad(self._out, targets, u[i], retain_graph=True, allow_unused=True)
                    for j, g in enumerate(gs):
                        grads[j].append(torch.zeros_like(targets[j]) if g is None else g.detach())
        shapes = dict(zip(self.layout.names, self.layout.shapes))
        cdt = compute_dtype(self._dtype)
        blocks = [make_block(layer, gs, shapes, cdt) for layer, gs in zip(self._layers, grads)]
        fallback = fb_layout = None
        if self._fallback_names:
            fj = self._fallback_jacobian()
            try:
                fallback, fb_layout = fj.rows(cotangents), fj.layout
            except RuntimeError as e:
                err = translate_func_error(e, "the vmap fallback for " + ", ".join(self._fallback_names[:3])
                                           + (" ..." if len(self._fallback_names) > 3 else ""))
                if err is None:
                    raise
                raise err from None
        n = self.logits.shape[0]
        return FastRows(blocks, fallback, fb_layout, self.layout, k * n, self._dtype, self.logits.device)


"""FastJacobian: the fast OutputJacobian over a functional forward (see :mod:`iefcli.core.fast`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import jvp as func_jvp

import dataclasses

from iefcli.core.fast.attention import Attn, plan_attention
from iefcli.core.fast.blocks import MATERIALISE_MAX_ELEMENTS, _DenseBlock, _TiedBlock, compute_dtype, make_block, replay_block
from iefcli.core.fast.rows import FastRows
from iefcli.core.fast.rules import (
    Call,
    Layer,
    active_dropout,
    leaf_uses,
    plan_layers,
    rule_for,
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


def _plan_calls(model: nn.Module, layers: list[Layer], reasons: dict[str, str]) -> tuple[list[Layer], list[Call]]:
    """The per-module fallback plan: each module owning trainable parameters without a rule becomes a
    :class:`Call` (replayed per sample on its own, its parameters the only variables), absorbing the
    rule layers and fallback modules below it (e.g. nn.MultiheadAttention's out_proj, whose weight it
    uses without calling the module). Tied parameters, the root's own parameters and recurrent modules
    are left to the whole-model vmap path."""
    modules = dict(model.named_modules(remove_duplicate=False))
    by_module: dict[str, dict[str, str]] = {}
    for pname, reason in reasons.items():
        mod_name, _, attr = pname.rpartition(".")
        module = modules.get(mod_name) if mod_name else None
        if module is None or "shared with another module" in reason or isinstance(module, nn.RNNBase):
            continue
        by_module.setdefault(mod_name, {})[attr] = pname
    top: list[str] = []
    for name in sorted(by_module, key=lambda s: s.count(".")):
        anc = next((t for t in top if name.startswith(t + ".")), None)
        if anc is None:
            top.append(name)
        else:
            by_module[anc].update({f"{name[len(anc) + 1:]}.{a}": p for a, p in by_module.pop(name).items()})
    keep = []
    for layer in layers:
        anc = next((t for t in top if layer.name.startswith(t + ".")), None)
        if anc is None:
            keep.append(layer)
        else:
            by_module[anc].update({f"{layer.name[len(anc) + 1:]}.{a}": p for a, p in layer.roles.items()})
            for p in layer.roles.values():
                reasons[p] = f"{layer.name}: inside {anc}, which has no fast rule (replayed with it)"
    return keep, [Call(t, modules[t], by_module[t]) for t in top]


def _plan_tied(model: nn.Module, layers: list[Layer], reasons: dict[str, str], params, n: int) -> dict[str, int]:
    """Tied parameters whose every holder has a rule (e.g. an Embedding and the Linear head sharing one
    weight): added to each holder's roles; their per-sample gradient is the sum of the holders' columns,
    materialised (M x numel, bounded by MATERIALISE_MAX_ELEMENTS; the vmap path would hold the same).
    Returns name -> number of holders."""
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((mod_name, module, attr))
    by_name = {layer.name: layer for layer in layers}
    out = {}
    for pname, reason in list(reasons.items()):
        if "shared with another module" not in reason:
            continue
        try:
            hs = holders.get(id(model.get_parameter(pname)), [])  # the module's Parameter (params are detached)
        except AttributeError:
            continue
        if len(hs) < 2 or n * params[pname].numel() > MATERIALISE_MAX_ELEMENTS:
            continue
        kinds = [rule_for(m)[0] for _, m, a in hs]
        if any(k is None for k in kinds) or any(a not in ("weight", "bias") for _, _, a in hs) \
                or len({name for name, _, _ in hs}) != len(hs):
            continue
        for (name, module, attr), kind in zip(hs, kinds):
            if name not in by_name:
                by_name[name] = Layer(name, module, kind, {})
                layers.append(by_name[name])
            by_name[name].roles[attr] = pname
        out[pname] = len(hs)
    return out


def _graph_nodes(root: Tensor) -> set:
    seen, stack = {root.grad_fn}, [root.grad_fn]
    while stack:
        for nxt, _ in stack.pop().next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _uses_outside(root: Tensor, leaves: dict[str, Tensor], stops: list[Tensor]) -> dict[int, int]:
    """Leaf id -> edges into it from the graph of ``root`` NOT inside the ``stops`` tensors' graphs
    (the walk does not enter their grad_fns)."""
    wanted = {id(t) for t in leaves.values()}
    stop = {t.grad_fn for t in stops if t.grad_fn is not None}
    uses: dict[int, int] = {}
    seen, stack = {root.grad_fn}, [root.grad_fn]
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None or nxt in stop:
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


def _replay_problem(call: Call, uses: dict[int, int], leaves: dict[str, Tensor], n: int) -> str:
    """Why ``call`` cannot be replayed per sample on its own ('' when it can)."""
    from torch.utils._pytree import tree_leaves

    if call.calls != 1:
        return f"no fast rule, and called {call.calls} times in one forward (the replay needs one call)"
    if call.reason:
        return f"no fast rule, and {call.reason}"
    for p in call.roles.values():
        k = uses.get(id(leaves[p]), 0)
        if k > 0:
            return f"no fast rule, and parameter {p} is also used outside the module ({k} operations)"
    for name, m in call.module.named_modules():
        if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return "no fast rule, and active dropout inside"
    if call.out.dim() == 0 or call.out.shape[0] != n:
        return "no fast rule, and its output's leading dim is not the batch"
    if not any(isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n for t in tree_leaves((call.args, call.kwargs))):
        return "no fast rule, and no input has the batch as its leading dim"
    return ""


class FastJacobian:
    """The fast OutputJacobian (see the module docstring).

    Attributes after construction:
      logits (N, ...) detached; layout (all trainable params);
      param_paths: param name -> a rule kind ("linear", "conv1d", "conv2d", "layernorm", "rmsnorm",
        "groupnorm", "batchnorm", "embedding", "attention", "tied"), "replay" (the per-module fallback)
        or "vmap" (whole model);
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
        tied = _plan_tied(self._inner, layers, reasons, self._strip(params), batch_size_of(inputs))
        layers, attns = plan_attention(self._inner, self._strip(params), layers, reasons)
        layers, calls = _plan_calls(self._inner, layers, reasons)
        self._tied = {self._prefix + p: k for p, k in tied.items()}
        for cap in [*layers, *calls, *attns]:
            cap.roles = {r: self._prefix + p for r, p in cap.roles.items()}
        self.fallback_reasons.update({self._prefix + k: v for k, v in reasons.items()})
        self._vm: VmapJacobian | None = None
        planned = {p for cap in [*layers, *calls, *attns] for p in cap.roles.values()} | set(self._tied)
        whole = [p for p in params if p not in planned]  # certain to take the whole-model path
        if 2 * sum(params[p].numel() for p in whole) >= sum(t.numel() for t in params.values()):
            # Most of the parameters go through the model per sample anyway (a recurrent module, tied
            # weights without rules): the plain path for all of them costs less than a hooked forward,
            # the layer blocks AND that per-sample pass.
            self._whole_model(whole)
            return
        self._leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        handles = [cap.module.register_forward_hook(cap.hook, with_kwargs=True) for cap in [*layers, *calls]]
        for att in attns:  # the attention rule runs its own forward in place of the module's
            att.install()
        n_batch = batch_size_of(inputs)
        for layer in layers:
            layer.batch = n_batch if layer.kind == "embedding" else None
        try:
            with torch.enable_grad():
                try:
                    out = forward(self._inner, self._strip(self._leaves), inputs)
                except Exception:
                    if not any(layer.expanded for layer in layers):
                        raise
                    # the model did not take an expanded position embedding: run it as written
                    for cap in [*layers, *calls, *attns]:
                        cap.reset()
                    for layer in layers:
                        layer.batch, layer.expanded = None, False
                    out = forward(self._inner, self._strip(self._leaves), inputs)
        finally:
            for h in handles:
                h.remove()
            for att in attns:
                att.remove()
        self._out = out
        self.logits = out.detach()

        uses = leaf_uses(out, self._leaves) if out.requires_grad else {}
        self._layers: list[Layer] = []
        all_reasons = []
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
            for p in reasons:
                # a tied parameter is used once by each of its holders: that is its expected use count
                if p in self._tied and reasons[p].startswith("parameter used by") \
                        and uses.get(id(self._leaves[p]), 0) == self._tied[p]:
                    reasons[p] = ""
            all_reasons.append(reasons)
        bad_tied = {p: r for rs in all_reasons for p, r in rs.items() if p in self._tied and r}
        for p in self._tied:
            if p not in bad_tied:
                self.fallback_reasons.pop(p, None)
        self._tied = {p: k for p, k in self._tied.items() if p not in bad_tied}
        for layer, reasons in zip(layers, all_reasons):
            reasons = {p: r or bad_tied.get(p, "") for p, r in reasons.items()}
            for pname, reason in reasons.items():
                if reason:
                    self.fallback_reasons[pname] = f"{layer.name}: {reason}"
            # Per parameter: e.g. a bias keeps its rule when only the weight is also used elsewhere.
            layer.roles = {r: p for r, p in layer.roles.items() if not reasons[p]}
            if layer.roles:
                self._layers.append(layer)
            layer.x_ref = None  # only the detached copy is needed from here on
        self._attns: list[Attn] = []
        for att in attns:  # the rule applies exactly, or the module is replayed on its own as before
            why = att.problem(uses, self._leaves, n_batch) if out.requires_grad else "logits do not require grad"
            if why:
                call = att.to_call()
                calls.append(call)
                for p in call.roles.values():
                    self.fallback_reasons[p] = f"{att.name}: attention rule: {why}"
            else:
                self._attns.append(att)
            att.x_refs = []
        self._calls: list[Call] = []
        nodes = None
        # uses of each leaf OUTSIDE the replayed modules (the walk does not enter their outputs' graphs):
        # a parameter may be used any number of times inside its module, never outside it
        outside = _uses_outside(out, self._leaves, [c.out for c in calls if c.out is not None]) \
            if calls and out.requires_grad else {}
        for call in calls:
            if call.extra and call.reason.startswith("its output is a tuple") and out.requires_grad:
                nodes = _graph_nodes(out) if nodes is None else nodes
                if not any(t.grad_fn in nodes for t in call.extra):
                    call.reason = ""  # the tuple's other outputs do not reach the logits
            why = (_replay_problem(call, outside, self._leaves, n_batch) if out.requires_grad
                   else "logits do not require grad")
            if why:
                for p in call.roles.values():
                    self.fallback_reasons[p] = f"{call.name}: {why}"
            else:
                self._calls.append(call)
                for p in call.roles.values():  # an attention module whose rule did not apply: replayed
                    if self.fallback_reasons.get(p, "").startswith(f"{call.name}: attention rule:"):
                        self.fallback_reasons[p] += " (replayed)"
        fast = {p: layer.kind for layer in self._layers for p in layer.roles.values()}
        fast.update({p: "tied" for p in self._tied})
        fast.update({p: "replay" for call in self._calls for p in call.roles.values()})
        fast.update({p: "attention" for att in self._attns for p in att.roles.values()})
        self.param_paths = {name: fast.get(name, "vmap") for name in params}
        self.layer_paths = {layer.name: layer.kind for layer in self._layers}
        self.layer_paths.update({call.name: "replay" for call in self._calls})
        self.layer_paths.update({att.name: "attention" for att in self._attns})
        self._fallback_names = [n for n in params if n not in fast]
        self._fallback: VmapJacobian | None = None

    def _whole_model(self, whole: list[str]) -> None:
        """Delegate everything to the plain path (:class:`VmapJacobian` over all parameters)."""
        self._vm = VmapJacobian(self.model, self.params, self.inputs, forward=self.forward,
                                chunk_size=self.chunk_size, randomness=self.randomness)
        self.logits = self._vm.logits.detach()
        total = sum(t.numel() for t in self.params.values())
        share = sum(self.params[p].numel() for p in whole) / max(1, total)
        first = f"{whole[0]}: {self.fallback_reasons.get(whole[0], 'no layer rule')}"
        for p in self.params:
            if p not in whole:
                self.fallback_reasons[p] = (f"the plain path for the whole model: parameters that must go through "
                                            f"it hold {100 * share:.0f}% of the numbers (e.g. {first})")
        self.param_paths = {name: "vmap" for name in self.params}
        self.layer_paths = {}
        self._fallback_names = list(self.params)
        self._fallback = self._vm
        self._tied, self._layers, self._calls, self._attns = {}, [], [], []

    def _strip(self, params: Params) -> Params:
        """The caller's names -> the names inside the module that runs (compiled: without the prefix)."""
        if not self._prefix:
            return params
        k = len(self._prefix)
        return {name[k:]: v for name, v in params.items()}

    # -- the OutputJacobian protocol

    def vjp(self, cotangent: Tensor) -> Tensor:
        """sum_n Jz_n^T V_n, (P,), by one backward pass on the retained graph."""
        if self._vm is not None:
            return self._vm.vjp(cotangent)
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
        if self._vm is not None:
            return self._vm.jvp(tangent)
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

    def _recurrent_owner(self) -> str | None:
        """'name (GRU)' of a recurrent module owning a fallback parameter, or None."""
        modules = dict(self._inner.named_modules(remove_duplicate=False))
        k = len(self._prefix)
        for p in self._fallback_names:
            mod = modules.get(p[k:].rpartition(".")[0])
            if isinstance(mod, nn.RNNBase):
                return f"{p[k:].rpartition('.')[0]} ({type(mod).__name__})"
        return None

    def rows(self, cotangents: Tensor) -> FastRows:
        """Rows Jz_n^T U_{kn} (K*N of them, k-major) for cotangents (K, N, ...), as FastRows."""
        if self._vm is not None:
            return self._whole_rows(cotangents)
        k = cotangents.shape[0]
        u = cotangents.to(self._out.dtype)
        targets = [layer.out for layer in self._layers] + [call.out for call in self._calls]
        targets += [t for att in self._attns for t in att.targets]
        grads: list[list[Tensor]] = [[] for _ in targets]
        if targets:
            with torch.enable_grad():
                for i in range(k):  # one backward pass per cotangent set: E = dL_k / dZ per layer
                    gs = torch.autograd.grad(self._out, targets, u[i], retain_graph=True, allow_unused=True)
                    for j, g in enumerate(gs):
                        grads[j].append(torch.zeros_like(targets[j]) if g is None else g.detach())
        shapes = dict(zip(self.layout.names, self.layout.shapes))
        cdt = compute_dtype(self._dtype)
        nl = len(self._layers)
        blocks, tied = [], {}
        for layer, gs in zip(self._layers, grads[:nl]):
            own = {r: p for r, p in layer.roles.items() if p not in self._tied}
            if own:
                blocks.append(make_block(dataclasses.replace(layer, roles=own) if len(own) < len(layer.roles)
                                         else layer, gs, shapes, cdt))
            for r, p in layer.roles.items():
                if p in self._tied:  # this holder's share of the tied parameter (summed over holders)
                    tied.setdefault(p, []).append(make_block(dataclasses.replace(layer, roles={r: p}), gs, shapes, cdt))
        blocks += [_TiedBlock(p, parts, shapes) for p, parts in tied.items()]
        nc = nl + len(self._calls)
        for att in self._attns:  # the attention rule: its projections are sequence Linear blocks
            nt = len(att.targets)
            blocks += att.blocks(grads[nc : nc + nt], k, cdt)
            nc += nt
        for call, gs in zip(self._calls, grads[nl:nl + len(self._calls)]):  # the per-module fallback: only this module per sample
            try:
                blocks.append(replay_block(call, gs, shapes, randomness=self.randomness))
            except RuntimeError as e:
                names = list(call.roles.values())
                err = translate_func_error(e, "the vmap fallback for " + ", ".join(names[:3])
                                           + (" ..." if len(names) > 3 else "")
                                           + f" (module {call.name}, {type(call.module).__name__}, replayed alone)")
                if err is None:
                    raise
                raise err from None
        fallback = fb_layout = None
        if self._fallback_names:
            fallback, fb_layout = self._whole_rows(cotangents), self._fallback_jacobian().layout
        n = self.logits.shape[0]
        return FastRows(blocks, fallback, fb_layout, self.layout, k * n, self._dtype, self.logits.device)

    def _whole_rows(self, cotangents: Tensor):
        """The whole-model (plain) rows of the fallback parameters, with one-line errors."""
        fj = self._fallback_jacobian()
        try:
            return fj.rows(cotangents)
        except RuntimeError as e:
            err = translate_func_error(e, "the vmap fallback for " + ", ".join(self._fallback_names[:3])
                                       + (" ..." if len(self._fallback_names) > 3 else ""))
            if err is None:
                rnn = self._recurrent_owner()
                if rnn is None:
                    raise
                err = ModelError(f"module {rnn} has no fast rule and torch.func could not run the model per "
                                 f"sample through it ({str(e).splitlines()[0][:120]}); freeze it, or run it "
                                 "outside the trainable part of the model")
            raise err from None


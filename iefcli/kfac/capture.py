"""Capture K-FAC's per-layer inputs and output gradients with module hooks.

:func:`find_layers` lists the layers with a rule (stock ``nn.Linear``,
``nn.Conv2d`` with groups 1 and zero padding, ``nn.Embedding`` without
max_norm / scale_grad_by_freq, whose weight is trainable) and every other
trainable parameter with the reason it has none. Those others take the
documented FALLBACK: a diagonal preconditioner whose entries are the diagonal
of the same matrix (per-sample gradients of just those parameters, by vmap;
see :mod:`iefcli.kfac.optim`).

:class:`Capture` is a context manager over the fast path's capture layer
(:class:`iefcli.core.fast.rules.Layer`, the one the drop-in preconditioner's
hooks use too: one capture layer for iEF and K-FAC): a forward hook on each
rule layer records its input (detached) and puts a tensor hook on its output,
which records the output gradient every time one flows back: an ordinary
``loss.backward()`` or ``torch.autograd.grad`` both fire it, once per backward.
So one forward followed by K backward passes (true labels, sampled labels)
gives K output gradients per layer. Nothing is kept after the context exits.

The recorded a (N, T, d_in[+1]) and e (N, T, d_out) are the linear form of
:mod:`iefcli.kfac.factors`. The output gradient is whatever the backward
carries: the optimiser back-propagates per-sample LOGIT gradients of the
unscaled per-sample losses (cotangent dl_n/dz_n), so e_nt = d l_n / d z_nt.
A user's ``mean loss .backward()`` gives e / N instead (``grad_scale``).

A layer called more than once per forward, whose input was modified in place
after the call, or whose input's leading dim is not the batch size, is refused
by :meth:`Capture.check` (it would mix samples or read the wrong input);
the optimiser moves it to the fallback at its first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iefcli.core.fast.rules import Layer
from iefcli.kfac.factors import with_bias_column

__all__ = ["LayerRule", "find_layers", "Capture", "linear_a", "linear_e"]


@dataclass(frozen=True)
class LayerRule:
    """One layer with a K-FAC rule: its module path, kind and parameter names."""

    name: str
    kind: str  # "linear" | "conv2d" | "embedding"
    weight: str  # qualified parameter names (keys of the params dict)
    bias: str | None


def _stock(m: nn.Module, cls: type) -> bool:
    return isinstance(m, cls) and type(m).forward is cls.forward


def _conv_ok(m: nn.Conv2d) -> str | None:
    if m.groups != 1:
        return "grouped convolution"
    if m.padding_mode != "zeros":
        return f"padding_mode {m.padding_mode}"
    if isinstance(m.padding, str) and m.padding != "valid":
        if any((d * (k - 1)) % 2 for k, d in zip(m.kernel_size, m.dilation)):
            return "asymmetric 'same' padding"
    return None


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        return tuple(d * (k - 1) // 2 for k, d in zip(m.kernel_size, m.dilation))
    return tuple(m.padding)


def find_layers(model: nn.Module, param_names) -> tuple[list[LayerRule], dict[str, str]]:
    """(rules, fallback): the layers K-FAC covers, and {param name: why it has no rule}.

    ``param_names``: the trainable parameter names (keys of the params dict).
    A parameter shared by several modules (tied) is left to the fallback.
    """
    names = set(param_names)
    owners: dict[int, list[str]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    rules: list[LayerRule] = []
    covered: set[str] = set()
    fallback: dict[str, str] = {}
    for mname, m in model.named_modules():
        w = f"{mname}.weight" if mname else "weight"
        b = f"{mname}.bias" if mname else "bias"
        kind = None
        why = None
        if _stock(m, nn.Linear):
            kind = "linear"
        elif _stock(m, nn.Conv2d):
            kind, why = "conv2d", _conv_ok(m)
        elif _stock(m, nn.Embedding):
            kind = "embedding"
            if m.max_norm is not None or m.scale_grad_by_freq:
                why = "Embedding with max_norm or scale_grad_by_freq"
        if kind is None or w not in names:
            continue
        shared = len(owners.get(id(m.weight), [])) > 1
        has_b = getattr(m, "bias", None) is not None
        if has_b and len(owners.get(id(m.bias), [])) > 1:
            shared = True
        if why is None and shared:
            why = "parameter shared with another module (tied)"
        if why is not None:
            fallback[w] = why
            if has_b and b in names:
                fallback[b] = why
            continue
        rules.append(LayerRule(mname, kind, w, b if (kind != "embedding" and has_b and b in names) else None))
        covered.add(w)
        if has_b and b in names and kind != "embedding":
            covered.add(b)
    for p in param_names:
        if p not in covered and p not in fallback:
            fallback[p] = "no K-FAC rule for its module"
    return rules, fallback


@dataclass
class _Recorded(Layer):
    """The fast path's capture layer, keeping EVERY output gradient (one per backward) in ``grads``."""

    grads: list = field(default_factory=list)

    def reset(self) -> None:
        super().reset()
        self.grads = []

    def _keep_grad(self, grad: Tensor) -> None:
        self.grad = grad.detach()
        self.grads.append(self.grad)


class Capture:
    """Hooks on ``rules``' modules for the duration of a ``with`` block: a thin adapter over the fast
    path's capture layer (:class:`iefcli.core.fast.rules.Layer`, the same one the drop-in
    preconditioner hooks), which records each module's input and output and keeps every output
    gradient that flows back.

    After ``forward`` and K backward passes: ``a(rule)`` (N, T, d_in[+1]) and
    ``e(rule, k)`` (N, T, d_out), the k-th output gradient in backward order,
    multiplied by ``grad_scale``. Tensors keep the model's dtype unless ``dtype``.
    """

    def __init__(self, model: nn.Module, rules: list[LayerRule], *, dtype: torch.dtype | None = None,
                 grad_scale: float = 1.0):
        self.model = model
        self.rules = rules
        self.dtype = dtype
        self.grad_scale = grad_scale
        mods = dict(model.named_modules())
        self.modules = {r.name: mods[r.name] for r in rules}
        self.recs: dict[str, _Recorded] = {}
        for r in rules:
            roles = {"weight": r.weight, **({"bias": r.bias} if r.bias is not None else {})}
            self.recs[r.name] = _Recorded(r.name, self.modules[r.name], r.kind, roles, capture_grad=True)
        self._handles: list = []

    def __enter__(self) -> "Capture":
        for r in self.rules:
            self._handles.append(self.modules[r.name].register_forward_hook(self.recs[r.name].hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def check(self, n: int) -> dict[str, str]:
        """{layer name: reason} for layers this forward cannot be captured for."""
        bad = {}
        for r in self.rules:
            rec = self.recs[r.name]
            if rec.calls != 1:
                bad[r.name] = f"called {rec.calls} times in one forward"
            elif rec.reason:
                bad[r.name] = rec.reason
            elif rec.x_ref._version != rec.x_version:
                bad[r.name] = "its input was modified in place after the call"
            elif rec.x.dim() < 1 or rec.x.shape[0] != n:
                bad[r.name] = "its input's leading dim is not the batch"
        return bad

    def a(self, rule: LayerRule) -> Tensor:
        """The layer's input rows in linear form, (N, T, d_in [+1])."""
        return linear_a(rule, self.modules[rule.name], self.recs[rule.name].x, self.dtype)

    def e(self, rule: LayerRule, k: int = 0) -> Tensor:
        """The k-th recorded output gradient in linear form, (N, T, d_out)."""
        return linear_e(rule, self.recs[rule.name].grads[k], self.dtype, self.grad_scale)

    def n_grads(self, rule: LayerRule) -> int:
        return len(self.recs[rule.name].grads)


def linear_a(rule: LayerRule, module: nn.Module, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A rule layer's input ``x`` (as the module received it) in linear form, (N, T, d_in [+1]),
    cast to ``dtype`` (None: as is). Embedding ids become one-hot rows (0 at ``padding_idx``)."""
    n = x.shape[0]
    if rule.kind == "embedding":  # one-hot rows (N, T, V); ids stay integers until then
        ids = x.reshape(n, -1)
        a = F.one_hot(ids, module.num_embeddings).to(dtype or module.weight.dtype)
        if module.padding_idx is not None:
            a[..., module.padding_idx] = 0  # torch gives the padding row no gradient: J_n's column is 0
        return a
    x = x if dtype is None else x.to(dtype)
    if rule.kind == "linear":
        a = x.reshape(n, -1, x.shape[-1])
    else:  # conv2d
        a = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=_conv_padding(module),
                     stride=module.stride)
        a = a.transpose(1, 2)  # (N, L, C_in*kh*kw)
    return with_bias_column(a) if rule.bias is not None else a


def linear_e(rule: LayerRule, g: Tensor, dtype: torch.dtype | None = None, scale: float = 1.0) -> Tensor:
    """A rule layer's output gradient ``g`` in linear form, (N, T, d_out), times ``scale``."""
    g = (g if dtype is None else g.to(dtype)) * scale
    n = g.shape[0]
    if rule.kind == "conv2d":
        return g.reshape(n, g.shape[1], -1).transpose(1, 2)
    return g.reshape(n, -1, g.shape[-1])

"""The attention rule of the fast path: nn.MultiheadAttention (and so nn.TransformerEncoderLayer's
and nn.TransformerDecoderLayer's attention) without a per-sample replay.

nn.MultiheadAttention reads its parameters inside ``F.multi_head_attention_forward``: the packed
in-projection ``in_proj_weight`` / ``in_proj_bias`` (or ``q/k/v_proj_weight`` when kdim/vdim differ)
and ``out_proj`` (a Linear whose weight is read, the module never called). No forward hook can see
the projections' outputs there, so :class:`Attn` REPLACES the module's forward during the fast
path's batched forward (an instance attribute, removed afterwards) by :func:`attention_forward`,
the same computation written batch-first with the projections as graph tensors:

    z_in = x W_in^T + b_in   (one Linear when query, key and value are the same tensor, else three)
    q, k, v = split(z_in) -> heads;  o = softmax(q k^T / sqrt(d_h) + mask) v  (or SDPA, as torch does)
    z_o = a W_o^T + b_o,  a = o with the heads merged

so each projection is an ordinary Linear on a sequence: X = its input (N, T, d_in), E = dL/dz from
the same backward pass as every other layer, and its block is :class:`_MatmulBlock` (ghost or
materialised, as for any sequence Linear). The per-sample gradient of W_in is exactly
sum_t E_t^T X_t whatever follows the projection (attention weights returned and used downstream
included: E is the total derivative). Packed weights on three DIFFERENT inputs (cross-attention)
are three row slices of one parameter: materialised (M x 3 E d) as one dense block (above
MATERIALISE_MAX_ELEMENTS for N x 3 E d the module is replayed instead). Separate
q/k/v weights are three Linear blocks, the packed bias one dense block.

Covered: batch_first True and False (inputs transposed to batch-first inside, so X's leading dim is
the batch), attn_mask (2-D or 3-D, bool or float), key_padding_mask (bool or float),
need_weights / average_attn_weights, is_causal with its attn_mask, bias True/False, kdim/vdim.
Not covered (the module keeps the per-module replay; :func:`attention_rule` says why):
add_bias_kv, add_zero_attn, active attention dropout (train mode with dropout > 0), a subclass
overriding forward, unbatched (2-D) inputs. After the forward :meth:`Attn.problem` checks that the
module was called once, each parameter has exactly one consumer in the graph and the inputs kept
their version; otherwise the capture turns into an ordinary :class:`Call` (the replay).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from iefcli.core.fast.rules import Call

__all__ = ["Attn", "attention_rule", "attention_forward"]

_ATTRS = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
          "out_proj.weight", "out_proj.bias")


def attention_rule(module: nn.Module) -> str:
    """'' when the attention rule covers ``module`` (an nn.MultiheadAttention), else why not."""
    if not isinstance(module, nn.MultiheadAttention):
        return f"{type(module).__name__} is not nn.MultiheadAttention"
    if type(module).forward is not nn.MultiheadAttention.forward or "forward" in module.__dict__:
        return "MultiheadAttention subclass overriding forward"
    if type(module.out_proj).forward is not nn.Linear.forward:
        return "MultiheadAttention whose out_proj is not a stock Linear"
    if module.bias_k is not None or module.bias_v is not None:
        return "MultiheadAttention with add_bias_kv=True (not covered by the attention rule)"
    if module.add_zero_attn:
        return "MultiheadAttention with add_zero_attn=True (not covered by the attention rule)"
    if module.training and module.dropout > 0:
        return "MultiheadAttention with active attention dropout (train mode)"
    return ""


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool mask (True = not allowed) as an additive float mask, as torch's _canonical_mask does."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise RuntimeError("only bool and floating types of masks are supported")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def attention_forward(m: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                      key_padding_mask: Tensor | None = None, need_weights: bool = True,
                      attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                      is_causal: bool = False) -> tuple[tuple[Tensor, Tensor | None], dict]:
    """nn.MultiheadAttention's forward (batched inputs, no bias_kv / zero_attn / dropout), batch-first
    inside, with the projections exposed: returns ((attn_output, attn_weights or None), parts), parts
    holding the batch-first inputs ``x`` (list: one when query is key is value, else three), the
    in-projection outputs ``z_in`` (same length), the out-projection input ``a`` and output ``z_o``."""
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    bf = m.batch_first
    same = query is key and key is value
    tb = (lambda t: t) if bf else (lambda t: t.transpose(0, 1))  # noqa: E731
    q_in = tb(query)
    k_in, v_in = (q_in, q_in) if same else (tb(key), tb(value))
    n, length, e = q_in.shape
    s = k_in.shape[1]
    h, hd = m.num_heads, m.head_dim
    if m._qkv_same_embed_dim:
        w, b = m.in_proj_weight, m.in_proj_bias
        if same:
            z_in = [F.linear(q_in, w, b)]
            q, k, v = z_in[0].chunk(3, dim=-1)
        else:
            ws, bs = w.chunk(3), (b.chunk(3) if b is not None else (None,) * 3)
            z_in = [F.linear(t, wi, bi) for t, wi, bi in zip((q_in, k_in, v_in), ws, bs)]
            q, k, v = z_in
    else:
        bs = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None,) * 3
        ws = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
        z_in = [F.linear(t, wi, bi) for t, wi, bi in zip((q_in, k_in, v_in), ws, bs)]
        q, k, v = z_in
    q = q.reshape(n, length, h, hd).transpose(1, 2)  # (N, H, L, hd)
    k = k.reshape(n, s, h, hd).transpose(1, 2)
    v = v.reshape(n, s, h, hd).transpose(1, 2)
    mask = _float_mask(attn_mask, q.dtype)
    if mask is not None:
        if mask.dim() == 2:
            if mask.shape != (length, s):
                raise RuntimeError(f"The shape of the 2D attn_mask is {mask.shape}, but should be {(length, s)}.")
            mask = mask[None, None]
        elif mask.dim() == 3:
            if mask.shape != (n * h, length, s):
                raise RuntimeError(f"The shape of the 3D attn_mask is {mask.shape}, but should be "
                                   f"{(n * h, length, s)}.")
            mask = mask.reshape(n, h, length, s)
        else:
            raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported")
    kpm = _float_mask(key_padding_mask, q.dtype)
    if kpm is not None:
        if kpm.shape != (n, s):
            raise RuntimeError(f"expected key_padding_mask of shape {(n, s)}, got {tuple(kpm.shape)}")
        kpm = kpm[:, None, None, :]
        mask = kpm if mask is None else mask + kpm
    weights = None
    if need_weights:
        scores = torch.matmul(q * math.sqrt(1.0 / float(hd)), k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        attn = torch.softmax(scores, dim=-1)
        o = torch.matmul(attn, v)
        weights = attn.mean(dim=1) if average_attn_weights else attn
    else:
        o = F.scaled_dot_product_attention(q, k, v, mask)
    a = o.transpose(1, 2).reshape(n, length, e)
    z_o = F.linear(a, m.out_proj.weight, m.out_proj.bias)  # (N, L, E)
    out = z_o if bf else z_o.transpose(0, 1)
    parts = {"x": [q_in] if same else [q_in, k_in, v_in], "z_in": z_in, "a": a, "z_o": z_o}
    return (out, weights), parts


@dataclass
class Attn:
    """One nn.MultiheadAttention on the attention rule: its forward is replaced by :func:`attention_forward`
    (``install`` / ``remove``) during the batched forward, which records what the blocks need."""

    name: str
    module: nn.MultiheadAttention
    roles: dict[str, str]  # attribute (``out_proj.weight`` dotted) -> qualified name of the trainable parameter
    calls: int = 0
    reason: str = ""
    x: list = field(default_factory=list)  # batch-first inputs, detached (1: self-attention, else 3)
    x_refs: list = field(default_factory=list)
    x_versions: list = field(default_factory=list)
    z_in: list = field(default_factory=list)  # in-projection outputs, in the graph
    a: Tensor | None = None  # out_proj input, detached
    z_o: Tensor | None = None  # out_proj output (batch-first), in the graph
    args: Any = None  # the call as made, for the replay when the rule cannot be used
    kwargs: Any = None
    out: Tensor | None = None
    extra: list | None = None

    def reset(self) -> None:
        self.calls, self.reason, self.a, self.z_o, self.args, self.kwargs, self.out = 0, "", None, None, None, None, None
        self.x, self.x_refs, self.x_versions, self.z_in, self.extra = [], [], [], [], None

    def install(self) -> None:
        self.module.forward = self.forward

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        m = self.module
        kw = {"key_padding_mask": key_padding_mask, "need_weights": need_weights, "attn_mask": attn_mask,
              "average_attn_weights": average_attn_weights, "is_causal": is_causal}
        self.calls += 1
        if self.calls > 1:
            return nn.MultiheadAttention.forward(m, query, key, value, **kw)
        parts = None
        if not all(isinstance(t, Tensor) and t.dim() == 3 for t in (query, key, value)):
            self.reason = "unbatched (2-D) inputs"
        else:
            try:
                (out, weights), parts = attention_forward(m, query, key, value, **kw)
            except Exception as e:  # e.g. an input torch accepts and the rule does not: torch's own forward
                self.reason = f"the rule's forward failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
        if parts is None:  # the module's own forward; recorded for the replay
            out, weights = nn.MultiheadAttention.forward(m, query, key, value, **kw)
        detach = lambda t: t.detach() if isinstance(t, Tensor) else t  # noqa: E731
        self.args, self.kwargs = tree_map(detach, (query, key, value)), tree_map(detach, kw)
        self.out = out
        self.extra = [weights] if isinstance(weights, Tensor) and weights.requires_grad else []
        if not (isinstance(out, Tensor) and out.requires_grad):
            self.out = None
            return out, weights
        if parts is not None:
            self.x_refs = [query, key, value]
            self.x_versions = [t._version for t in self.x_refs]
            self.x = [t.detach() for t in parts["x"]]
            self.z_in, self.a, self.z_o = parts["z_in"], parts["a"].detach(), parts["z_o"]
        return out.clone(), weights  # a copy: downstream in-place ops must not move z_o (or the replay's output)

    @property
    def _has_in(self) -> bool:
        return any(not a.startswith("out_proj") for a in self.roles)

    @property
    def _has_out(self) -> bool:
        return any(a.startswith("out_proj") for a in self.roles)

    @property
    def targets(self) -> list[Tensor]:
        """The graph tensors whose output gradients the blocks need: z_in... (when an in-projection
        parameter is trainable; with frozen ones and an input that needs no grad they are constants),
        z_o (when out_proj's are)."""
        return [*(self.z_in if self._has_in else []), *([self.z_o] if self._has_out else [])]

    def problem(self, uses: dict[int, int], leaves: dict[str, Tensor], n: int) -> str:
        """Why the rule does not apply exactly ('' when it does)."""
        if self.calls != 1:
            return f"called {self.calls} times in one forward"
        if self.reason:
            return self.reason
        if self.z_o is None or not self.z_o.requires_grad:
            return "its output does not require grad"
        if any(t._version != v for t, v in zip(self.x_refs, self.x_versions)):
            return "an input modified in place after the call"
        if any(t.shape[0] != n for t in self.x):
            return "its batch dim (after batch_first) is not the batch"
        from iefcli.core.fast import blocks

        e = self.module.embed_dim
        if len(self.x) == 3 and "in_proj_weight" in self.roles and n * 3 * e * e > blocks.MATERIALISE_MAX_ELEMENTS:
            return "packed in_proj_weight on three different inputs is materialised, and it is too large for that"
        for p in self.roles.values():
            k = uses.get(id(leaves[p]), 0)
            if k != 1:
                return f"parameter {p} used by {k} operations (shared or used outside the module)"
        return ""

    def to_call(self) -> Call:
        """This capture as a :class:`Call` for the per-module replay (the rule did not apply)."""
        call = Call(self.name, self.module, dict(self.roles), calls=self.calls, args=self.args, kwargs=self.kwargs,
                    out=self.out, pick=0, extra=self.extra)
        if self.calls != 1:
            call.reason = ""  # the replay says "called N times"
        elif self.out is None:
            call.reason = self.reason or "its output is not a single differentiable tensor"
        elif self.extra:
            call.reason = "its output is a tuple whose other tensors are differentiable (attention weights?)"
        self.x_refs = []
        return call

    def blocks(self, grads: list[list[Tensor]], k: int, cdt: torch.dtype) -> list:
        """The blocks of this module's parameters from the output gradients of :attr:`targets`
        (one list of K tensors per target)."""
        from iefcli.core.fast.blocks import _DenseBlock, _MatmulBlock

        m, r = self.module, self.roles
        cat = lambda gs: gs[0] if len(gs) == 1 else torch.cat(gs)  # noqa: E731  (K sets, k-major)
        n_in = len(self.z_in) if self._has_in else 0
        e_in = [cat(g) for g in grads[:n_in]]  # (M, T, E) each, or one (M, T, 3E)
        e_o = cat(grads[n_in]) if self._has_out else None
        out = []
        e = m.embed_dim
        if not self._has_in:
            pass
        elif m._qkv_same_embed_dim:
            wn, bn = r.get("in_proj_weight"), r.get("in_proj_bias")
            roles = {role: p for role, p in (("weight", wn), ("bias", bn)) if p is not None}
            if len(e_in) == 1 and roles:
                out.append(_MatmulBlock("attention", roles, self.x[0], e_in[0], k, (3 * e, e), cdt))
            elif roles:  # three inputs into row slices of one packed parameter: materialised
                mats = {}
                if wn is not None:
                    mats["weight"] = torch.cat([
                        torch.bmm(ei.to(cdt).transpose(1, 2), _rows(xi, k).to(cdt)).reshape(ei.shape[0], -1)
                        for xi, ei in zip(self.x, e_in)], dim=1)
                if bn is not None:
                    mats["bias"] = torch.cat([ei.to(cdt).sum(dim=1) for ei in e_in], dim=1)
                out.append(_DenseBlock("attention", roles, mats, {}))
        else:
            for i, attr in enumerate(("q_proj_weight", "k_proj_weight", "v_proj_weight")):
                if attr in r:
                    w = getattr(m, attr)
                    out.append(_MatmulBlock("attention", {"weight": r[attr]}, self.x[i], e_in[i], k, tuple(w.shape),
                                            cdt))
            if "in_proj_bias" in r:
                mats = {"bias": torch.cat([ei.to(cdt).sum(dim=1) for ei in e_in], dim=1)}
                out.append(_DenseBlock("attention", {"bias": r["in_proj_bias"]}, mats, {}))
        roles = {role: r[f"out_proj.{role}"] for role in ("weight", "bias") if f"out_proj.{role}" in r}
        if roles:
            out.append(_MatmulBlock("attention", roles, self.a, e_o, k, (e, e), cdt))
        return out


def _rows(x: Tensor, k: int) -> Tensor:
    return x.repeat(k, 1, 1) if k > 1 else x


def plan_attention(model: nn.Module, params, layers: list, reasons: dict[str, str]) -> tuple[list, list[Attn]]:
    """The nn.MultiheadAttention modules holding trainable ``params`` that the attention rule covers:
    their parameters leave ``reasons`` (the fallback) and their out_proj leaves ``layers`` (it is never
    called as a module). Modules inside a module that is replayed anyway (it has parameters without a
    rule) are left to it."""
    modules = dict(model.named_modules(remove_duplicate=False))
    fallback_modules = {p.rpartition(".")[0] for p in reasons}
    attns: list[Attn] = []
    for name, mod in modules.items():
        if not isinstance(mod, nn.MultiheadAttention):
            continue
        prefix = f"{name}." if name else ""
        why = attention_rule(mod)
        if why:
            for a in _ATTRS:  # say why instead of "no fast rule"
                if reasons.get(prefix + a, "").endswith("no fast rule for MultiheadAttention"):
                    reasons[prefix + a] = f"{name}: {why}"
            continue
        roles = {a: prefix + a for a in _ATTRS if prefix + a in params}
        if not roles:
            continue
        if any(f and f != name and name.startswith(f + ".") for f in fallback_modules):
            continue  # an ancestor without a rule replays everything below it
        if any(p in reasons and "no fast rule for MultiheadAttention" not in reasons[p] for p in roles.values()):
            continue  # e.g. a tied out_proj weight
        attns.append(Attn(name, mod, roles))
    taken = {p for a in attns for p in a.roles.values()}
    for p in taken:
        reasons.pop(p, None)
    keep = []
    for layer in layers:
        left = {r: p for r, p in layer.roles.items() if p not in taken}
        if len(left) == len(layer.roles):
            keep.append(layer)
        elif left:
            layer.roles = left
            keep.append(layer)
    return keep, attns

"""The fast path: Gram matrices J J^T and combinations J^T x without per-sample gradients.

:class:`FastJacobian` is an :class:`iefcli.core.jacobian.OutputJacobian`
registered as ``"fast"`` (``make_jacobian(jacobian="auto")`` picks it). It runs
ONE batched forward with the trainable parameters substituted
(``forward(model, params, inputs)``, e.g. ``functional_call``), with forward
hooks on the supported layers that record each layer's input X and keep its
output Z. ``rows(U)`` runs one backward pass per cotangent set U_k (K, N, ...)
from the logits to every hooked output (retaining the graph), which gives the
output gradients E = dL_k/dZ with the batch structure intact. For a layer
whose output is Z_n = X_n W^T (+ b), the per-sample gradient of row
m = (k, n) is E_m^T X_n, so the layer's block of the Gram matrix and of
R^T x need only X and E:

==================  =========================================================
layer               per-sample gradient of row m (T = positions per sample)
==================  =========================================================
Linear (N, d_in)    W: E_m^T X_n  ->  Gram block (X X^T) * (E E^T)  (Hadamard)
Linear (N, T, d)    W: sum_t E_mt^T X_nt -> per layer the cheaper of
                    "ghost" sum_{t,t'} (X_i X_j^T)_{tt'} (E_i E_j^T)_{tt'},
                    O(M^2 T^2 (d_in + d_out)), and "materialise"
                    (the M x d_out x d_in per-sample blocks of THIS layer),
                    O(M T d_in d_out + M^2 d_in d_out)
bias (any)          sum_t E_mt  ->  Gram block (sum_t E)(sum_t E)^T
Conv2d (groups=1)   a sequence Linear on unfolded patches (T = H_out W_out)
LayerNorm           w: sum_t E_mt * xhat_nt, b: sum_t E_mt (M x D, materialised)
Embedding           W: scatter of E_mt into rows ids_nt; Gram over shared
                    tokens only (pairs of occurrences of the same id)
==================  =========================================================

``combine(x)`` = sum_m x_m row_m is E^T diag(x) X per layer (one matmul, no
per-sample gradients); ``dot(v)`` = R v is <E_m, X_n V^T> per layer.

Requirement (as for any per-sample gradient): samples are independent and
batch-first inside the model, i.e. dim 0 of every hooked layer's input and
output indexes the N samples and z_n depends on slice n only. A layer whose
input's leading dim is not N (peft's shared prompt embedding, seq-first
layers such as ``nn.TransformerEncoderLayer(batch_first=False)``) falls back
automatically; batch norm in train mode is refused. A seq-first layer whose
sequence length happens to EQUAL N cannot be told apart from shapes: use
``jacobian="vmap"`` for models that run layers seq-first.

Fallback: every trainable parameter without such a rule takes the plain
chunked vmap path (:class:`iefcli.core.jacobian.VmapJacobian` restricted to
those parameters, the others held fixed), so every model works and the same
rows come out. A layer falls back when its type has no rule, its forward is
not the stock one (a subclass overriding ``forward``), it is called more or
fewer than once, its input is modified in place after the call, a parameter
is shared (tied) or used by any other operation in the graph (counted on the
autograd graph: each of the layer's parameters must have exactly one consumer),
or the rule does not support its options (e.g. Embedding ``max_norm``,
grouped or non-zero-padded convolutions). ``FastJacobian.param_paths`` tells
which path each parameter took; ``fallback_reasons`` says why.

Precision (documented choice): everything that reaches the solves or the
direction is accumulated in float64 from the captured X and E (kept in
float32, or float64 for float64 parameters; bf16/fp16 upcast): each Gram
block and their sum, ``dot`` (returned in float64) and ``combine`` (formed in
float64 over blocks of output units, each rounded once into the parameters'
dtype, so the float64 temporaries stay small). This is the plain path's
precision (float32 rows, float64 Gram and R^T x); float32 accumulation was
measurably worse for SF at tiny damping, whose Woodbury form
(g - Jhat^T x) / lam cancels. On the benchmark MLP the float64 combine costs
a few per cent of the step. Inputs a layer sees before an autocast cast
(float32 X, bf16 E) are used as seen.

Randomness: the batched forward is an ordinary forward. With
``randomness="error"`` (the default, as for vmap) a model in train mode with
active dropout modules is refused (put it in eval mode); with "different"
the batched forward's dropout masks are per sample by construction. Batch
norm in train mode is always refused: batch statistics couple the samples.

Memory: X and E per hooked layer (the size of the activations), the N x N
Gram, and per-sample blocks only for the layers where the materialise
strategy is cheaper AND below ``MATERIALISE_MAX_ELEMENTS``; never N x P.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp as func_jvp

from iefcli.core.jacobian import (
    DenseRows,
    Forward,
    Inputs,
    Randomness,
    VmapJacobian,
    batch_size_of,
    default_forward,
    register_jacobian,
)
from iefcli.core.params import ParamLayout, Params
from iefcli.errors import ModelError

__all__ = ["FastJacobian", "FastRows", "MATERIALISE_MAX_ELEMENTS", "GHOST_CHUNK_ELEMENTS"]

ACC = torch.float64  # accumulation dtype of Gram blocks, combine and dot (see module doc)

# Upper bound on the per-sample blocks one layer may materialise (M * d_out * d_in numbers);
# above it the ghost (pairwise) form is used even when it costs more flops.
MATERIALISE_MAX_ELEMENTS = 1 << 25
# Temporaries of the ghost form (rows_chunk x M x T x T) are kept below this many numbers.
GHOST_CHUNK_ELEMENTS = 1 << 23
# combine: float64 products of a layer's weight block are formed this many numbers at a time
# (CPU: small, for peak memory; other devices: large, since each block is a kernel launch).
COMBINE_CHUNK_ELEMENTS = 1 << 16
COMBINE_CHUNK_ELEMENTS_ACCEL = 1 << 22


# ---------------------------------------------------------------- layer rules


def _stock_forward(module: nn.Module, cls: type) -> bool:
    return isinstance(module, cls) and type(module).forward is cls.forward


def _conv_padding(m: nn.Conv2d) -> tuple[int, int] | None:
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


def _rule_for(module: nn.Module) -> tuple[str | None, str]:
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
        if _conv_padding(module) is None:
            return None, "Conv2d with asymmetric 'same' padding"
        return "conv2d", ""
    return None, f"no fast rule for {type(module).__name__}"


@dataclass
class _Layer:
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


def _leaf_uses(root: Tensor, leaves: dict[str, Tensor]) -> dict[int, int]:
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


def _active_dropout(model: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return name or type(m).__name__
    return None


# ---------------------------------------------------------------- per-layer blocks of the rows


def _seq(t: Tensor, n: int, d: int) -> Tensor:
    """(N, ..., d) -> (N, T, d) with T = product of the middle dims (1 for (N, d))."""
    return t.reshape(n, -1, d)


class _Block:
    """One layer's share of the rows: its parameters' columns of R (M x P_layer)."""

    kind: str
    strategy: str
    roles: dict[str, str]

    def gram(self) -> Tensor: ...
    def combine_into(self, x: Tensor, out: dict[str, Tensor]) -> None:
        """Write this block's columns of R^T x into ``out`` (views of the flat (P,) result)."""
        ...

    def dot(self, v: dict[str, Tensor]) -> Tensor: ...


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype X and E are kept in (and per-sample blocks formed in) for parameters of ``dtype``:
    float64 stays float64, anything else (float32, bf16, fp16) is float32 (see the module doc)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gram_weight_ghost(x: Tensor, e: Tensor) -> Tensor:
    """sum_{t,t'} (X_i X_j^T)_{tt'} (E_i E_j^T)_{tt'} for X (M,T,a), E (M,T,b), chunked over i. (M, M)."""
    m, t = x.shape[:2]
    out = torch.empty(m, m, dtype=ACC, device=x.device)
    step = max(1, GHOST_CHUNK_ELEMENTS // max(1, m * t * t))
    for i0 in range(0, m, step):
        xx = torch.einsum("itd,jsd->ijts", x[i0 : i0 + step], x)
        ee = torch.einsum("itd,jsd->ijts", e[i0 : i0 + step], e)
        out[i0 : i0 + step] = (xx * ee).sum(dim=(2, 3))
    return out


def _gram_chunked(g: Tensor) -> Tensor:
    """g g^T in float64 for g (M, D), upcasting D-column chunks so the float64 copy stays small."""
    m, d = g.shape
    step = max(1, GHOST_CHUNK_ELEMENTS // max(1, m))
    out = torch.zeros(m, m, dtype=ACC, device=g.device)
    for c0 in range(0, d, step):
        gc = g[:, c0 : c0 + step].to(ACC)
        out += gc @ gc.T
    return out


def _cat(grads: list[Tensor]) -> Tensor:
    return grads[0] if len(grads) == 1 else torch.cat(grads)


class _MatmulBlock(_Block):
    """Linear and Conv2d: Z_nt = W X_nt (+ b) with X (N, T, d_in), E (M, T, d_out), M = K N."""

    def __init__(self, kind: str, roles: dict[str, str], x: Tensor, e: Tensor, k: int, weight_shape, cdt):
        self.kind, self.roles, self.k, self.cdt = kind, roles, k, cdt
        self.x = x.to(cdt)  # (N, T, d_in)
        self.e = e.to(cdt)  # (M, T, d_out)
        self.weight_shape = weight_shape
        n, t, d_in = self.x.shape
        m, _, d_out = self.e.shape
        self.strategy = "outer"
        if "weight" in roles and t > 1:
            ghost = m * m * t * t * (d_in + d_out)
            mat = m * t * d_in * d_out + m * m * d_in * d_out
            fits = m * d_in * d_out <= MATERIALISE_MAX_ELEMENTS
            self.strategy = "materialise" if (mat <= ghost and fits) else "ghost"

    def _x_rows(self) -> Tensor:
        """X per row m = (k, n): (M, T, d_in)."""
        return self.x.repeat(self.k, 1, 1) if self.k > 1 else self.x

    def gram(self) -> Tensor:
        m = self.e.shape[0]
        out = torch.zeros(m, m, dtype=ACC, device=self.e.device)
        if "weight" in self.roles:
            if self.x.shape[1] == 1:
                x, e = self.x[:, 0].to(ACC), self.e[:, 0].to(ACC)
                xx = x @ x.T  # (N, N)
                if self.k > 1:
                    xx = xx.repeat(self.k, self.k)
                out += xx * (e @ e.T)  # Hadamard product of the two Grams
            elif self.strategy == "materialise":
                # this layer's per-sample gradients, (M, d_out*d_in), as the plain path would form them
                g = torch.bmm(self.e.transpose(1, 2), self._x_rows()).reshape(m, -1)
                out += _gram_chunked(g)
            else:
                out += _gram_weight_ghost(self._x_rows().to(ACC), self.e.to(ACC))
        if "bias" in self.roles:
            eb = self.e.sum(dim=1).to(ACC)  # (M, d_out)
            out += eb @ eb.T
        return out

    def combine_into(self, x: Tensor, out: dict[str, Tensor]) -> None:
        # sum_m x_m E_m^T X_n(m) = (E with the rows' weights folded in)^T X, accumulated in float64
        # over blocks of output units, each rounded once into the result: the float64 temporaries
        # stay at X's size plus COMBINE_CHUNK_ELEMENTS.
        n, _, d_in = self.x.shape
        d_out = self.e.shape[-1]
        x64 = x.to(ACC)[:, None, None]
        xin = self.x.reshape(-1, d_in).to(ACC)
        chunk = COMBINE_CHUNK_ELEMENTS if self.x.device.type == "cpu" else COMBINE_CHUNK_ELEMENTS_ACCEL
        step = max(1, chunk // max(1, d_in, n * self.x.shape[1]))
        w = out[self.roles["weight"]].view(d_out, d_in) if "weight" in self.roles else None
        b = out[self.roles["bias"]] if "bias" in self.roles else None
        for r0 in range(0, d_out, step):
            ex = self.e[..., r0 : r0 + step].to(ACC) * x64  # (M, T, chunk)
            if self.k > 1:
                ex = ex.reshape(self.k, n, *ex.shape[1:]).sum(dim=0)
            if w is not None:
                w[r0 : r0 + step].copy_(ex.reshape(-1, ex.shape[-1]).T @ xin)
            if b is not None:
                b[r0 : r0 + step].copy_(ex.sum(dim=(0, 1)))

    def dot(self, v: dict[str, Tensor]) -> Tensor:
        m, _, d_out = self.e.shape
        n = self.x.shape[0]
        out = torch.zeros(m, dtype=ACC, device=self.e.device)
        e = self.e.to(ACC).reshape(self.k, n, *self.e.shape[1:])
        if "weight" in self.roles:
            w = v[self.roles["weight"]].to(ACC).reshape(d_out, -1)
            xv = self.x.to(ACC) @ w.T  # (N, T, d_out): apply the weight direction to the inputs
            out += (e * xv).sum(dim=(2, 3)).reshape(m)
        if "bias" in self.roles:
            out += (e.sum(dim=2) @ v[self.roles["bias"]].to(ACC)).reshape(m)
        return out


class _DenseBlock(_Block):
    """Layers whose per-sample gradients are small (LayerNorm: M x D): held as matrices."""

    def __init__(self, kind: str, roles: dict[str, str], mats: dict[str, Tensor], shapes: dict[str, torch.Size]):
        self.kind, self.roles, self.strategy = kind, roles, "materialise"
        self.mats = {self.roles[r]: g for r, g in mats.items() if r in roles}  # name -> (M, numel)
        self.shapes = shapes

    def gram(self) -> Tensor:
        return sum(g.to(ACC) @ g.to(ACC).T for g in self.mats.values())

    def combine_into(self, x: Tensor, out: dict[str, Tensor]) -> None:
        for name, g in self.mats.items():
            out[name].copy_((x.to(ACC) @ g.to(ACC)).view(out[name].shape))

    def dot(self, v: dict[str, Tensor]) -> Tensor:
        return sum(g.to(ACC) @ v[name].to(ACC).reshape(-1) for name, g in self.mats.items())


class _EmbeddingBlock(_Block):
    """Embedding: row m's gradient scatters E_mt (d,) into weight row ids_nt.

    Gram[i, j] = sum over pairs of occurrences with the same id of <f_i,v, f_j,v>,
    where f_m,v = sum_{t: ids_nt = v} E_mt; only ids two rows share cost anything.
    """

    def __init__(self, roles: dict[str, str], ids: Tensor, e: Tensor, k: int, weight_shape, padding_idx, cdt):
        self.kind, self.roles, self.k, self.strategy, self.cdt = "embedding", roles, k, "sparse", cdt
        n = ids.shape[0]
        self.ids = ids.reshape(n, -1)  # (N, T)
        self.e = e.to(cdt)  # (M, T, d)
        if padding_idx is not None:  # F.embedding sends no gradient to the padding row
            self.e = self.e * (self.ids != padding_idx).repeat(k, 1).unsqueeze(-1).to(cdt)
        self.weight_shape = weight_shape

    def gram(self) -> Tensor:
        m, t, d = self.e.shape
        dev = self.e.device
        vocab = self.weight_shape[0]
        ids = self.ids.repeat(self.k, 1)  # (M, T)
        row = torch.arange(m, device=dev).unsqueeze(1).expand(m, t)
        # Sum each row's occurrences of the same id: compact f (L, d) with its row and id.
        key = (row * vocab + ids).reshape(-1)
        uniq, inv = torch.unique(key, return_inverse=True)
        f = torch.zeros(uniq.shape[0], d, dtype=ACC, device=dev).index_add_(0, inv, self.e.reshape(-1, d).to(ACC))
        f_row, f_id = uniq // vocab, uniq % vocab
        # Group the compact entries by id; all ordered pairs within a group contribute.
        order = torch.argsort(f_id, stable=True)
        f, f_row, f_id = f[order], f_row[order], f_id[order]
        _, counts = torch.unique_consecutive(f_id, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        per_entry = torch.repeat_interleave(counts, counts)  # group size of each entry
        entry_start = torch.repeat_interleave(starts, counts)
        left = torch.repeat_interleave(torch.arange(f.shape[0], device=dev), per_entry)
        block = torch.cumsum(per_entry, 0) - per_entry
        right = torch.repeat_interleave(entry_start, per_entry) + (
            torch.arange(left.shape[0], device=dev) - torch.repeat_interleave(block, per_entry)
        )
        out = torch.zeros(m * m, dtype=ACC, device=dev)
        step = max(1, GHOST_CHUNK_ELEMENTS // max(1, d))
        for p0 in range(0, left.shape[0], step):
            li, ri = left[p0 : p0 + step], right[p0 : p0 + step]
            dots = (f[li] * f[ri]).sum(dim=1)
            out.index_add_(0, f_row[li] * m + f_row[ri], dots)
        return out.reshape(m, m)

    def combine_into(self, x: Tensor, out: dict[str, Tensor]) -> None:
        n = self.ids.shape[0]
        ew = (self.e.to(ACC) * x.to(ACC)[:, None, None]).reshape(self.k, n, *self.e.shape[1:]).sum(dim=0)
        w = torch.zeros(self.weight_shape, dtype=ACC, device=self.e.device)
        w.index_add_(0, self.ids.reshape(-1), ew.reshape(-1, ew.shape[-1]))
        out[self.roles["weight"]].copy_(w)

    def dot(self, v: dict[str, Tensor]) -> Tensor:
        m = self.e.shape[0]
        gathered = v[self.roles["weight"]].to(ACC)[self.ids]  # (N, T, d)
        e = self.e.to(ACC).reshape(self.k, -1, *self.e.shape[1:])
        return (e * gathered).sum(dim=(2, 3)).reshape(m)


def _layernorm_features(layer: _Layer, cdt: torch.dtype) -> tuple[Tensor, int]:
    """xhat (N, T, D) and D, recomputed from the captured input in ``cdt``."""
    m: nn.LayerNorm = layer.module
    nd = len(m.normalized_shape)
    dims = tuple(range(-nd, 0))
    x = layer.x.to(cdt)
    mu = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    xhat = (x - mu) / torch.sqrt(var + m.eps)
    d = int(torch.Size(m.normalized_shape).numel())
    return _seq(xhat, x.shape[0], d), d


def _make_block(layer: _Layer, grads: list[Tensor], shapes: dict[str, torch.Size], cdt: torch.dtype) -> _Block:
    """The block of ``layer`` from its output gradients, one per cotangent set (K of them)."""
    k = len(grads)
    m = layer.module
    n = layer.x.shape[0]
    if layer.kind == "linear":
        d_in, d_out = m.in_features, m.out_features
        x = _seq(layer.x, n, d_in)
        e = _cat([_seq(g, n, d_out) for g in grads])
        return _MatmulBlock("linear", layer.roles, x, e, k, (d_out, d_in), cdt)
    if layer.kind == "conv2d":
        x = layer.x if layer.x.dim() == 4 else layer.x.unsqueeze(0)
        patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=_conv_padding(m), stride=m.stride)
        x = patches.transpose(1, 2)  # (N, L, C_in kh kw), in the order of weight.view(C_out, -1)
        e = _cat([g.reshape(n, m.out_channels, -1).transpose(1, 2) for g in grads])
        return _MatmulBlock("conv2d", layer.roles, x, e, k, tuple(m.weight.shape), cdt)
    if layer.kind == "layernorm":
        xhat, d = _layernorm_features(layer, cdt)
        e = _cat([_seq(g, n, d) for g in grads]).to(cdt)  # (M, T, D)
        xr = xhat.repeat(k, 1, 1) if k > 1 else xhat
        mats = {"weight": (e * xr).sum(dim=1), "bias": e.sum(dim=1)}
        return _DenseBlock("layernorm", layer.roles, mats, shapes)
    if layer.kind == "embedding":
        d = m.embedding_dim
        e = _cat([_seq(g, n, d) for g in grads])
        return _EmbeddingBlock(layer.roles, layer.x, e, k, tuple(m.weight.shape), m.padding_idx, cdt)
    raise AssertionError(layer.kind)


# ---------------------------------------------------------------- rows and the Jacobian


class FastRows:
    """M = K N gradient rows seen through gram / combine / dot, never materialised.

    ``blocks`` cover the fast layers' parameters; ``fallback`` (DenseRows over
    the remaining parameters, from the vmap path) the rest. The Gram matrix is
    the sum of the blocks' Grams (parameters are disjoint), float64.
    """

    def __init__(self, blocks: list[_Block], fallback: DenseRows | None, fallback_layout: ParamLayout | None,
                 layout: ParamLayout, n_rows: int, dtype: torch.dtype, device: torch.device):
        self.blocks = blocks
        self.fallback = fallback
        self.fallback_layout = fallback_layout
        self.layout = layout
        self.n_rows = n_rows
        self.dtype = dtype
        self.device = device
        self._gram: Tensor | None = None

    @property
    def strategies(self) -> dict[str, str]:
        """Parameter name -> how its Gram block is formed (outer, ghost, materialise, sparse, vmap)."""
        out = {}
        for b in self.blocks:
            for name in b.roles.values():
                out[name] = f"{b.kind}:{b.strategy}"
        if self.fallback_layout is not None:
            out.update({name: "vmap" for name in self.fallback_layout.names})
        return out

    def gram(self) -> Tensor:
        """R R^T, (M, M), float64."""
        if self._gram is None:
            g = torch.zeros(self.n_rows, self.n_rows, dtype=ACC, device=self.device)
            for b in self.blocks:
                g += b.gram()
            if self.fallback is not None:
                g += self.fallback.gram()
            self._gram = g
        return self._gram

    def combine(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """R^T x for x (M,): (P,) in ``dtype`` (default: the parameters'), accumulated in float64."""
        flat = torch.empty(self.layout.size, dtype=dtype or self.dtype, device=self.device)
        views = self.layout.unflatten(flat)  # each block writes its parameters' slices in place
        for b in self.blocks:
            b.combine_into(x, views)
        if self.fallback is not None:
            for name, part in self.fallback_layout.unflatten(self.fallback.combine(x, dtype=flat.dtype)).items():
                views[name].copy_(part)
        return flat

    def dot(self, v: Tensor) -> Tensor:
        """R v for v (P,): (M,) float64."""
        vd = self.layout.unflatten(v)
        out = torch.zeros(self.n_rows, dtype=ACC, device=self.device)
        for b in self.blocks:
            out += b.dot(vd)
        if self.fallback is not None:
            out += self.fallback.dot(self.fallback_layout.flatten(vd))
        return out

    @property
    def matrix(self) -> Tensor:
        """R (M, P) materialised, one combine per row: for tiny models and tests only."""
        eye = torch.eye(self.n_rows, dtype=ACC, device=self.device)
        return torch.stack([self.combine(eye[m]) for m in range(self.n_rows)])


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
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                # Batch statistics couple the samples: a per-sample gradient is not defined
                # (vmap refuses too); eval mode uses the running statistics.
                raise ModelError(f"batch norm {name or type(m).__name__} is in train mode; put the model in eval mode")
        if randomness == "error":
            where = _active_dropout(model)
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

        layers = self._candidates(model, params)
        self._leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        handles = [layer.module.register_forward_hook(layer.hook, with_kwargs=True) for layer in layers]
        try:
            with torch.enable_grad():
                out = forward(model, self._leaves, inputs)
        finally:
            for h in handles:
                h.remove()
        self._out = out
        self.logits = out.detach()

        uses = _leaf_uses(out, self._leaves) if out.requires_grad else {}
        n_batch = batch_size_of(inputs)
        self._layers: list[_Layer] = []
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

    def _candidates(self, model: nn.Module, params: Params) -> list[_Layer]:
        """Modules holding trainable params with a rule; other params get a fallback reason."""
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
            kind, reason = (None, f"no module {mod_name!r}") if module is None else _rule_for(module)
            if kind is not None and set(roles) - {"weight", "bias"}:
                kind, reason = None, f"unexpected parameters {sorted(set(roles) - {'weight', 'bias'})}"
            if kind is not None:
                for attr, pname in list(roles.items()):
                    if aliases.get(id(getattr(module, attr, None)), 0) > 1:  # tied weights
                        self.fallback_reasons[pname] = f"{mod_name}: parameter shared with another module"
                        del roles[attr]
                if not roles:
                    continue
            if kind is None:
                for pname in roles.values():
                    self.fallback_reasons[pname] = f"{mod_name or type(model).__name__}: {reason}"
                continue
            layers.append(_Layer(mod_name, module, kind, roles))
        return layers

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
        _, out = func_jvp(lambda p: self.forward(self.model, p, self.inputs), (self.params,), (tangents,))
        return out

    def _fallback_jacobian(self) -> VmapJacobian:
        if self._fallback is None:
            fixed = {k: v for k, v in self.params.items() if k not in set(self._fallback_names)}
            forward, sub = self.forward, {k: self.params[k] for k in self._fallback_names}

            def forward_sub(model: nn.Module, p: Params, inputs: Inputs) -> Tensor:
                return forward(model, {**fixed, **p}, inputs)

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
        blocks = [_make_block(layer, gs, shapes, cdt) for layer, gs in zip(self._layers, grads)]
        fallback = fb_layout = None
        if self._fallback_names:
            fj = self._fallback_jacobian()
            fallback, fb_layout = fj.rows(cotangents), fj.layout
        n = self.logits.shape[0]
        return FastRows(blocks, fallback, fb_layout, self.layout, k * n, self._dtype, self.logits.device)


register_jacobian("fast", FastJacobian)

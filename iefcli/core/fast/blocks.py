"""Per-layer blocks of the gradient rows: each layer's columns of R (M x P_layer), never materialised.

A block is built from what the capture layer (:mod:`iefcli.core.fast.rules`)
recorded: the layer's input X (N, T, d_in) and its output gradients E
(M, T, d_out), M = K N rows (K cotangent sets, k-major). Every block answers
``gram()`` (its share of R R^T, float64), ``combine_into(x, views)`` (its
columns of R^T x) and ``dot(v)`` (its share of R v), and ``matrix()`` (its
columns of R, (M, P_block), float64: the dense twin, for tests and tiny models).
The formulas per layer are in the package docstring (:mod:`iefcli.core.fast`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from iefcli.core.fast.rules import Call, Layer, conv_padding

__all__ = ["Block", "make_block", "replay_block", "compute_dtype", "ACC", "MATERIALISE_MAX_ELEMENTS", "GHOST_CHUNK_ELEMENTS",
           "COMBINE_CHUNK_ELEMENTS", "COMBINE_CHUNK_ELEMENTS_ACCEL"]

ACC = torch.float64  # accumulation dtype of Gram blocks, combine and dot (see module doc)

# Upper bound on the per-sample blocks one layer may materialise (M * d_out * d_in numbers);
# above it the ghost (pairwise) form is used even when it costs more flops.
MATERIALISE_MAX_ELEMENTS = 1 << 25
# A materialised layer keeps its per-sample gradients from gram() for J^T x (in the compute dtype) when
# they hold at most this many numbers (J^T x is then (M) x (M, P_layer) instead of a weight-gradient matmul).
KEEP_PER_SAMPLE_ELEMENTS = 1 << 22
# Temporaries of the ghost form (rows_chunk x M x T x T) are kept below this many numbers.
GHOST_CHUNK_ELEMENTS = 1 << 23
# combine: float64 products of a layer's weight block are formed this many numbers at a time
# (CPU: small, for peak memory; other devices: large, since each block is a kernel launch).
COMBINE_CHUNK_ELEMENTS = 1 << 16
COMBINE_CHUNK_ELEMENTS_ACCEL = 1 << 22
# The embedding Gram by unique/argsort (CPU: cheapest) or with static shapes (accelerators: no host
# sync from data-dependent sizes); tests set this to check the static form on CPU.
EMBEDDING_GRAM_STATIC = False
# CPU: an embedding whose rows touch few distinct ids (at most 8 per position) has its Gram formed from
# the dense (M, |U|, d) gradients on the touched rows when that holds at most this many numbers, else by
# id groups (tests set 0 to check the grouped form).
EMBEDDING_DENSE_MAX_ELEMENTS = 1 << 23
# A tied parameter's per-sample gradients (M x numel, the sum of its holders' columns) are materialised
# once in the compute dtype when they hold at most this many numbers: Gram = one matmul, J^T x = x @ G
# (small tied weights: cheaper than the holders' own Grams plus their cross terms); above it, the
# holders' blocks and cross terms (nothing of size M x numel formed).
TIED_MATERIALISE_ELEMENTS = 1 << 20
# a a^T by blocks of its upper triangle (see _aat) from this size on (tests set 1 to check it on tiny layers)
SYMMETRIC_GRAM_MIN_ROWS = 192
SYMMETRIC_GRAM_MIN_COLS = 256
# CPU: conv per-sample weight gradients by patches + bmm (instead of one grouped weight-gradient convolution)
# when C_in * prod(kernel) is at most this (one thread: patches win for an RGB/grayscale first layer
# and for Conv1d up to 32 x 5, the grouped kernel from 8 x 3 x 3 on; tests set these to force either form).
IM2COL_MAX_FAN_IN_2D = 32
IM2COL_MAX_FAN_IN_1D = 256


def _aat(a: Tensor) -> Tensor:
    """a a^T for a (M, K). Large ones (M >= SYMMETRIC_GRAM_MIN_ROWS, K >= SYMMETRIC_GRAM_MIN_COLS) by
    four row blocks, each against the rows from its own on (the upper triangle's blocks, mirrored):
    5/8 of one matmul's products (CPU, one thread: ~20% less time at M = 256, K = 1024, ~27% at 512)."""
    m, k = a.shape
    if m < SYMMETRIC_GRAM_MIN_ROWS or k < SYMMETRIC_GRAM_MIN_COLS:
        return a @ a.T
    out = torch.empty(m, m, dtype=a.dtype, device=a.device)
    step = -(-m // 4)
    for i in range(0, m, step):
        blk = a[i : i + step] @ a[i:].T  # this block row, columns i..
        out[i : i + step, i:] = blk
        out[i + step :, i : i + step] = blk[:, step:].T
    return out


def _acc_sum(terms: list[Tensor]) -> Tensor:
    """The float64 sum of a block's fresh Gram terms, in order (each rounded once into float64; the
    same values as adding them into zeros, 0 + a being a)."""
    out = terms[0].to(ACC)
    for t in terms[1:]:
        out += t
    return out


def _mv_into(o: Tensor, g: Tensor, x: Tensor) -> None:
    """o <- g^T x (g (M, numel), x (M,)) written straight into ``o`` (a view of the flat result)."""
    if o.is_contiguous() and o.dtype == g.dtype:
        torch.mv(g.t(), x, out=o.view(-1))
    else:  # e.g. bf16 params, float32 blocks: one rounding into the result's dtype
        o.copy_((x @ g).view(o.shape))


def _seq(t: Tensor, n: int, d: int) -> Tensor:
    """(N, ..., d) -> (N, T, d) with T = product of the middle dims (1 for (N, d))."""
    return t.reshape(n, -1, d)


class Block:
    """One layer's share of the rows: its parameters' columns of R (M x P_layer).

    ``names``: the block's parameter names, in the column order of ``matrix()``.
    """

    kind: str
    strategy: str
    roles: dict[str, str]

    @property
    def names(self) -> list[str]:
        return list(self.roles.values())

    def gram(self) -> Tensor:
        """This block's share of R R^T, (M, M), float64: a fresh tensor (FastRows sums into it)."""
        ...

    def combine_into(self, x: Tensor, out: dict[str, Tensor]) -> None:
        """Write this block's columns of R^T x into ``out`` (views of the flat (P,) result)."""
        ...

    def dot(self, v: dict[str, Tensor]) -> Tensor:
        """This block's share of R v, (M,) float64, for v a dict name -> tensor shaped like the param."""
        ...

    def matrix(self) -> Tensor:
        """The block's columns of R, (M, P_block) float64, materialised: the dense twin of gram / combine /
        dot (each parameter's per-sample gradients flattened, in the order of ``names``). Tests and tiny models."""
        ...


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype X and E are kept in (and per-sample blocks formed in) for parameters of ``dtype``:
    float64 stays float64, anything else (float32, bf16, fp16) is float32 (see the module doc)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gram_weight_ghost(x: Tensor, e: Tensor) -> Tensor:
    """sum_{t,t'} (X_i X_j^T)_{tt'} (E_i E_j^T)_{tt'} for X (M,T,a), E (M,T,b), chunked over i. (M, M)."""
    m, t = x.shape[:2]
    out = torch.empty(m, m, dtype=ACC, device=x.device)  # chunks formed in x's dtype, stored in float64
    step = max(1, GHOST_CHUNK_ELEMENTS // max(1, m * t * t))
    for i0 in range(0, m, step):
        xx = torch.einsum("itd,jsd->ijts", x[i0 : i0 + step], x)
        ee = torch.einsum("itd,jsd->ijts", e[i0 : i0 + step], e)
        out[i0 : i0 + step] = (xx * ee).sum(dim=(2, 3))
    return out


def _f32_at_least(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _cat(grads: list[Tensor]) -> Tensor:
    return grads[0] if len(grads) == 1 else torch.cat(grads)


class _MatmulBlock(Block):
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
        # Formed in the compute dtype (float32 for float32 params: the per-block products lose
        # ~1e-7 relative), each block rounded once into float64, where the blocks are summed.
        m = self.e.shape[0]
        terms = []
        if "weight" in self.roles:
            if self.x.shape[1] == 1:
                x, e = self.x[:, 0], self.e[:, 0]
                xx = _aat(x)  # (N, N)
                if self.k > 1:
                    xx = xx.repeat(self.k, self.k)
                terms.append(xx * _aat(e))  # Hadamard product of the two Grams
            elif self.strategy == "materialise":
                # this layer's per-sample gradients, (M, d_out*d_in), as the plain path would form them;
                # kept (small layers) for J^T x in the compute dtype: one (M) x (M, P_layer) product
                g = torch.bmm(self.e.transpose(1, 2), self._x_rows()).reshape(m, -1)
                terms.append(_aat(g))
                if g.numel() <= KEEP_PER_SAMPLE_ELEMENTS:
                    self._g = g
            else:
                terms.append(_gram_weight_ghost(self._x_rows(), self.e))
        if "bias" in self.roles:
            terms.append(_aat(self._bias_rows()))
        return _acc_sum(terms)

    def _bias_rows(self) -> Tensor:
        """(M, d_out) per-sample bias gradients sum_t E_mt, in the compute dtype (cached)."""
        if getattr(self, "_eb", None) is None:
            self._eb = self.e.sum(dim=1)
        return self._eb

    def combine_into(self, x: Tensor, out: dict[str, Tensor]) -> None:
        # sum_m x_m E_m^T X_n(m) = (E with the rows' weights folded in)^T X: one matmul per layer.
        # Formed in the compute dtype when the result is (float32 params: ~1e-7 relative); a float64
        # result (SF's Woodbury subtraction, ngd's residual) is accumulated in float64 over blocks of
        # output units, each rounded once, so the float64 temporaries stay at X's size plus a chunk.
        n, _, d_in = self.x.shape
        d_out = self.e.shape[-1]
        w = out[self.roles["weight"]].view(d_out, d_in) if "weight" in self.roles else None
        b = out[self.roles["bias"]] if "bias" in self.roles else None
        dt = ACC if next(iter(out.values())).dtype == ACC else self.cdt
        g = getattr(self, "_g", None)
        if dt == self.cdt and w is not None and g is not None:  # the per-sample gradients kept by gram()
            xd = x.to(dt)
            _mv_into(w, g, xd)
            if b is not None:
                _mv_into(b, self._bias_rows(), xd)
            return
        if dt != ACC:
            ex = self.e * x.to(dt)[:, None, None]  # (M, T, d_out)
            if self.k > 1:
                ex = ex.reshape(self.k, n, *ex.shape[1:]).sum(dim=0)
            if w is not None:
                if w.dtype == dt:
                    torch.mm(ex.reshape(-1, d_out).T, self.x.reshape(-1, d_in), out=w)
                else:  # e.g. bf16 params, float32 blocks
                    w.copy_(ex.reshape(-1, d_out).T @ self.x.reshape(-1, d_in))
            if b is not None:
                if b.dtype == dt:
                    torch.sum(ex, dim=(0, 1), out=b)
                else:
                    b.copy_(ex.sum(dim=(0, 1)))
            return
        x64 = x.to(ACC)[:, None, None]
        xin = self.x.reshape(-1, d_in).to(ACC)
        chunk = COMBINE_CHUNK_ELEMENTS if self.x.device.type == "cpu" else COMBINE_CHUNK_ELEMENTS_ACCEL
        step = max(1, chunk // max(1, d_in, n * self.x.shape[1]))
        for r0 in range(0, d_out, step):
            ex = self.e[..., r0 : r0 + step].to(ACC) * x64  # (M, T, chunk)
            if self.k > 1:
                ex = ex.reshape(self.k, n, *ex.shape[1:]).sum(dim=0)
            if w is not None:
                w[r0 : r0 + step].copy_(ex.reshape(-1, ex.shape[-1]).T @ xin)
            if b is not None:
                b[r0 : r0 + step].copy_(ex.sum(dim=(0, 1)))

    def matrix(self) -> Tensor:
        e = self.e.to(ACC)
        cols = []
        for role in self.roles:
            if role == "weight":  # per-sample gradient of row m: sum_t E_mt^T X_nt
                cols.append(torch.einsum("mto,mti->moi", e, self._x_rows().to(ACC)).reshape(e.shape[0], -1))
            else:
                cols.append(e.sum(dim=1))
        return torch.cat(cols, dim=1)

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


class _ConvBlock(Block):
    """Conv1d / Conv2d by torch's own convolution kernels (no unfolded patches): per-sample weight
    gradients by ONE grouped weight-gradient convolution (groups = M), J^T x by one weight-gradient
    convolution with the rows' weights folded into E, J v by one convolution of the inputs."""

    def __init__(self, kind: str, roles: dict[str, str], module: nn.Module, x: Tensor, e: Tensor, k: int, cdt):
        self.kind, self.roles, self.k, self.cdt, self.strategy = kind, roles, k, cdt, "native"
        self.m = module
        self.x = x.to(cdt)  # (N, C_in, *spatial)
        self.e = e.to(cdt)  # (M, C_out, *spatial_out)
        self.nd = x.dim() - 2
        self._g: Tensor | None = None

    def _opts(self) -> dict:
        m = self.m
        return {"stride": m.stride, "padding": conv_padding(m), "dilation": m.dilation}

    def _wgrad(self, x: Tensor, e: Tensor, groups: int = 1) -> Tensor:
        fn = torch.nn.grad.conv1d_weight if self.nd == 1 else torch.nn.grad.conv2d_weight
        shape = (e.shape[1], x.shape[1] // groups, *self.m.kernel_size)
        return fn(x, shape, e, groups=groups, **self._opts())

    def _patches(self) -> Tensor:
        """(N, C_in * k..., L) the input patches in weight.view(C_out, -1)'s column order, from strided
        views of the padded input (one copy; F.unfold is several times slower on CPU)."""
        m = self.m
        pads = conv_padding(m)
        x = F.pad(self.x, [q for p in reversed(pads) for q in (p, p)]) if any(pads) else self.x
        for d, (k, dil, st) in enumerate(zip(m.kernel_size, m.dilation, m.stride)):
            x = x.unfold(2 + d, (k - 1) * dil + 1, st)  # appends the window dim
            if dil > 1:
                x = x[..., ::dil]
        # (N, C_in, O..., K...) -> (N, C_in, K..., O...)
        nd = self.nd
        x = x.permute(0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
        return x.reshape(x.shape[0], -1, self.e[0, 0].numel())

    def _per_sample(self) -> Tensor:
        """(M, C_out * C_in * k...) per-sample weight gradients, in the compute dtype."""
        if self._g is None:
            m = self.e.shape[0]
            fan_in = self.x.shape[1] * int(torch.Size(self.m.kernel_size).numel())
            if self.x.device.type == "cpu" and fan_in <= (IM2COL_MAX_FAN_IN_1D if self.nd == 1 else IM2COL_MAX_FAN_IN_2D):
                # few input channels (an image net's first layer): on the CPU patches + one batched matmul
                # beat the grouped weight-gradient convolution (~3x for RGB 3x3 at M = 32, one thread);
                # accelerators keep the grouped kernel (not measured there)
                p = self._patches()
                pr = p.repeat(self.k, 1, 1) if self.k > 1 else p
                self._g = torch.bmm(self.e.reshape(m, self.e.shape[1], -1), pr.transpose(1, 2)).reshape(m, -1)
                return self._g
            xr = self.x.repeat(self.k, *([1] * (self.nd + 1))) if self.k > 1 else self.x
            xg = xr.reshape(1, -1, *xr.shape[2:])  # (1, M C_in, ...)
            eg = self.e.reshape(1, -1, *self.e.shape[2:])  # (1, M C_out, ...)
            self._g = self._wgrad(xg, eg, groups=m).reshape(m, -1)
        return self._g

    def _bias_rows(self) -> Tensor:
        return self.e.reshape(*self.e.shape[:2], -1).sum(dim=2)  # (M, C_out)

    def gram(self) -> Tensor:
        terms = []
        if "weight" in self.roles:
            terms.append(_aat(self._per_sample()))
        if "bias" in self.roles:
            terms.append(_aat(self._bias_rows()))
        return _acc_sum(terms)

    def combine_into(self, x: Tensor, out: dict[str, Tensor]) -> None:
        dt = ACC if next(iter(out.values())).dtype == ACC else self.cdt
        n = self.x.shape[0]
        ex = self.e.to(dt) * x.to(dt).reshape(-1, *([1] * (self.e.dim() - 1)))
        if self.k > 1:
            ex = ex.reshape(self.k, n, *ex.shape[1:]).sum(dim=0)
        if "weight" in self.roles:
            w = out[self.roles["weight"]]
            if self._g is not None and dt == self.cdt:  # the per-sample gradients gram() formed
                w.copy_((x.to(dt) @ self._g).reshape(w.shape))
            else:
                w.copy_(self._wgrad(self.x.to(dt), ex).reshape(w.shape))
        if "bias" in self.roles:
            out[self.roles["bias"]].copy_(ex.reshape(*ex.shape[:2], -1).sum(dim=(0, 2)))

    def dot(self, v: dict[str, Tensor]) -> Tensor:
        m, n = self.e.shape[0], self.x.shape[0]
        e = self.e.to(ACC).reshape(self.k, n, *self.e.shape[1:])
        out = torch.zeros(m, dtype=ACC, device=self.e.device)
        if "weight" in self.roles:
            conv = F.conv1d if self.nd == 1 else F.conv2d
            xv = conv(self.x.to(ACC), v[self.roles["weight"]].to(ACC), **self._opts())  # (N, C_out, ...)
            out += (e * xv).reshape(self.k, n, -1).sum(dim=2).reshape(m)
        if "bias" in self.roles:
            out += (self._bias_rows().to(ACC) @ v[self.roles["bias"]].to(ACC))
        return out

    def matrix(self) -> Tensor:
        cols = []
        for role in self.roles:
            cols.append(self._per_sample().to(ACC) if role == "weight" else self._bias_rows().to(ACC))
        return torch.cat(cols, dim=1)


class _DenseBlock(Block):
    """Layers whose per-sample gradients are small (LayerNorm: M x D): held as matrices."""

    def __init__(self, kind: str, roles: dict[str, str], mats: dict[str, Tensor], shapes: dict[str, torch.Size]):
        self.kind, self.roles, self.strategy = kind, roles, "materialise"
        self.mats = {self.roles[r]: g for r, g in mats.items() if r in roles}  # name -> (M, numel)
        self.shapes = shapes

    def gram(self) -> Tensor:
        # each parameter's block formed in float32/float64 (bf16/fp16 upcast), summed in float64
        return sum(_aat(g).to(ACC) for g in map(_f32_at_least, self.mats.values()))

    def combine_into(self, x: Tensor, out: dict[str, Tensor]) -> None:
        # a float64 result (SF's subtraction, ngd's residual) in float64; else in the columns' own dtype
        # (float32 for float32 params: a sum over M rows, ~1e-7 relative, as the matmul blocks)
        for name, g in self.mats.items():
            o = out[name]
            if o.dtype == ACC or g.dtype != o.dtype:
                o.copy_((x.to(ACC) @ g.to(ACC)).view(o.shape))
            else:
                _mv_into(o, g, x.to(g.dtype))

    def dot(self, v: dict[str, Tensor]) -> Tensor:
        return sum(g.to(ACC) @ v[name].to(ACC).reshape(-1) for name, g in self.mats.items())

    @property
    def names(self) -> list[str]:
        return list(self.mats)

    def matrix(self) -> Tensor:
        return torch.cat([g.to(ACC) for g in self.mats.values()], dim=1)


class _EmbeddingBlock(Block):
    """Embedding: row m's gradient scatters E_mt (d,) into weight row ids_nt.

    Gram[i, j] = sum over ids v held by both rows of <f_i,v, f_j,v>, where f_m,v = sum_{t: ids_nt = v}
    E_mt; per id one small matmul F_v F_v^T (batched by group size), so only ids two rows share cost
    more than a dot product. Few distinct ids (position embeddings, small vocabularies): densely on
    the touched rows.
    """

    def __init__(self, roles: dict[str, str], ids: Tensor, e: Tensor, k: int, weight_shape, padding_idx, cdt):
        self.kind, self.roles, self.k, self.strategy, self.cdt = "embedding", roles, k, "sparse", cdt
        n = ids.shape[0]
        self.ids = ids.reshape(n, -1)  # (N, T)
        self.e = e.to(cdt)  # (M, T, d)
        if padding_idx is not None:  # F.embedding sends no gradient to the padding row
            self.e = self.e * (self.ids != padding_idx).repeat(k, 1).unsqueeze(-1).to(cdt)
        self.weight_shape = weight_shape

    def touched(self) -> tuple[Tensor, Tensor]:
        """(U, F): the weight rows the ids touch (CPU; all rows on accelerators or with
        EMBEDDING_GRAM_STATIC: static shapes) and each row's gradient on them, (M, |U|, d) in the
        compute dtype. Cached."""
        if getattr(self, "_touched", None) is None:
            m, t, d = self.e.shape
            ids = self.ids.repeat(self.k, 1) if self.k > 1 else self.ids  # (M, T)
            if self.e.device.type == "cpu" and not EMBEDDING_GRAM_STATIC:
                uniq, inv = torch.unique(ids, return_inverse=True)
            else:
                uniq, inv = torch.arange(self.weight_shape[0], device=ids.device), ids
            u = uniq.shape[0]
            rows = torch.arange(m, device=ids.device).unsqueeze(1) * u + inv  # (M, T)
            f = torch.zeros(m * u, d, dtype=self.e.dtype, device=self.e.device)
            self._touched = (uniq, f.index_add_(0, rows.reshape(-1), self.e.reshape(-1, d)).reshape(m, u, d))
        return self._touched

    def gram(self) -> Tensor:
        if self.e.device.type != "cpu" or EMBEDDING_GRAM_STATIC:
            return self._gram_static()
        m, t, d = self.e.shape
        n_ids = torch.unique(self.ids).shape[0]
        if n_ids <= 8 * t and m * n_ids * d <= EMBEDDING_DENSE_MAX_ELEMENTS:
            # few distinct ids for the positions (position / token-type embeddings, small vocabularies):
            # the rows' gradients on the touched rows, densely, and one matmul
            f = self.touched()[1].reshape(m, -1)
            return _aat(f).to(ACC)
        dev = self.e.device
        vocab = self.weight_shape[0]
        ids = self.ids.repeat(self.k, 1)  # (M, T)
        row = torch.arange(m, device=dev).unsqueeze(1).expand(m, t)
        # Sum each row's occurrences of the same id: compact f (L, d) with its row and id.
        key = (row * vocab + ids).reshape(-1)
        uniq, inv = torch.unique(key, return_inverse=True)
        f = torch.zeros(uniq.shape[0], d, dtype=self.cdt, device=dev).index_add_(0, inv, self.e.reshape(-1, d))
        f_row, f_id = uniq // vocab, uniq % vocab
        # Group the compact entries by id: the Gram is the sum over ids of F_v F_v^T (F_v: the
        # entries of id v, one per row holding it), scattered into (rows, rows). Groups are padded
        # to the next power of two of their size and each size class is one batched matmul
        # (padding costs at most 4x a group's own c^2 d; singletons add to the diagonal only).
        order = torch.argsort(f_id, stable=True)
        f, f_row, f_id = f[order], f_row[order], f_id[order]
        _, counts = torch.unique_consecutive(f_id, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        n_ent = f.shape[0]
        group = torch.repeat_interleave(torch.arange(counts.shape[0], device=dev), counts)
        pos = torch.arange(n_ent, device=dev) - torch.repeat_interleave(starts, counts)
        size_class = torch.ceil(torch.log2(counts.to(torch.float64))).long()  # 0 for singletons
        out = torch.zeros((m + 1) * (m + 1), dtype=ACC, device=dev)
        single = (counts == 1)[group]
        if bool(single.any()):
            fs, rs = f[single], f_row[single]
            out.index_add_(0, rs * (m + 2), (fs * fs).sum(dim=1).to(ACC))
        for c in torch.unique(size_class[counts > 1]).tolist():
            gsel = (size_class == c) & (counts > 1)
            gid = torch.nonzero(gsel).squeeze(1)  # groups of this size class
            slot = torch.full((counts.shape[0],), -1, dtype=torch.long, device=dev)
            slot[gid] = torch.arange(gid.shape[0], device=dev)
            ent = gsel[group]
            cap = 1 << c
            p_ = torch.zeros(gid.shape[0] * cap, d, dtype=f.dtype, device=dev)
            r_ = torch.full((gid.shape[0] * cap,), m, dtype=torch.long, device=dev)  # padding -> dummy row m
            at = slot[group[ent]] * cap + pos[ent]
            p_[at], r_[at] = f[ent], f_row[ent]
            p_ = p_.reshape(-1, cap, d)
            r_ = r_.reshape(-1, cap)
            blocks = torch.bmm(p_, p_.transpose(1, 2))  # (groups, cap, cap)
            idx = r_[:, :, None] * (m + 1) + r_[:, None, :]
            out.index_add_(0, idx.reshape(-1), blocks.reshape(-1).to(ACC))
        return out.reshape(m + 1, m + 1)[:m, :m].contiguous()

    def _gram_static(self) -> Tensor:
        """The same Gram with static shapes and no host sync (accelerators): sum over position pairs
        (t, t') with equal ids of <E_it, E_jt'>, the (rows_chunk, M, T, T) temporaries chunked."""
        m, t, _ = self.e.shape
        ids = self.ids.repeat(self.k, 1)  # (M, T)
        e = self.e.to(ACC)
        out = torch.empty(m, m, dtype=ACC, device=e.device)
        step = max(1, GHOST_CHUNK_ELEMENTS // max(1, m * t * t))
        for i0 in range(0, m, step):
            same = ids[i0 : i0 + step, None, :, None] == ids[None, :, None, :]  # (c, M, T, T)
            ee = torch.einsum("itd,jsd->ijts", e[i0 : i0 + step], e)
            out[i0 : i0 + step] = (ee * same).sum(dim=(2, 3))
        return out

    def combine_into(self, x: Tensor, out: dict[str, Tensor]) -> None:
        n = self.ids.shape[0]
        o = out[self.roles["weight"]]
        dt = ACC if o.dtype == ACC else self.cdt
        ew = (self.e.to(dt) * x.to(dt)[:, None, None]).reshape(self.k, n, *self.e.shape[1:]).sum(dim=0)
        if o.dtype == dt:  # straight into the result (float64, or float32 parameters' float32 J^T x)
            o.view(self.weight_shape).zero_().index_add_(0, self.ids.reshape(-1), ew.reshape(-1, ew.shape[-1]))
            return
        w = torch.zeros(self.weight_shape, dtype=dt, device=self.e.device)
        w.index_add_(0, self.ids.reshape(-1), ew.reshape(-1, ew.shape[-1]))
        o.copy_(w.view(o.shape))

    def matrix(self) -> Tensor:
        m, t, d = self.e.shape
        ids = self.ids.repeat(self.k, 1)  # (M, T)
        rows = torch.arange(m, device=ids.device).unsqueeze(1).expand(m, t)
        w = torch.zeros(m * self.weight_shape[0], d, dtype=ACC, device=self.e.device)
        w.index_add_(0, (rows * self.weight_shape[0] + ids).reshape(-1), self.e.reshape(-1, d).to(ACC))
        return w.reshape(m, -1)

    def dot(self, v: dict[str, Tensor]) -> Tensor:
        m = self.e.shape[0]
        gathered = v[self.roles["weight"]].to(ACC)[self.ids]  # (N, T, d)
        e = self.e.to(ACC).reshape(self.k, -1, *self.e.shape[1:])
        return (e * gathered).sum(dim=(2, 3)).reshape(m)


class _TiedBlock(_DenseBlock):
    """A parameter held by several rule layers (tied weights, e.g. an Embedding and the Linear head):
    its per-sample gradient is the sum of the holders' columns, so its Gram is the sum of the holders'
    Grams (each by its own rule, nothing materialised) plus the cross terms <holder_a_i, holder_b_j>.
    Embedding x Linear cross terms are formed on the rows of W the batch's ids touch only (U):
    (M, |U|, d) per side in the compute dtype; any other pair by the holders' dense columns.
    ``mats`` (the dense column block, as :class:`_DenseBlock`) is formed only when asked for
    (iefcli.dist gathers it)."""

    def __init__(self, name: str, parts: list[Block], shapes: dict[str, torch.Size]):
        self.kind, self.roles, self.strategy = "tied", {"tied": name}, "sum"
        self.parts, self.shapes, self.name = parts, shapes, name
        self._mats: dict[str, Tensor] | None = None
        self._g: Tensor | None = None
        m = _n_rows(parts[0])
        if m * int(torch.Size(shapes[name]).numel()) <= TIED_MATERIALISE_ELEMENTS:
            self.strategy = "materialise"

    def _per_sample(self) -> Tensor:
        """(M, numel) per-sample gradients of the tied parameter in the compute dtype (materialise only)."""
        if self._g is None:
            # the non-embedding holders' columns summed in place, the embedding holders' rows scattered
            # straight into them (no zero-filled M x numel per holder, no extra sums)
            emb = [b for b in self.parts if isinstance(b, _EmbeddingBlock)]
            rest = [b for b in self.parts if not isinstance(b, _EmbeddingBlock)]
            g = _holder_columns(rest[0]) if rest else _holder_columns(emb.pop(0))
            for b in rest[1:]:
                c = _holder_columns(b)
                g = g.add_(c) if c.dtype == g.dtype else g + c
            for b in emb:
                if b.e.dtype != g.dtype:
                    g = g + _holder_columns(b)
                    continue
                m, _, d = b.e.shape
                vocab = b.weight_shape[0]
                ids = b.ids.repeat(b.k, 1) if b.k > 1 else b.ids
                rows = (torch.arange(m, device=ids.device).unsqueeze(1) * vocab + ids).reshape(-1)
                g.view(m * vocab, d).index_add_(0, rows, b.e.reshape(-1, d))
            self._g = g
        return self._g

    @property
    def mats(self) -> dict[str, Tensor]:
        if self._mats is None:
            self._mats = {self.name: self.matrix()}
        return self._mats

    @property
    def names(self) -> list[str]:
        return [self.name]

    def matrix(self) -> Tensor:
        return sum(b.matrix() for b in self.parts)

    def gram(self) -> Tensor:
        if self.strategy == "materialise":
            g = self._per_sample()
            return _aat(g).to(ACC)
        out = sum(b.gram() for b in self.parts)
        for i, a in enumerate(self.parts):
            for b in self.parts[i + 1 :]:
                c = _tied_cross(a, b)
                out = out + c + c.T
        return out

    def combine_into(self, x: Tensor, out: dict[str, Tensor]) -> None:
        o = out[self.name]
        if self.strategy == "materialise" and (o.dtype != ACC or self._per_sample().dtype == ACC):
            g = self._per_sample()  # a float64 result from float32 params: the holders' float64 paths below
            o.copy_((x.to(g.dtype) @ g).view(o.shape))
            return
        self.parts[0].combine_into(x, out)
        tmp = {self.name: torch.empty_like(out[self.name])}
        for b in self.parts[1:]:
            b.combine_into(x, tmp)
            out[self.name] += tmp[self.name]

    def dot(self, v: dict[str, Tensor]) -> Tensor:
        return sum(b.dot(v) for b in self.parts)


def _n_rows(b: Block) -> int:
    e = getattr(b, "e", None)
    return e.shape[0] if e is not None else next(iter(b.mats.values())).shape[0]


def _holder_columns(b: Block) -> Tensor:
    """One holder's columns of a tied parameter, (M, numel), in the holder's compute dtype."""
    if isinstance(b, _EmbeddingBlock):
        m, t, d = b.e.shape
        vocab = b.weight_shape[0]
        ids = b.ids.repeat(b.k, 1)  # (M, T)
        rows = torch.arange(m, device=ids.device).unsqueeze(1) * vocab + ids
        w = torch.zeros(m * vocab, d, dtype=b.e.dtype, device=b.e.device)
        return w.index_add_(0, rows.reshape(-1), b.e.reshape(-1, d)).reshape(m, -1)
    if isinstance(b, _MatmulBlock) and list(b.roles) == ["weight"]:
        m = b.e.shape[0]
        if b.e.shape[1] == 1:  # one position: an outer product per row
            return (b.e[:, 0, :, None] * b._x_rows()[:, 0, None, :]).reshape(m, -1)
        return torch.bmm(b.e.transpose(1, 2), b._x_rows()).reshape(m, -1)
    return b.matrix()


def _tied_cross(a: Block, b: Block) -> Tensor:
    """(M, M) float64: <a's columns of row i, b's columns of row j> for two holders of one parameter."""
    if isinstance(b, _EmbeddingBlock) and isinstance(a, _MatmulBlock):
        return _tied_cross(b, a).T
    if isinstance(a, _EmbeddingBlock) and isinstance(b, _MatmulBlock) and b.kind == "linear" \
            and tuple(b.weight_shape) == tuple(a.weight_shape):
        # only the rows some id touches: the embedding side is zero elsewhere
        uniq, ge = a.touched()  # (M, |U|, d)
        m = ge.shape[0]
        if b.e.shape[1] == 1:  # one position: outer products (a bmm with inner dim 1 is slower)
            gl = b.e[:, 0, uniq][:, :, None] * b._x_rows()[:, 0, None, :]  # (M, |U|, d)
        else:
            gl = torch.bmm(b.e[..., uniq].transpose(1, 2), b._x_rows())  # (M, |U|, d)
        return (ge.reshape(m, -1).to(gl.dtype) @ gl.reshape(m, -1).T).to(ACC)
    return a.matrix() @ b.matrix().T


def _layernorm_features(layer: Layer, cdt: torch.dtype) -> tuple[Tensor, int]:
    """xhat (N, T, D) and D, recomputed from the captured input in ``cdt`` (LayerNorm or RMSNorm)."""
    m = layer.module
    nd = len(m.normalized_shape)
    dims = tuple(range(-nd, 0))
    x = layer.x.to(cdt)
    if layer.kind == "rmsnorm":
        eps = m.eps if m.eps is not None else torch.finfo(layer.x.dtype).eps
        xhat = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
    else:
        xc = x - x.mean(dim=dims, keepdim=True)
        var = (xc * xc).mean(dim=dims, keepdim=True)  # (torch.var over short rows is slow on CPU)
        xhat = xc * torch.rsqrt(var + m.eps)
    d = int(torch.Size(m.normalized_shape).numel())
    return _seq(xhat, x.shape[0], d), d


def make_block(layer: Layer, grads: list[Tensor], shapes: dict[str, torch.Size], cdt: torch.dtype) -> Block:
    """The block of ``layer`` from its output gradients, one per cotangent set (K of them)."""
    k = len(grads)
    m = layer.module
    n = layer.x.shape[0]
    if layer.kind in ("conv1d", "conv2d"):
        x = layer.x if layer.x.dim() == (3 if layer.kind == "conv1d" else 4) else layer.x.unsqueeze(0)
        e = _cat([g.reshape(n, m.out_channels, *g.shape[-x.dim() + 2:]) for g in grads])
        if k * n * m.weight.numel() <= MATERIALISE_MAX_ELEMENTS:
            return _ConvBlock(layer.kind, layer.roles, m, x, e, k, cdt)
    if layer.kind == "linear":
        d_in, d_out = m.in_features, m.out_features
        x = _seq(layer.x, n, d_in)
        e = _cat([_seq(g, n, d_out) for g in grads])
        return _MatmulBlock("linear", layer.roles, x, e, k, (d_out, d_in), cdt)
    if layer.kind == "conv2d":
        x = layer.x if layer.x.dim() == 4 else layer.x.unsqueeze(0)
        patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=conv_padding(m), stride=m.stride)
        x = patches.transpose(1, 2)  # (N, L, C_in kh kw), in the order of weight.view(C_out, -1)
        e = _cat([g.reshape(n, m.out_channels, -1).transpose(1, 2) for g in grads])
        return _MatmulBlock("conv2d", layer.roles, x, e, k, tuple(m.weight.shape), cdt)
    if layer.kind == "conv1d":
        x = layer.x if layer.x.dim() == 3 else layer.x.unsqueeze(0)
        (k1,), (d1,), (s1,) = m.kernel_size, m.dilation, m.stride
        patches = F.unfold(x.unsqueeze(2), (1, k1), dilation=(1, d1), padding=(0, conv_padding(m)[0]), stride=(1, s1))
        x = patches.transpose(1, 2)  # (N, L_out, C_in k), in the order of weight.view(C_out, -1)
        e = _cat([g.reshape(n, m.out_channels, -1).transpose(1, 2) for g in grads])
        return _MatmulBlock("conv1d", layer.roles, x, e, k, tuple(m.weight.shape), cdt)
    if layer.kind in ("batchnorm", "groupnorm"):
        # per-channel affine after a per-sample normalisation: the features are the channels (dim 1)
        c = m.num_features if layer.kind == "batchnorm" else m.num_channels
        x = layer.x.to(cdt)
        x = x.reshape(n, c, -1) if x.shape[0] == n and x.dim() > 1 else x.reshape(1, c, -1)
        if layer.kind == "batchnorm":
            xhat = (x - m.running_mean.to(cdt)[:, None]) / torch.sqrt(m.running_var.to(cdt)[:, None] + m.eps)
        else:
            xg = x.reshape(x.shape[0], m.num_groups, -1)
            xc = xg - xg.mean(dim=-1, keepdim=True)
            var = (xc * xc).mean(dim=-1, keepdim=True)  # (torch.var is slow on CPU here)
            xhat = (xc * torch.rsqrt(var + m.eps)).reshape(x.shape)
        # (N, C, S) and (M, C, S): the channel-major layout, reduced over the contiguous last dim
        e = _cat([g.to(cdt).reshape(n, c, -1) for g in grads])
        xr = xhat.repeat(k, 1, 1) if k > 1 else xhat
        mats = {"weight": (e * xr).sum(dim=2), "bias": e.sum(dim=2)}
        return _DenseBlock(layer.kind, layer.roles, mats, shapes)
    if layer.kind in ("layernorm", "rmsnorm"):
        xhat, d = _layernorm_features(layer, cdt)
        e = _cat([_seq(g, n, d) for g in grads]).to(cdt)  # (M, T, D)
        xr = xhat.repeat(k, 1, 1) if k > 1 else xhat
        mats = {"weight": (e * xr).sum(dim=1), "bias": e.sum(dim=1)}
        return _DenseBlock(layer.kind, layer.roles, mats, shapes)
    if layer.kind == "embedding":
        d = m.embedding_dim
        e = _cat([_seq(g, n, d) for g in grads])
        return _EmbeddingBlock(layer.roles, layer.x, e, k, tuple(m.weight.shape), m.padding_idx, cdt)
    raise AssertionError(layer.kind)



def replay_block(call: Call, grads: list[Tensor], shapes: dict[str, torch.Size], *,
                 randomness: str = "error") -> Block:
    """The per-module fallback: a module without a rule (``call``: its captured arguments) is run
    again per sample under vmap, with only ITS OWN parameters as variables, and each sample's
    output gradient (one per cotangent set, ``grads`` K x (N, ...)) is pulled back by a vjp:
    rows_{kn} = (d out_n / d theta_module)^T E_kn. Only this module is replayed, never the model.
    The arguments whose leading dim is N are split per sample; others are shared."""
    module = call.module
    sub = {attr: module.get_parameter(attr).detach() for attr in call.roles}
    pick = getattr(call, "pick", None)
    n = grads[0].shape[0]
    flat, spec = tree_flatten((call.args, call.kwargs))
    batched = [isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n for t in flat]
    u = torch.stack(grads)  # (K, N, ...)

    def one(xs: list[Tensor], u_n: Tensor) -> dict[str, Tensor]:
        it = iter(xs)
        leaves = [next(it).unsqueeze(0) if b else t for t, b in zip(flat, batched)]
        args, kwargs = tree_unflatten(leaves, spec)

        def f(p: dict[str, Tensor]) -> Tensor:
            out = functional_call(module, p, tuple(args), kwargs)
            return (out if pick is None else out[pick]).squeeze(0)

        _, vjp_n = vjp(f, sub)
        return vmap(lambda uk: vjp_n(uk)[0])(u_n)  # attr -> (K, *shape)

    xs = [t for t, b in zip(flat, batched) if b]
    # The module's other (frozen or rule-covered) parameters are constants here: no outer graph.
    with torch.no_grad():
        per = vmap(one, in_dims=([0] * len(xs), 1), randomness=randomness)(xs, u)  # attr -> (N, K, *shape)
    k = u.shape[0]
    mats = {attr: g.detach().transpose(0, 1).reshape(k * n, -1) for attr, g in per.items()}
    return _DenseBlock("vmap", call.roles, mats, shapes)

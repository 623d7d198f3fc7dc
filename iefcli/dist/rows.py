"""The rows of a batch held in pieces (micro-batches on this rank, shards on other ranks).

A batch of N samples is split into pieces: rank r holds samples [lo_r, hi_r) (rank
order = sample order), and splits them into micro-batches. Each piece gives its own
local rows (:class:`iefcli.core.fast.FastRows` from the captured layer inputs X and
output gradients E, or :class:`iefcli.core.jacobian.DenseRows` on the plain/vmap path).

:func:`shard_rows` turns the pieces into :class:`ShardedRows`, the Rows of the WHOLE
batch (same M = K N rows, same k-major order as one process would give):

- ``gram()``: the pieces' FACTORS (X and E per layer; rows only for DenseRows and the
  vmap fallback) are copied into one buffer per factor as each micro-batch arrives
  (:class:`LocalFactors`; a sequence layer whose per-sample gradients are smaller than X
  and E is kept as those, :func:`compact_block`), ONE all_gather gives every rank
  everyone's, and the SAME block types are built on the gathered tensors
  (:func:`rebuild_block`), so the per-layer Gram maths is the fast path's own;
- ``combine(x)``: this rank's R_local^T x_local (its micro-batches' factors concatenated
  into one rows object: one combine, float64 accumulation rounded once), then ONE
  all_reduce over the ranks (P numbers in the parameters' dtype: the traffic of DDP's
  gradient all-reduce);
- ``dot(v)``: this rank's R_local v, all_gathered (M numbers).

In one process (micro-batches only) there is no communication at all and the
concatenated rows ARE the batch's rows: the same blocks as one batch of N.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from iefcli.core.fast.blocks import ACC, Block, _ConvBlock, _DenseBlock, _EmbeddingBlock, _MatmulBlock, _TiedBlock
from iefcli.core.fast.rows import FastRows
from iefcli.core.jacobian import DenseRows
from iefcli.core.params import ParamLayout
from iefcli.dist.comm import Comm

__all__ = ["ShardedRows", "LocalFactors", "shard_rows", "compactable", "compact_block", "block_factors", "rebuild_block", "piece_bounds"]


def piece_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) of ``parts`` contiguous pieces of n samples, sizes differing by at most one
    (the first ``n % parts`` pieces one larger), none empty when parts <= n."""
    parts = max(1, min(parts, n)) if n > 0 else 1
    q, r = divmod(n, parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + q + (1 if i < r else 0)
        out.append((lo, hi))
        lo = hi
    return out


# ----------------------------------------------------------------------------- factors of a block


def block_factors(block: Block, k: int, n: int) -> list[Tensor]:
    """The tensors that define ``block``, each shaped (A, n, ...) with dim 1 the samples
    (A = 1 for per-sample factors such as X, A = k for per-row ones such as E)."""
    if isinstance(block, _MatmulBlock):
        return [block.x.unsqueeze(0), block.e.reshape(k, n, *block.e.shape[1:])]
    if isinstance(block, _EmbeddingBlock):
        return [block.ids.unsqueeze(0), block.e.reshape(k, n, *block.e.shape[1:])]
    if isinstance(block, _ConvBlock):  # X (N, C_in, ...) and E (M, C_out, ...)
        return [block.x.unsqueeze(0), block.e.reshape(k, n, *block.e.shape[1:])]
    if isinstance(block, _DenseBlock):
        return [g.reshape(k, n, -1) for g in block.mats.values()]
    raise TypeError(f"iefcli.dist: no factor rule for block type {type(block).__name__}")


def rebuild_block(block: Block, factors: list[Tensor], k: int) -> Block:
    """A block of ``block``'s type on (concatenated / gathered) ``factors`` from :func:`block_factors`."""
    if isinstance(block, _MatmulBlock):
        x, e = factors
        return _MatmulBlock(block.kind, block.roles, x[0], e.reshape(-1, *e.shape[2:]), k, block.weight_shape,
                            block.cdt)
    if isinstance(block, _EmbeddingBlock):
        ids, e = factors
        # E already has the padding row's gradient zeroed: no padding_idx again
        return _EmbeddingBlock(block.roles, ids[0], e.reshape(-1, *e.shape[2:]), k, block.weight_shape, None,
                               block.cdt)
    if isinstance(block, _ConvBlock):
        x, e = factors
        return _ConvBlock(block.kind, block.roles, block.m, x[0], e.reshape(-1, *e.shape[2:]), k, block.cdt)
    if isinstance(block, _DenseBlock):
        role_of = {name: role for role, name in block.roles.items()}
        mats = {role_of[name]: f.reshape(-1, f.shape[-1]) for name, f in zip(block.mats, factors)}
        return _DenseBlock(block.kind, block.roles, mats, block.shapes)
    raise TypeError(f"iefcli.dist: no factor rule for block type {type(block).__name__}")


def _structure(rows) -> list[tuple]:
    """What must agree between pieces (and ranks) for their factors to be concatenated."""
    if isinstance(rows, DenseRows):
        return [("dense", rows.matrix.shape[1])]
    out = [(type(b).__name__, b.kind, tuple(b.names)) for b in rows.blocks]
    if rows.fallback is not None:
        out.append(("fallback", tuple(rows.fallback_layout.names)))
    return out


def _piece_factors(rows, k: int, n: int) -> list[Tensor]:
    if isinstance(rows, DenseRows):
        return [rows.matrix.reshape(k, n, -1)]
    fs = [f for b in rows.blocks for f in block_factors(b, k, n)]
    if rows.fallback is not None:
        fs.append(rows.fallback.matrix.reshape(k, n, -1))
    return fs


@dataclass
class Piece:
    """One micro-batch on this rank: its local rows (K n of them) and its n samples."""

    rows: object  # FastRows | DenseRows
    n: int


class ShardedRows:
    """The M = K N rows of the whole batch: this rank's rows (its micro-batches' factors
    concatenated: ``local_rows``, n_local samples from sample ``offset``) and the Gram of
    everyone's (``global_rows``, built on the gathered factors; the same object as
    ``local_rows`` in one process)."""

    def __init__(self, local_rows, k: int, counts: list[int], comm: Comm, layout: ParamLayout | None,
                 dtype: torch.dtype, device: torch.device, global_rows):
        self.local_rows, self.k, self.counts, self.comm = local_rows, k, counts, comm
        self.layout, self.dtype, self.device = layout, dtype, device
        self.n = sum(counts)
        self.n_rows = k * self.n
        self.offset = sum(counts[: comm.rank])  # this rank's first sample
        self.n_local = counts[comm.rank]
        self.global_rows = global_rows
        self._gram: Tensor | None = None

    def gram(self) -> Tensor:
        """R R^T (M, M) float64, from the gathered factors: the same on every rank."""
        if self._gram is None:
            self._gram = self.global_rows.gram()
        return self._gram

    def _local_x(self, x: Tensor) -> Tensor:
        return x.reshape(self.k, self.n)[:, self.offset : self.offset + self.n_local].reshape(-1)

    def combine(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """R^T x (P,): this rank's rows (accumulated in float64, rounded once), then one all_reduce."""
        if not self.comm.distributed:
            return self.local_rows.combine(x, dtype=dtype)
        out = self.local_rows.combine(self._local_x(x), dtype=dtype or self.dtype)
        return self.comm.all_reduce_(out)

    def dot(self, v: Tensor) -> Tensor:
        """R v (M,) float64: this rank's share, all_gathered."""
        if not self.comm.distributed:
            return self.local_rows.dot(v)
        local = self.local_rows.dot(v).reshape(self.k, self.n_local)
        return self.comm.gather_samples([local], self.counts)[0].reshape(-1)

    def grad_dot(self, v: Tensor) -> Tensor:
        """<v, g> for the batch's mean gradient g = R^T 1 / M without forming g: 1^T R v / M (float64
        0-d; under ranks an M-sized all_gather instead of a second P-sized all_reduce)."""
        return self.dot(v).sum() / self.n_rows

    @property
    def matrix(self) -> Tensor:
        """R (M, P) float64, materialised (tests and tiny models only)."""
        eye = torch.eye(self.n_rows, dtype=ACC, device=self.device)
        return torch.stack([self.combine(eye[m], dtype=ACC) for m in range(self.n_rows)])

    @property
    def strategies(self) -> dict[str, str]:
        return getattr(self.global_rows, "strategies", {})


class _Template:
    """What rebuilding rows on other factors needs from the first piece: its structure and its
    blocks' metadata, without its tensors (so the first micro-batch's factors are not kept twice)."""

    def __init__(self, rows, k: int, n: int):
        self.structure = _structure(rows)
        self.dense = isinstance(rows, DenseRows)
        self.dtype, self.device = _dtype(rows), _device(rows)
        self.blocks, self.n_factors = [], []
        self.has_fallback, self.fallback_layout, self.layout = False, None, None
        if not self.dense:
            self.blocks = [_strip(b) for b in rows.blocks]
            self.n_factors = [len(block_factors(b, k, n)) for b in rows.blocks]
            self.has_fallback = rows.fallback is not None
            self.fallback_layout, self.layout = rows.fallback_layout, rows.layout


def _strip(block: Block) -> Block:
    """A shallow copy of ``block`` without its tensors (only its metadata is read by :func:`rebuild_block`)."""
    c = copy.copy(block)
    for attr in ("x", "e", "ids", "_g"):
        if hasattr(c, attr):
            setattr(c, attr, None)
    if isinstance(c, _TiedBlock):  # its dense mats are a lazy property; only their names are kept
        c._mats, c.parts = dict.fromkeys(block.names), []
    elif isinstance(c, _DenseBlock):
        c.mats = dict.fromkeys(block.mats)
    return c


def _rows_from_factors(tmpl: _Template, factors: list[Tensor], k: int, n: int):
    """Rows of ``tmpl``'s structure over ``factors`` (n samples)."""
    if tmpl.dense:
        return DenseRows(factors[0].reshape(k * n, -1))
    blocks, i = [], 0
    for b, m in zip(tmpl.blocks, tmpl.n_factors):
        blocks.append(rebuild_block(b, factors[i : i + m], k))
        i += m
    fb = DenseRows(factors[i].reshape(k * n, -1)) if tmpl.has_fallback else None
    return FastRows(blocks, fb, tmpl.fallback_layout, tmpl.layout, k * n, tmpl.dtype, tmpl.device)


def compactable(block: Block) -> bool:
    """A sequence Linear/Conv block whose per-sample gradients (d_out x d_in (+ d_out) numbers per
    row) are fewer numbers than its factors (T x (d_in + d_out) per sample): kept (and gathered)
    as those per-sample gradients instead (:func:`compact_block`). Exact: the Gram, R^T x and R v
    are the same sums; smaller to keep, to gather, and cheaper to form the Gram from."""
    if isinstance(block, _ConvBlock) and "weight" in block.roles:  # (the same test; T = spatial positions)
        per_row = block.m.weight.numel() + (block.e.shape[1] if "bias" in block.roles else 0)
        return per_row * block.k < block.x[0].numel() + block.k * block.e[0].numel()
    if not isinstance(block, _MatmulBlock) or "weight" not in block.roles:
        return False
    _, t, d_in = block.x.shape
    d_out = block.e.shape[-1]
    per_row = d_out * d_in + (d_out if "bias" in block.roles else 0)
    return t > 1 and per_row * block.k < t * (d_in + block.k * d_out)


def compact_block(block: _MatmulBlock | _ConvBlock) -> _DenseBlock:
    """``block``'s per-sample gradients, (M, d_out d_in) and (M, d_out), formed in its compute dtype
    (as its own "materialise" Gram forms them), as a dense block."""
    m = block.e.shape[0]
    if isinstance(block, _ConvBlock):
        mats = {"weight": block._per_sample()}
        if "bias" in block.roles:
            mats["bias"] = block._bias_rows()
        return _DenseBlock(block.kind, block.roles, mats, {block.roles["weight"]: block.m.weight.shape})
    mats = {"weight": torch.bmm(block.e.transpose(1, 2), block._x_rows()).reshape(m, -1)}
    if "bias" in block.roles:
        mats["bias"] = block.e.sum(dim=1)
    shapes = {block.roles["weight"]: torch.Size(block.weight_shape)}
    return _DenseBlock(block.kind, block.roles, mats, shapes)


def _compacted(rows, which: list[bool]):
    if not any(which):
        return rows
    blocks = [compact_block(b) if c else b for b, c in zip(rows.blocks, which)]
    return FastRows(blocks, rows.fallback, rows.fallback_layout, rows.layout, rows.n_rows, rows.dtype, rows.device)


class LocalFactors:
    """This rank's micro-batches, kept as their factors only: each :meth:`add` copies a piece's
    factors into buffers sized for the rank's ``n_local`` samples (allocated at the first piece)
    and lets the piece go, so the peak is the factors of ``n_local`` samples plus ONE micro-batch
    (its graph and its own factors), never two copies of all factors. Layers whose per-sample
    gradients are smaller than their factors (:func:`compactable`: sequence models, T large)
    are kept as those instead, the choice made at the first piece for all. A single piece in
    one process (no micro-batches, no ranks) is kept as it is (no copy, no change)."""

    def __init__(self, k: int, n_local: int, distributed: bool = False):
        self.k, self.n_local, self.n, self.distributed = k, n_local, 0, distributed
        self.tmpl: _Template | None = None
        self.bufs: list[Tensor] | None = None
        self.single = None
        self.compact: list[bool] | None = None

    def add(self, piece: Piece) -> None:
        rows, n = piece.rows, piece.n
        if self.n + n > self.n_local:
            raise ValueError(f"iefcli.dist: micro-batches hold more than the {self.n_local} samples announced")
        alone = self.tmpl is None and n == self.n_local and not self.distributed
        if not alone and not isinstance(rows, DenseRows):
            if self.compact is None:
                self.compact = [compactable(b) for b in rows.blocks]
            if len(self.compact) == len(rows.blocks):  # (a mismatch is refused below)
                rows = _compacted(rows, self.compact)
        if self.tmpl is None:
            self.tmpl = _Template(rows, self.k, n)
            if n == self.n_local:
                self.single, self.n = rows, n
                return
        elif _structure(rows) != self.tmpl.structure:
            raise ValueError("iefcli.dist: the micro-batches took different fast-path routes; use jacobian='vmap'")
        fs = _piece_factors(rows, self.k, n)
        if self.bufs is None:
            self.bufs = [f.new_empty((f.shape[0], self.n_local, *f.shape[2:])) for f in fs]
        for buf, f in zip(self.bufs, fs):
            buf[:, self.n : self.n + n].copy_(f)
        self.n += n

    def finish(self, comm: Comm, counts: list[int] | None = None,
               extra: list[Tensor] = ()) -> tuple["ShardedRows", list[Tensor]]:
        """:class:`ShardedRows` of the whole batch (see :func:`shard_rows`)."""
        if self.tmpl is None or self.n != self.n_local:
            raise ValueError(f"iefcli.dist: {self.n} of the {self.n_local} samples were added")
        k, tmpl = self.k, self.tmpl
        if counts is None:
            counts = comm.counts(self.n_local)
        if self.single is not None:
            local_rows = self.single
            local = _piece_factors(local_rows, k, self.n_local) if comm.distributed else []
        else:
            local = self.bufs
            local_rows = _rows_from_factors(tmpl, local, k, self.n_local)
        self.single = self.bufs = None
        if comm.distributed:  # ONE all_gather: everyone's factors (and the per-sample extras)
            gathered = comm.gather_samples([*local, *extra], counts)
            factors, extra_out = gathered[: len(local)], gathered[len(local):]
            global_rows = _rows_from_factors(tmpl, factors, k, sum(counts))
        else:
            global_rows, extra_out = local_rows, list(extra)
        layout = None if tmpl.dense else tmpl.layout
        rows = ShardedRows(local_rows, k, counts, comm, layout, tmpl.dtype, tmpl.device, global_rows)
        return rows, list(extra_out)


def shard_rows(pieces: list[Piece], k: int, comm: Comm, counts: list[int] | None = None,
               extra: list[Tensor] = ()) -> tuple[ShardedRows, list[Tensor]]:
    """:class:`ShardedRows` of the whole batch from this rank's ``pieces`` (in sample order;
    the list is emptied as the pieces are copied, see :class:`LocalFactors`).

    ``extra``: per-sample tensors (A, n_local, ...) gathered in the SAME all_gather as the
    factors (losses, logits, ...); returned gathered, (A, N, ...).
    """
    acc = LocalFactors(k, sum(p.n for p in pieces), comm.distributed)
    while pieces:
        acc.add(pieces.pop(0))
    return acc.finish(comm, counts, extra)


def _dtype(rows) -> torch.dtype:
    return rows.matrix.dtype if isinstance(rows, DenseRows) else rows.dtype


def _device(rows) -> torch.device:
    return rows.matrix.device if isinstance(rows, DenseRows) else rows.device

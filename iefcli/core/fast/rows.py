"""FastRows: the M gradient rows as the sum of per-layer blocks (gram / combine / dot)."""

from __future__ import annotations

import torch
from torch import Tensor

from iefcli.core.fast.blocks import ACC, Block
from iefcli.core.jacobian import DenseRows
from iefcli.core.params import ParamLayout

__all__ = ["FastRows"]

class FastRows:
    """M = K N gradient rows seen through gram / combine / dot, never materialised.

    ``blocks`` cover the fast layers' parameters; ``fallback`` (DenseRows over
    the remaining parameters, from the vmap path) the rest. The Gram matrix is
    the sum of the blocks' Grams (parameters are disjoint), float64.
    """

    def __init__(self, blocks: list[Block], fallback: DenseRows | None, fallback_layout: ParamLayout | None,
                 layout: ParamLayout, n_rows: int, dtype: torch.dtype, device: torch.device):
        self.blocks = blocks
        self.fallback = fallback
        self.fallback_layout = fallback_layout
        self.layout = layout
        self.n_rows = n_rows
        self.dtype = dtype
        self.device = device
        self._gram: Tensor | None = None
        covered = {name for b in blocks for name in b.names}
        if fallback_layout is not None:
            covered |= set(fallback_layout.names)
        # Parameters in no block (a layer that no sample reached) have zero rows.
        self._complete = covered >= set(layout.names)

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
            g = None
            for b in self.blocks:  # each block's gram() is a fresh float64 tensor: the first one is the sum
                gb = b.gram()
                g = gb if g is None else g.add_(gb)
            if self.fallback is not None:
                fb = self.fallback.gram()  # DenseRows caches its Gram: never summed into in place
                g = fb.clone() if g is None else g.add_(fb)
            self._gram = g if g is not None else torch.zeros(self.n_rows, self.n_rows, dtype=ACC, device=self.device)
        return self._gram

    def combine(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """R^T x for x (M,): (P,) in ``dtype`` (default: the parameters'), accumulated in float64."""
        alloc = torch.empty if self._complete else torch.zeros
        flat = alloc(self.layout.size, dtype=dtype or self.dtype, device=self.device)
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


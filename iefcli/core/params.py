"""Trainable parameters as a named dict, and their flat P-vector layout.

theta is the TRAINABLE parameters only (``requires_grad=True``); frozen
parameters and buffers stay inside the module and reach ``functional_call``
untouched. Directions are flat P-vectors in the order of :class:`ParamLayout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

Params = dict[str, Tensor]


def trainable_params(model: nn.Module) -> Params:
    """The module's trainable parameters, detached, by their qualified names."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets that map a params dict to a flat P-vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, params: Mapping[str, Tensor]) -> "ParamLayout":
        return cls(tuple(params), tuple(t.shape for t in params.values()))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def size(self) -> int:
        """P, the number of trainable numbers."""
        return sum(self.numels)

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """dict of tensors shaped like the params -> (P,). Works under vmap."""
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, vec: Tensor) -> Params:
        """(P,) -> dict of tensors shaped like the params (views into ``vec``)."""
        out: Params = {}
        for name, shape, chunk in zip(self.names, self.shapes, torch.split(vec, self.numels)):
            out[name] = chunk.view(shape)
        return out

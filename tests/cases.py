"""The table of small cases every core test runs over.

Each case is a tiny model (P in the hundreds), a batch of N = 4..6 inputs,
targets and a loss, all built from explicit seeds (parameters and data are
drawn from a ``torch.Generator``; the global RNG is never touched), in the
dtype asked for (float64 for the references, float32 for precision tests).

Usage (``tests/`` is on ``sys.path`` via ``tests/conftest.py``)::

    from cases import CASE_NAMES, DAMPINGS, make_case
    case = make_case("mlp_ce", torch.float64)
    bg = batch_grads(case.model, case.params, case.inputs, case.targets, case.loss_fn)

``case.ref_loss(z_n, y_n)`` is the per-sample loss of ONE sample written with
``torch.nn.functional`` (independent of :mod:`iefcli.core.losses`), for the
slow references in ``tests/reference.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iefcli.core.losses import MSE, CrossEntropy, Loss, TokenCrossEntropy
from iefcli.core.params import Params, trainable_params

IGNORE_INDEX = -100

# Dampings every direction test sweeps (the paper's range: 1e-12 .. 1).
DAMPINGS = (1e-12, 1e-8, 1e-4, 1e-2, 1.0)


@dataclass
class Case:
    """One model + batch + loss. ``params`` are the trainable params (detached)."""

    name: str
    model: nn.Module
    params: Params
    inputs: Any  # Tensor, or dict of tensors (keyword arguments), leading dim N
    targets: Tensor
    loss_fn: Loss
    ref_loss: Callable[[Tensor, Tensor], Tensor]  # (z_n, y_n) -> scalar, one sample, unscaled
    dtype: torch.dtype

    @property
    def n(self) -> int:
        return self.targets.shape[0]

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def sample_inputs(self, n: int) -> Any:
        """Inputs of sample n alone, with a leading batch dim of 1."""
        if isinstance(self.inputs, dict):
            return {k: v[n : n + 1] for k, v in self.inputs.items()}
        return self.inputs[n : n + 1]

    def call(self, inputs: Any) -> Tensor:
        """Plain (non-functional) forward of the module."""
        return self.model(**inputs) if isinstance(self.inputs, dict) else self.model(inputs)


# ---------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class SmallCNN(nn.Module):
    """Conv2d -> tanh -> max-pool -> flatten -> Linear, on 1 x 6 x 6 images."""

    def __init__(self, n_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=3)  # -> 4 x 4 x 4
        self.pool = nn.MaxPool2d(2)  # -> 4 x 2 x 2
        self.fc = nn.Linear(16, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.pool(torch.tanh(self.conv(x)))
        return self.fc(h.flatten(1))


class TinyEncoder(nn.Module):
    """One pre-LN transformer encoder block with single-head attention written
    from nn.Linear + softmax, a per-token output head. ids (N, T), mask (N, T)
    with 1 for real tokens; padded keys are masked out of the attention."""

    def __init__(self, vocab: int = 7, d: int = 8, t: int = 5, n_classes: int = 7):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(t, d))
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Linear(d, d)
        self.head = nn.Linear(d, n_classes)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        h = self.emb(ids) + self.pos[: ids.shape[1]]
        a = self.ln1(h)
        scores = self.q(a) @ self.k(a).transpose(-1, -2) / math.sqrt(a.shape[-1])
        # Additive key mask (no data-dependent control flow, so vmap is happy).
        scores = scores + (1.0 - mask.to(scores.dtype)).unsqueeze(-2) * -1e4
        h = h + self.o(torch.softmax(scores, dim=-1) @ self.v(a))
        h = h + self.ff(torch.tanh(self.ln2(h)))
        return self.head(h)


class FrozenFirstLayer(nn.Module):
    """MLP whose first layer is frozen, with a buffer in the forward path."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)
        self.register_buffer("scale", torch.ones(d_hidden))
        for p in self.fc1.parameters():
            p.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)) * self.scale)


# ---------------------------------------------------------------- helpers


def _init_(model: nn.Module, gen: torch.Generator, dtype: torch.dtype, scale: float = 1.0) -> nn.Module:
    """Draw every parameter (and float buffer) from ``gen``: N(0, scale^2 / fan_in)."""
    model.to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p.shape[-1] if p.dim() >= 2 else p.shape[0]
            if p.dim() == 4:  # conv weight (out, in, kh, kw)
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
            std = scale / math.sqrt(fan_in)
            if name.endswith("ln1.weight") or name.endswith("ln2.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, dtype=dtype))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen, dtype=dtype))
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.copy_(0.5 + torch.rand(b.shape, generator=gen, dtype=dtype))
    return model


def _ce(z: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(z.unsqueeze(0), y.unsqueeze(0), reduction="sum")


def _token_ce(z: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(z, y, ignore_index=IGNORE_INDEX, reduction="sum")


def _mse(z: Tensor, y: Tensor) -> Tensor:
    return 0.5 * F.mse_loss(z, y, reduction="sum")


def _finish(name, model, inputs, targets, loss_fn, ref_loss, dtype) -> Case:
    model.eval()  # no dropout/batch-norm here anyway; make the choice explicit
    return Case(name, model, trainable_params(model), inputs, targets, loss_fn, ref_loss, dtype)


# ---------------------------------------------------------------- builders


def _mlp_ce(dtype: torch.dtype) -> Case:
    gen = torch.Generator().manual_seed(1001)
    model = _init_(MLP(6, 16, 4), gen, dtype, scale=1.5)
    x = torch.randn(6, 6, generator=gen, dtype=dtype)
    y = torch.randint(0, 4, (6,), generator=gen)
    return _finish("mlp_ce", model, x, y, CrossEntropy(), _ce, dtype)


def _cnn_ce(dtype: torch.dtype) -> Case:
    gen = torch.Generator().manual_seed(1002)
    model = _init_(SmallCNN(3), gen, dtype, scale=1.5)
    x = torch.randn(5, 1, 6, 6, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (5,), generator=gen)
    return _finish("cnn_ce", model, x, y, CrossEntropy(), _ce, dtype)


def _transformer_tokce(dtype: torch.dtype) -> Case:
    gen = torch.Generator().manual_seed(1003)
    model = _init_(TinyEncoder(vocab=7, d=8, t=5, n_classes=7), gen, dtype, scale=1.0)
    n, t = 4, 5
    lengths = torch.tensor([5, 3, 4, 2])  # padding at the end of samples 1..3
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(torch.long)
    ids = torch.randint(1, 7, (n, t), generator=gen) * mask  # pad id 0
    y = torch.randint(0, 7, (n, t), generator=gen)
    y = torch.where(mask.bool(), y, torch.full_like(y, IGNORE_INDEX))
    return _finish(
        "transformer_tokce", model, {"ids": ids, "mask": mask}, y, TokenCrossEntropy(IGNORE_INDEX), _token_ce, dtype
    )


def _mlp_mse(dtype: torch.dtype) -> Case:
    gen = torch.Generator().manual_seed(1004)
    model = _init_(MLP(5, 10, 3), gen, dtype, scale=1.5)
    x = torch.randn(6, 5, generator=gen, dtype=dtype)
    y = torch.randn(6, 3, generator=gen, dtype=dtype)
    return _finish("mlp_mse", model, x, y, MSE(), _mse, dtype)


def _frozen_ce(dtype: torch.dtype) -> Case:
    gen = torch.Generator().manual_seed(1005)
    model = _init_(FrozenFirstLayer(6, 12, 4), gen, dtype, scale=1.5)
    x = torch.randn(5, 6, generator=gen, dtype=dtype)
    y = torch.randint(0, 4, (5,), generator=gen)
    return _finish("frozen_ce", model, x, y, CrossEntropy(), _ce, dtype)


_BUILDERS: dict[str, Callable[[torch.dtype], Case]] = {
    "mlp_ce": _mlp_ce,
    "cnn_ce": _cnn_ce,
    "transformer_tokce": _transformer_tokce,
    "mlp_mse": _mlp_mse,
    "frozen_ce": _frozen_ce,
}

CASE_NAMES: tuple[str, ...] = tuple(_BUILDERS)
CASES = CASE_NAMES  # alias


def make_case(name: str, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> Case:
    """A fresh case (new module, new tensors) built from its fixed seed in ``dtype``.

    The float32 and float64 variants of a case hold the same numbers up to
    rounding (both are drawn in float64 on the CPU and cast), so their
    directions can be compared; ``device`` moves the model and batch.
    """
    case = _BUILDERS[name](torch.float64)
    if dtype == torch.float64 and torch.device(device).type == "cpu":
        return case

    def move(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    case.model.to(device=device, dtype=dtype)
    inputs = {k: move(v) for k, v in case.inputs.items()} if isinstance(case.inputs, dict) else move(case.inputs)
    return Case(
        case.name, case.model, trainable_params(case.model), inputs, move(case.targets), case.loss_fn, case.ref_loss, dtype
    )

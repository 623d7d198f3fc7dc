"""Which per-sample loss the preconditioner uses, from what the user names.

iEF needs PER-SAMPLE losses l_n with closed-form logit gradients (s_n =
||dl_n/dz_n||^2). The user may name the loss in any of these ways:

===============================================  ==============================================
user's loss                                      per-sample loss l_n (the project's)
===============================================  ==============================================
"cross_entropy", nn.CrossEntropyLoss(),          softmax CE of sample n; logits (N, C), labels (N,)
F.cross_entropy
  ... with logits (N, T, C) and labels (N, T)    SUM over sample n's tokens whose label is not
  (token level; ignore_index honoured)           ignore_index (padding contributes nothing)
"token_cross_entropy"                            the same, explicitly
"mse", nn.MSELoss(), F.mse_loss                  0.5 ||z_n - y_n||^2
a project loss (iefcli.core.CrossEntropy, ...)   itself
===============================================  ==============================================

The REDUCTION the user's backward used does not change the method: any loss
equal to c * sum_n l_n for a constant c (torch's "mean" over samples, c = 1/N;
Hugging Face's token mean over the batch, c = 1/(number of non-ignored
tokens); "sum", c = 1; MSELoss's mean over all elements, c = 2/(N D); a
GradScaler's loss scale on top) gives the same rows once divided by c, and the
preconditioner measures c from the gradient that reaches the logits. A loss
that is NOT a constant multiple of sum_n l_n (label smoothing, class weights,
a per-sample mean of token losses) is refused with one line: it would be a
different method.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn

from iefcli.core.losses import LOSSES, MSE, CrossEntropy, Loss, TokenCrossEntropy
from iefcli.errors import ModelError

__all__ = ["LossSpec", "resolve_loss"]

_NAMES = {"cross_entropy": "ce", "ce": "ce", "crossentropy": "ce", "f.cross_entropy": "ce",
          "token_cross_entropy": "token", "mse": "mse", "mse_loss": "mse", "f.mse_loss": "mse"}


class LossSpec:
    """The resolved loss: ``kind`` ("ce" | "token" | "mse" | "custom") and ``ignore_index``.

    :meth:`for_logits` picks the project loss for the logits' shape (CE on (N, T, C)
    logits with (N, T) labels is token level).
    """

    def __init__(self, kind: str, ignore_index: int = -100, loss: Loss | None = None):
        self.kind, self.ignore_index, self._loss = kind, ignore_index, loss

    def for_logits(self, logits_dim: int, targets_dim: int) -> Loss:
        if self._loss is not None:
            return self._loss
        if self.kind == "mse":
            return MSE()
        if self.kind == "token" or (logits_dim == 3 and targets_dim == 2):
            return TokenCrossEntropy(self.ignore_index)
        if logits_dim != 2:
            raise ModelError(f"cross-entropy needs logits (N, C) or (N, T, C) with labels (N,) or (N, T); "
                             f"got logits with {logits_dim} dims and labels with {targets_dim}")
        return CrossEntropy()

    def __repr__(self) -> str:
        return f"LossSpec({self.kind!r}, ignore_index={self.ignore_index})"


def _refuse(what: Any, why: str) -> ModelError:
    return ModelError(f"loss {what!r}: {why}; the preconditioner supports cross_entropy (also token level with "
                      "ignore_index), token_cross_entropy and mse, by name, as torch.nn modules or functions")


def resolve_loss(loss: Any) -> LossSpec:
    """The user's loss (name, torch module, torch function or project loss) -> :class:`LossSpec`."""
    if loss is None:
        return LossSpec("ce")
    if isinstance(loss, str):
        kind = _NAMES.get(loss.lower())
        if kind is None:
            raise _refuse(loss, "unknown loss name")
        return LossSpec(kind)
    if loss is F.cross_entropy:
        return LossSpec("ce")
    if loss is F.mse_loss:
        return LossSpec("mse")
    if isinstance(loss, nn.CrossEntropyLoss):
        if loss.weight is not None:
            raise _refuse(loss, "class weights make the loss a different method (not a sum of per-sample CE)")
        if loss.label_smoothing:
            raise _refuse(loss, "label smoothing changes the per-sample loss and its logit gradient")
        if loss.reduction == "none":
            raise _refuse(loss, "reduction='none' gives no scalar to backward; use 'mean' or 'sum'")
        return LossSpec("ce", ignore_index=loss.ignore_index)
    if isinstance(loss, nn.MSELoss):
        if loss.reduction == "none":
            raise _refuse(loss, "reduction='none' gives no scalar to backward; use 'mean' or 'sum'")
        return LossSpec("mse")
    if isinstance(loss, (CrossEntropy, TokenCrossEntropy, MSE)) or type(loss) in LOSSES.values():
        return LossSpec(getattr(loss, "name", "custom"), getattr(loss, "ignore_index", -100), loss)
    if all(hasattr(loss, a) for a in ("per_sample", "logit_grad", "sample")):
        return LossSpec("custom", loss=loss)  # any object following iefcli.core.losses.Loss
    raise _refuse(loss, "not a supported loss (iEF needs per-sample losses with closed-form logit gradients)")

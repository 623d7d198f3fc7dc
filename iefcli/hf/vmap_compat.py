"""The one place that makes transformers models safe to run under ``torch.func.vmap``.

iefcli computes per-sample gradients by vmapping a single-sample forward over
the batch (:func:`iefcli.core.batch_grads`). Two things in transformers 5.x /
peft break under that transform; both are handled here and nowhere else.

1. **Padding masks.** ``transformers.masking_utils`` decides whether it may
   skip building an attention mask by asking ``padding_mask.all()`` (encoders:
   ``_ignore_bidirectional_mask_sdpa``; decoders: ``_ignore_causal_mask_sdpa``).
   Under vmap that is data-dependent Python control flow and raises. The
   answer only selects between two equivalent computations (no mask vs. an
   all-True mask), so :func:`install_mask_patch` wraps both helpers: when the
   mask is a functorch-wrapped tensor (inside vmap/grad) they answer False,
   "build the mask", which is always correct; otherwise they defer to the
   original. Ordinary (non-transformed) calls are unchanged.

2. **Dropout.** Random ops under vmap need ``randomness="different"``, and
   then each sample gets its own dropout mask, so the per-sample rows would
   no longer be the gradients of the batched forward (and the randomness
   would come from torch's global RNG, not an explicit generator). iefcli's
   HF models are therefore built with every dropout probability set from the
   recipe, default 0.0 (:data:`DEFAULT_DROPOUT`), which makes train and eval
   mode identical and keeps the per-sample passes deterministic.
   :func:`active_dropout` lists modules that would still draw random numbers,
   so callers can refuse or choose ``randomness`` deliberately.

:func:`hf_forward` is the forward function the HF model kinds hand to the
core: it installs the patch (idempotent) and unwraps ``.logits``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from iefcli.core.jacobian import default_forward
from iefcli.core.params import Params

DEFAULT_DROPOUT = 0.0

_PATCHED_ATTR = "_iefcli_vmap_safe"
_MASK_HELPERS = ("_ignore_bidirectional_mask_sdpa", "_ignore_causal_mask_sdpa")


def _is_transformed(t: Any) -> bool:
    """True for a tensor wrapped by a functorch transform (vmap's BatchedTensor, grad's wrapper)."""
    return isinstance(t, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t)


def _vmap_safe(original):
    @functools.wraps(original)
    def wrapper(padding_mask, *args, **kwargs):
        if _is_transformed(padding_mask):
            return False  # build the (equivalent) explicit mask: no data-dependent branch
        return original(padding_mask, *args, **kwargs)

    setattr(wrapper, _PATCHED_ATTR, True)
    return wrapper


def install_mask_patch() -> None:
    """Wrap transformers' mask-skipping helpers so that they never branch on a
    vmapped tensor. Idempotent; a helper missing in some transformers version is skipped."""
    from transformers import masking_utils

    for name in _MASK_HELPERS:
        original = getattr(masking_utils, name, None)
        if original is not None and not getattr(original, _PATCHED_ATTR, False):
            setattr(masking_utils, name, _vmap_safe(original))


def active_dropout(model: nn.Module) -> list[str]:
    """Names of dropout modules that are in training mode with p > 0 (they would draw random numbers)."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
    ]


def set_dropout(config: Any, p: float) -> None:
    """Set every dropout probability a transformers config knows about to ``p`` (in place)."""
    for key in (
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "classifier_dropout",
        "dropout_rate",  # T5
        "dropout",
        "attention_dropout",
        "activation_dropout",
    ):
        if hasattr(config, key):
            setattr(config, key, p)


def hf_forward(model: nn.Module, params: Params, inputs: Any) -> Tensor:
    """forward(model, params, inputs) -> logits for transformers/peft models.

    ``inputs`` is the dict of keyword tensors (input_ids, attention_mask, ...;
    leading dim N). Encoder classifiers give (N, C); seq2seq models given
    ``decoder_input_ids`` give (N, T, V). Safe under vmap (see module docstring).
    """
    install_mask_patch()
    return default_forward(model, params, inputs)

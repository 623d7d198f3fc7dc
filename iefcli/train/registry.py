"""Model and data kinds, as LAZY import strings ("module:function").

A recipe's ``model.kind`` / ``data.kind`` picks an entry; the module is only
imported when a recipe asks for it, so the core never imports transformers.
Other packages (e.g. ``iefcli.hf``) add lines to these dicts.

Builder signatures
------------------
Data builder::

    build(section: dict, ctx: BuildContext) -> DataSplits

``section`` is the recipe's ``data`` mapping (with ``kind``); the builder
checks its own keys (:func:`iefcli.train.recipe.check_keys`) and raises
:class:`iefcli.errors.UsageError` with the dotted key (``data.path: ...``) and
the recipe file (``ctx.recipe.error(key, msg)``). It returns
:class:`iefcli.train.data.DataSplits`: ``train``/``val``/``test`` splits
(inputs: Tensor | tuple | dict with leading dim N; targets: Tensor (N, ...)),
on the CPU, plus a :class:`iefcli.train.data.DataInfo` (input shape, number
of outputs, default loss, metric names, the primary metric and its mode).

Model builder::

    build(section: dict, ctx: BuildContext) -> nn.Module | (nn.Module, forward)

``section`` is the recipe's ``model`` mapping without ``init_from`` (handled
by :func:`iefcli.train.task.build_task`); ``ctx.data`` is the DataInfo. The
module's trainable parameters have ``requires_grad=True`` (frozen ones
False). It is built on the CPU under a seeded RNG and then moved to
``ctx.device`` / ``ctx.dtype`` by the caller. An optional
``forward(model, params, inputs) -> logits`` replaces
:func:`iefcli.core.default_forward`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

MODEL_KINDS: dict[str, str] = {
    "mlp": "iefcli.train.models:build_mlp",
    "linear": "iefcli.train.models:build_linear",
    "hf": "iefcli.hf.models:build_hf",
}

DATA_KINDS: dict[str, str] = {
    "digits": "iefcli.train.data:build_digits",
    "fashion_mnist": "iefcli.train.data:build_fashion_mnist",
    "toy_lsq": "iefcli.train.data:build_toy_lsq",
    "tabular": "iefcli.train.tabular:build_tabular",
    "image_folder": "iefcli.train.tabular:build_image_folder",
    "text": "iefcli.hf.text:build_text",
    "mnist5k": "iefcli.train.data:build_mnist5k",
}


@dataclass
class BuildContext:
    """What a builder may use besides its own recipe section."""

    recipe: Any  # iefcli.train.recipe.Recipe
    device: torch.device
    dtype: torch.dtype
    seed: int
    data: Any = None  # iefcli.train.data.DataInfo (model builders only)


def load_builder(table: dict[str, str], kind: str) -> Callable[..., Any]:
    """Import ``module:function`` for ``kind`` (a KeyError for unknown kinds: the recipe checks first).

    A kind that is itself an import path (``my_package.models:build_cnn``) gets the
    adapter of :mod:`iefcli.train.user_kinds` for its table."""
    if kind not in table and ":" in kind:
        from iefcli.train.user_kinds import builder_for

        return builder_for("model" if table is MODEL_KINDS else "data")
    module, _, func = table[kind].partition(":")
    return getattr(importlib.import_module(module), func)

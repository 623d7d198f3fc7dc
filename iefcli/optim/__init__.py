"""Pure optimisers: ONE registry, ONE contract (see :mod:`iefcli.optim.base`).

``make_optimizer(config, model=..., loss_fn=..., forward=...)`` builds one by
``config.name``; :data:`DEFAULTS` gives the lr / damping / weight decay used
when a recipe leaves them null.
"""

from __future__ import annotations

from typing import Any, Mapping

from iefcli.core.jacobian import Forward, default_forward
from iefcli.core.losses import Loss
from iefcli.core.methods import CURVATURE_METHODS
from iefcli.optim.base import ModelFn, OptimConfig, Optimizer, State, finish_step
from iefcli.optim.curvature import CurvatureOptimizer
from iefcli.optim.torch_optims import TorchOptimizer

REGISTRY = {
    "sgd": TorchOptimizer,
    "adamw": TorchOptimizer,
    "adafactor": TorchOptimizer,
    "ef": CurvatureOptimizer,
    "sf": CurvatureOptimizer,
    "ief": CurvatureOptimizer,
    "ngd": CurvatureOptimizer,
}

# Defaults for null recipe values, per optimiser, on the PAPER's scale (see
# iefcli.core.methods and docs/train.md): lr on MEAN-loss gradients, damping added
# to the Gram of the mean-loss per-sample gradients. The curvature ones were checked
# on the digits MLP at batch 64; they are the former mean-loss-scale values converted
# at N = 64 (damping / 64^2; ef/sf/ngd lr / 64^2; iEF's lr unchanged).
DEFAULTS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 0.1, "damping": 0.0, "weight_decay": 0.0},
    "adamw": {"lr": 1e-3, "damping": 0.0, "weight_decay": 0.01},
    "adafactor": {"lr": 1e-2, "damping": 0.0, "weight_decay": 0.0},
    "ef": {"lr": 3.0 / 64**2, "damping": 1e-2 / 64**2, "weight_decay": 0.0},
    "sf": {"lr": 2.0 / 64**2, "damping": 1.0 / 64**2, "weight_decay": 0.0},
    "ief": {"lr": 50.0, "damping": 1e-7 / 64**2, "weight_decay": 0.0},
    "ngd": {"lr": 5.0 / 64**2, "damping": 1.0 / 64**2, "weight_decay": 0.0},
}

from iefcli.kfac import METHODS as _KFAC_METHODS, register as _register_kfac  # noqa: E402

_register_kfac()  # kfac / ekfac / iekfac: REGISTRY, DEFAULTS and the method table

# The optimisers that precondition with curvature (damping in summary.json, unused-parameter check).
CURVATURE = CURVATURE_METHODS + tuple(_KFAC_METHODS)


def config_from_recipe(section: Mapping[str, Any]) -> OptimConfig:
    """The recipe's ``optimizer`` section -> OptimConfig, nulls replaced by DEFAULTS."""
    name = section["name"]
    d = DEFAULTS[name]
    kw = {k: section[k] for k in OptimConfig.__dataclass_fields__ if k in section}
    for k in ("lr", "damping", "weight_decay"):
        if kw.get(k) is None:
            kw[k] = d[k]
    kw["betas"] = tuple(kw.get("betas", (0.9, 0.999)))
    return OptimConfig(**kw)


def make_optimizer(config: OptimConfig, *, model, loss_fn: Loss, forward: Forward = default_forward) -> Optimizer:
    try:
        cls = REGISTRY[config.name]
    except KeyError:
        raise ValueError(f"unknown optimizer {config.name!r}; choose one of {', '.join(REGISTRY)}") from None
    return cls(config, ModelFn(model, loss_fn, forward))


__all__ = ["REGISTRY", "DEFAULTS", "CURVATURE", "OptimConfig", "Optimizer", "State", "ModelFn",
           "config_from_recipe", "make_optimizer", "finish_step"]

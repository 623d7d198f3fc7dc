"""K-FAC, eK-FAC and ieK-FAC (eK-FAC with iEF's scaling) on iefcli's core.

- :mod:`iefcli.kfac.factors`: the per-layer maths as pure functions of tensors;
- :mod:`iefcli.kfac.capture`: module hooks that record layer inputs and output gradients;
- :mod:`iefcli.kfac.optim`: the optimisers ``kfac``, ``ekfac``, ``iekfac`` (pure contract of
  :mod:`iefcli.optim.base`) and the stateless one-batch direction used by eval-gamma.

:func:`register` adds the three to the optimiser registry (and to the method table when
:mod:`iefcli.core.methods` exists). Damping and lr are on the paper's scale: docs/kfac.md.
"""

from __future__ import annotations

from iefcli.kfac.optim import METHODS, KFACOptimizer, KFACOptions, fisher_for, kfac_direction, options_from

__all__ = ["fisher_for", "METHODS", "KFACOptimizer", "KFACOptions", "kfac_direction", "options_from", "register", "DEFAULTS"]

# lr on mean-loss gradients, paper-scale damping (see docs/kfac.md: measured on the digits MLP, batch 64).
DEFAULTS: dict[str, dict[str, float]] = {
    "kfac": {"lr": 2e-3, "damping": 1e-3, "weight_decay": 0.0},
    "ekfac": {"lr": 2e-3, "damping": 1e-3, "weight_decay": 0.0},
    "iekfac": {"lr": 0.3, "damping": 1e-3, "weight_decay": 0.0},
}


def _method_fn(name: str, **overrides):
    """A method-table entry: (bg, damping, generator, options) -> (d (P,), info), factors and
    diagonal from bg's batch only (stateless), paper-scale damping and direction (powers 0)."""

    def fn(bg, damping, generator=None, options=None):
        jac = bg.jac
        for attr in ("model", "params", "inputs", "forward"):
            if not hasattr(jac, attr):
                raise TypeError(f"{name}: needs a Jacobian that keeps {attr} (vmap or fast path)")
        return kfac_direction(name, jac.model, jac.params, jac.inputs, bg.targets, bg.loss_fn, jac.forward,
                              damping, generator=generator, options=options_from(options, **overrides))

    fn.__name__ = f"{name}_direction"
    return fn


def register(**overrides) -> None:
    """Add kfac/ekfac/iekfac to iefcli.optim's REGISTRY and DEFAULTS, and to the method table
    (``iefcli.core.methods.register_method``) when it exists. Idempotent.

    ``overrides``: KFACOptions fields for the method-table entries (e.g. fisher_type="empirical");
    given, they replace entries already registered."""
    import iefcli.optim as optim

    for name in METHODS:
        optim.REGISTRY.setdefault(name, KFACOptimizer)
        optim.DEFAULTS.setdefault(name, dict(DEFAULTS[name]))
    try:
        from iefcli.core import methods
    except ImportError:
        return
    for name in METHODS:
        if name not in methods.METHODS or overrides:
            random = fisher_for(name, options_from(None, **overrides)) == "sampled"  # draws labels
            methods.register_method(name, _method_fn(name, **overrides), random=random, replace=True)

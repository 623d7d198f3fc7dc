"""One table: method name -> update direction, on the PAPER's scale.

Every caller that turns a batch into a direction (the optimisers, eval-gamma,
the Figure-1 toy, ``ief bench``, the preconditioner, K-FAC) goes through
:func:`compute_direction`; no other module maps a method name to a formula or
hard-codes a tuple of method names (use the family tuples below).

Scale (the user-facing meaning of damping and direction, as in the authors'
code, so a paper hyperparameter can be typed in unchanged). The authors use
per-sample gradients of the MEAN loss, rows j_n = grad(l_n) / N, the mean
gradient g, and s_a = s / N^2. With J the UNSCALED per-sample gradients (the
core's internal convention, :mod:`iefcli.directions`) and lam the user's
damping:

- ``ief``: J_a^T (J_a J_a^T + lam I)^{-1} s_a   = internal ief at damping N^2 lam
- ``ef``:  J_a^T (J_a J_a^T + lam I)^{-1} 1     = N^2 * internal ef at damping N^2 lam
- ``sf``:  (Jhat_a^T Jhat_a + lam I)^{-1} g     = N^2 * internal sf at damping N^2 lam
- ``ngd``: (G / N^2 + lam I)^{-1} g, G the GGN of the SUMMED loss
                                                = N^2 * internal ngd at damping N^2 lam
- ``sgd``: g (no damping)

N is the batch size of the Gram (``bg.n``). The conversion is written once,
in :func:`compute_direction`, from each :class:`Method`'s two powers of N.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import Tensor

# iefcli.directions and the samplers are imported inside the table's functions, so that the
# core's lower modules may import this module's defaults (DUP_THRESHOLD, ...) without a cycle.

DUP_THRESHOLD = 0.99
"""ef/ief: of two rows with |cos| > this, the smaller is dropped (the authors' filter)."""

CG_MAXITER = 500
"""ngd by conjugate gradients: the iteration cap. CG stops at its tolerance first on
well-conditioned systems, so the cap only binds where a smaller one would return a
wrong direction (small damping); 500 is what eval-gamma has always used."""

NGD_EXACT_MAX_ROWS = 2048
"""ngd "auto": the exact dual solve up to this many rows (N * K), CG above."""


@dataclass(frozen=True)
class MethodOptions:
    """Every per-method option and its ONE default (recipes, CLI and library read them here).

    dup_threshold: ef/ief duplicate-row filter (None: off). SF never filters: repeated
                   label draws are Monte-Carlo weight, and its damping is > 0.
    mc_samples:    sf: labels drawn per sample (k; rows scaled by 1/sqrt(k)).
    ngd_method:    ngd: "auto" (the exact (N*K)-sized dual solve up to ngd_exact_max_rows
                   rows, CG above), "exact", "cg" (matrix-free) or "dense" (P x P; tiny models).
    ngd_exact_max_rows: ngd "auto": the largest dual system solved exactly.
    cg_check_every: ngd by CG: read the convergence flag every this many iterations
                   (None: never, no host read at all).
    cg_tol:        ngd by CG: relative residual tolerance (None: 1e-10 in float64, 1e-5 in float32).
    cg_maxiter:    ngd by CG: iteration cap.
    """

    dup_threshold: float | None = DUP_THRESHOLD
    mc_samples: int = 1
    ngd_method: str = "auto"
    ngd_exact_max_rows: int = NGD_EXACT_MAX_ROWS
    cg_check_every: int | None = 10
    cg_tol: float | None = None
    cg_maxiter: int = CG_MAXITER


DirectionFn = Callable[[Any, float, "torch.Generator | None", MethodOptions], "tuple[Tensor, dict[str, Tensor]]"]


@dataclass(frozen=True)
class Method:
    """One row of the table.

    fn(bg, damping, generator, options) -> (d, diagnostics): ``damping`` is the user's
    damping times N**damping_power; the user-facing direction is d times
    N**direction_power. (Both 0: ``fn`` works on the user's scale directly.)
    ``needs_damping`` : the user's damping must be > 0 (it divides by it).
    ``random``: the direction draws from ``generator`` (a None generator then uses
    torch's default one).
    ``draw``: for a random method, draw(bg, generator, options) -> what it drew (SF: the
    sampled rows); ``fn`` then receives that draw in the generator's place, so that one
    draw can serve several dampings (:func:`draw_for`, ``compute_direction(draw=...)``).
    """

    name: str
    fn: DirectionFn
    damping_power: int = 0
    direction_power: int = 0
    needs_damping: bool = False
    random: bool = False
    draw: Callable[[Any, "torch.Generator | None", MethodOptions], Any] | None = None


def _solve_diag(info) -> dict[str, Tensor]:
    return {"solve_residual": info.residual, "rows_kept": info.rows_kept,
            "cond_estimate": info.cond, "solve_fallback": info.fallback}


def _sgd(bg, damping, generator, options):
    return bg.g, {}


def _ef(bg, damping, generator, options):
    from iefcli import directions

    d, info = directions.ef(bg.rows, damping, dup_threshold=options.dup_threshold, return_info=True)
    return d, _solve_diag(info)


def _ief(bg, damping, generator, options):
    from iefcli import directions

    d, info = directions.ief(bg.rows, bg.s, damping, dup_threshold=options.dup_threshold, return_info=True)
    return d, _solve_diag(info)


def _sf_draw(bg, generator, options):
    """SF's randomness: the k sampled-label rows of the batch (one backward)."""
    from iefcli.core.jacobian import sampled_rows

    # A diverged step leaves NaN/Inf logits, on which sampling would raise; sample from
    # finite stand-ins instead (the caller rejects the step: its loss is not finite).
    safe = SimpleNamespace(logits=torch.nan_to_num(bg.logits, nan=0.0, posinf=0.0, neginf=0.0),
                           targets=bg.targets, loss_fn=bg.loss_fn, jac=bg.jac)
    return sampled_rows(safe, options.mc_samples, generator)


def _sf(bg, damping, rows, options):
    from iefcli import directions

    d, info = directions.sf(rows, bg.g, damping, return_info=True)
    return d, _solve_diag(info)


def _ngd(bg, damping, generator, options):
    from iefcli import directions

    d, info = directions.ngd(bg, damping, method=options.ngd_method, tol=options.cg_tol,
                             maxiter=options.cg_maxiter, exact_max_rows=options.ngd_exact_max_rows,
                             check_every=options.cg_check_every, return_info=True)
    dev = d.device
    return d, {"cg_iterations": torch.as_tensor(info.iterations, device=dev),
               "cg_residual": torch.as_tensor(info.residual, dtype=torch.float64, device=dev),
               "cg_converged": torch.as_tensor(info.converged, device=dev)}


METHODS: dict[str, Method] = {
    "sgd": Method("sgd", _sgd),
    "ef": Method("ef", _ef, damping_power=2, direction_power=2),
    "ief": Method("ief", _ief, damping_power=2, direction_power=0),
    "sf": Method("sf", _sf, damping_power=2, direction_power=2, needs_damping=True, random=True, draw=_sf_draw),
    "ngd": Method("ngd", _ngd, damping_power=2, direction_power=2),
}

# Families (tuples in table order; no other module spells these out).
CURVATURE_METHODS: tuple[str, ...] = ("ef", "ief", "sf", "ngd")
"""Directions that solve with curvature (an optimiser of the same name exists for each)."""
GRAM_METHODS: tuple[str, ...] = ("ef", "ief", "sf")
"""Directions from a damped N x N Gram solve (solve_residual, rows_kept, ... diagnostics)."""
BENCH_METHODS: tuple[str, ...] = ("sgd", "ef", "ief", "sf")
"""What ``ief bench`` times by default (ngd by CG is not a per-step candidate)."""
EVAL_METHODS: tuple[str, ...] = ("sgd", "ef", "ief", "sf", "ngd")
"""What eval-gamma can score."""


def register_method(name: str, fn: DirectionFn, *, damping_power: int = 0, direction_power: int = 0,
                    needs_damping: bool = False, random: bool = False, replace: bool = False) -> Method:
    """Add a row to :data:`METHODS` (e.g. ``kfac``). With the default powers ``fn`` receives
    the user's damping unchanged and returns the user-facing direction."""
    if name in METHODS and not replace:
        raise ValueError(f"method {name!r} is already registered")
    m = Method(name, fn, damping_power, direction_power, needs_damping, random)
    METHODS[name] = m
    return m


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def internal_damping(name: str, damping: float, n: int) -> float:
    """The damping ``name``'s table function receives for the user's ``damping`` at batch size n."""
    return float(damping) * float(n) ** get_method(name).damping_power


def draw_for(name: str, bg, *, generator: torch.Generator | None = None,
             options: MethodOptions | None = None) -> Any:
    """Method ``name``'s random draw on the batch ``bg`` (None for a method without one),
    to pass as ``compute_direction(..., draw=...)`` at several dampings: the same draw,
    made once (eval-gamma's damping sweep)."""
    m = get_method(name)
    if m.draw is None:
        return None
    return m.draw(bg, generator, options if options is not None else MethodOptions())


def compute_direction(
    name: str,
    bg,
    damping: float,
    *,
    generator: torch.Generator | None = None,
    options: MethodOptions | None = None,
    draw: Any = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The (P,) direction of method ``name`` on the batch ``bg`` at the user's (paper-scale)
    ``damping``, and its diagnostics (0-d device tensors; nothing is read to the host here).

    ``bg``: a :class:`iefcli.core.jacobian.BatchGrads` (or anything with its attributes).
    ``generator``: the randomness of ``sf``'s label draws (pass one for reproducible steps).
    ``draw``: a :func:`draw_for` result of the same method and batch to reuse instead of
    drawing from ``generator``.
    """
    m = get_method(name)
    damping = float(damping)
    if not damping >= 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    if m.needs_damping and not damping > 0:
        raise ValueError(f"{name} needs damping > 0 (it divides by it), got {damping}")
    opts = options if options is not None else MethodOptions()
    n = float(bg.n)
    if m.draw is not None:
        third = draw if draw is not None else m.draw(bg, generator, opts)
    else:
        third = generator
    d, info = m.fn(bg, damping * n ** m.damping_power, third, opts)
    if m.direction_power:
        d = d * (n ** m.direction_power)
    return d, info


__all__ = ["DUP_THRESHOLD", "CG_MAXITER", "MethodOptions", "Method", "METHODS", "CURVATURE_METHODS",
           "GRAM_METHODS", "BENCH_METHODS", "EVAL_METHODS", "register_method", "get_method",
           "internal_damping", "draw_for", "compute_direction"]

"""The paper's evaluation framework: how close is each method's update to the natural gradient?

For one parameter point theta and a sequence of evaluation batches, every
requested method's direction d is computed at every damping lambda and scored by

    gamma(d) = sqrt(d^T G d) / (d^T g)          (:func:`iefcli.gamma.gamma`)
    ratio(d) = gamma(d) / gamma(g)              (below 1: closer to NG than SGD)

where g is the batch's mean-loss gradient and G its GGN (= Fisher). No Fisher is
inverted: d^T G d comes from one Jacobian-vector product. Optionally the exact
natural gradient d_NG = (G_sum / N^2 + lambda I)^{-1} g is added, together with
the cosine between each direction and d_NG at the same damping. Every direction
comes from the one method table, :func:`iefcli.core.methods.compute_direction`,
with lambda on the PAPER's scale.

Every row carries its direction's sanity: finite, and a descent direction
(d^T g > 0; else gamma is <= 0 or infinite and means nothing). A row that fails
is reported (``sanity``, ``cos_to_grad``, :func:`bad_rows`) and counted in
``n_bad``, never averaged into the statistics.

Everything here reuses the core: :func:`iefcli.core.batch_grads` is called ONCE
per batch and its rows / Gram matrix are shared by all methods and dampings; SF
sees the same label draw at every damping (the caller's generator is rewound to
the batch's state for each damping); the SGD direction and gamma(g) are
damping-independent and computed once per batch (the SGD row is repeated at every
damping so that tables and plots have their reference line at ratio 1).

This module is pure: no printing, no files, no clock, no hidden randomness.
Results come back as plain Python floats (the host reads happen here because
this is an evaluation, not a training hot path).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from iefcli.core import methods as method_table
from iefcli.core.jacobian import BatchGrads, Forward, batch_grads, default_forward
from iefcli.core.losses import Loss
from iefcli.core.stats import batch_imbalance
from iefcli.gamma import gamma
import iefcli.optim  # noqa: F401,E402  (registers kfac / ekfac / iekfac in the method table)

__all__ = [
    "METHODS",
    "DEFAULT_METHODS",
    "DEFAULT_DAMPINGS",
    "IMBALANCE_KEYS",
    "ROW_COLUMNS",
    "SUMMARY_KEYS",
    "GammaEval",
    "check_methods",
    "evaluate_gamma",
    "aggregate",
    "aggregate_imbalance",
    "bad_rows",
    "direction_sanity",
    "row_is_ok",
]

METHODS = method_table.EVAL_METHODS  # the built-ins; any name registered in core.methods.METHODS is accepted
DEFAULT_METHODS = ("sgd", "ef", "ief", "sf")
DEFAULT_DAMPINGS = (1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1.0)
IMBALANCE_KEYS = (
    "grad_norm_max_min",
    "grad_norm_top10_bottom10",
    "logit_grad_norm_max_min",
    "logit_grad_norm_top10_bottom10",
)
# One tidy row per (batch, method, damping); cos_to_ngd is None unless ngd was requested.
# sanity: "ok", "non-finite" (d or its gamma has a NaN/Inf) or "not-descent" (d^T g <= 0);
# cos_to_grad = d^T g / (|d| |g|), whose sign is the descent test (scale-free, unlike d^T g).
ROW_COLUMNS = (
    "batch", "method", "damping", "gamma", "gamma_ratio", "cos_to_ngd", "cos_to_grad", "sanity", *IMBALANCE_KEYS
)
SANITY_OK, SANITY_NONFINITE, SANITY_ASCENT = "ok", "non-finite", "not-descent"
SUMMARY_KEYS = (
    "method",
    "damping",
    "gamma_ratio_median",
    "gamma_ratio_mean",
    "gamma_ratio_iqr",
    "gamma_median",
    "cos_to_ngd_median",
    "n_batches",
    "n_bad",
)


@dataclass
class GammaEval:
    """The result of :func:`evaluate_gamma`.

    rows:       tidy rows, dicts with keys ROW_COLUMNS, batch-major, then method, then damping
                (every row carries its direction's sanity; see :func:`direction_sanity`)
    imbalance:  one dict per batch (IMBALANCE_KEYS -> float)
    summary:    :func:`aggregate` of the rows (one dict per method x damping)
    imbalance_summary: :func:`aggregate_imbalance` (median over batches)
    methods, dampings: as evaluated (deduplicated, in the caller's order)
    ngd_info:   per (batch, damping) CG diagnostics when ngd was requested
    """

    rows: list[dict[str, Any]]
    imbalance: list[dict[str, float]]
    summary: list[dict[str, Any]]
    imbalance_summary: dict[str, float]
    methods: tuple[str, ...]
    dampings: tuple[float, ...]
    ngd_info: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_batches(self) -> int:
        return len(self.imbalance)

    @property
    def bad_rows(self) -> list[dict[str, Any]]:
        """The rows whose direction failed the sanity check (left out of ``summary``)."""
        return bad_rows(self.rows)


def check_methods(methods: Iterable[str], dampings: Iterable[float]) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Validate and deduplicate (keeping order); raise ValueError with a one-line reason."""
    ms: list[str] = []
    for m in methods:
        m = m.strip().lower()
        if m not in method_table.METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(method_table.METHODS)}")
        if m not in ms:
            ms.append(m)
    if not ms:
        raise ValueError("no methods given")
    ds: list[float] = []
    for d in dampings:
        d = float(d)
        if not (math.isfinite(d) and d >= 0):
            raise ValueError(f"damping must be a finite number >= 0, got {d}")
        if d not in ds:
            ds.append(d)
    if not ds:
        raise ValueError("no damping values given")
    for m in ms:
        if method_table.get_method(m).needs_damping and 0.0 in ds:
            raise ValueError(f"{m} needs damping > 0 (its Woodbury form divides by the damping)")
    return tuple(ms), tuple(ds)


def _split_batch(batch: Any) -> tuple[Any, Tensor]:
    if hasattr(batch, "inputs") and hasattr(batch, "targets"):
        return batch.inputs, batch.targets
    inputs, targets = batch
    return inputs, targets


def _cos(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.to(torch.float64), b.to(torch.float64), dim=0))


def direction_sanity(finite: bool, cos_to_grad: float, gamma_value: float) -> str:
    """The per-row diagnostic: "non-finite" when the direction or its gamma has a NaN/Inf,
    "not-descent" when d^T g <= 0 (then gamma is <= 0 or infinite: meaningless), else "ok"."""
    if not finite or math.isnan(cos_to_grad):
        return SANITY_NONFINITE
    if not cos_to_grad > 0:
        return SANITY_ASCENT
    return SANITY_OK if math.isfinite(gamma_value) else SANITY_NONFINITE


def row_is_ok(row: dict[str, Any]) -> bool:
    """Whether a row enters the statistics: its sanity is ok AND its ratio a finite
    positive number (a hand-built row without a sanity field is judged by its ratio)."""
    r = row.get("gamma_ratio")
    return row.get("sanity", SANITY_OK) == SANITY_OK and r is not None and math.isfinite(r) and r > 0


def evaluate_gamma(
    *,
    model: nn.Module,
    params: dict[str, Tensor],
    loss_fn: Loss,
    batches: Iterable[Any],
    methods: Sequence[str] = DEFAULT_METHODS,
    dampings: Sequence[float] = DEFAULT_DAMPINGS,
    sf_samples: int = 1,
    generator: torch.Generator | None = None,
    forward: Forward = default_forward,
    max_batches: int | None = None,
    jacobian: str = "auto",
    chunk_size: int | None = None,
    dup_threshold: float | None = method_table.DUP_THRESHOLD,
    ngd_maxiter: int = 500,
    ngd_tol: float | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> GammaEval:
    """Score every method's direction by gamma at every damping, on every batch.

    model, params: the module and its TRAINABLE params dict (detached), as for
        :func:`iefcli.core.batch_grads`; ``forward(model, params, inputs) -> logits``.
    batches: an iterable of ``Batch(inputs, targets)`` or ``(inputs, targets)``;
        at most ``max_batches`` are used.
    methods: names in :data:`iefcli.core.methods.METHODS` (sgd, ef, ief, sf, ngd, and
        any registered one); every direction comes from
        :func:`iefcli.core.methods.compute_direction`. dampings: lambda >= 0 on the
        PAPER's scale (the authors' mean-loss convention, docs/DESIGN.md contract 2).
    sf_samples: k label draws per datum for SF, drawn from ``generator``
        (the only randomness; same generator state -> same result).
    ngd_maxiter / ngd_tol: the CG budget for ngd (see :func:`iefcli.directions.ngd`).
    on_batch: called with the number of batches done after each batch (progress).

    Returns a :class:`GammaEval`. Raises ValueError for bad methods/dampings or
    when ``batches`` yields nothing.
    """
    methods, dampings = check_methods(methods, dampings)
    if sf_samples < 1:
        raise ValueError(f"sf_samples must be >= 1, got {sf_samples}")
    random = [m for m in methods if method_table.get_method(m).random]
    if random and generator is None:
        raise ValueError(f"{random[0]} draws labels at random: pass an explicit torch.Generator")
    options = method_table.MethodOptions(
        dup_threshold=dup_threshold, mc_samples=sf_samples, cg_tol=ngd_tol, cg_maxiter=ngd_maxiter
    )
    rows: list[dict[str, Any]] = []
    imbs: list[dict[str, float]] = []
    ngd_info: list[dict[str, Any]] = []
    it = batches if max_batches is None else islice(batches, max_batches)
    for b, batch in enumerate(it):
        inputs, targets = _split_batch(batch)
        bg = batch_grads(
            model, params, inputs, targets, loss_fn, jacobian=jacobian, forward=forward, chunk_size=chunk_size
        )
        imb = {k: float(v) for k, v in batch_imbalance(torch.diagonal(bg.rows.gram()), bg.s).items()}
        imbs.append(imb)
        batch_rows, info = _one_batch(bg, methods, dampings, generator, options)
        for r in batch_rows:
            rows.append({"batch": b, **r, **imb})
        ngd_info.extend({"batch": b, **i} for i in info)
        del bg
        if on_batch is not None:
            on_batch(b + 1)
    if not imbs:
        raise ValueError("no evaluation batches (the data split is empty or smaller than one batch)")
    return GammaEval(
        rows=rows,
        imbalance=imbs,
        summary=aggregate(rows, methods, dampings),
        imbalance_summary=aggregate_imbalance(imbs),
        methods=methods,
        dampings=dampings,
        ngd_info=ngd_info,
    )


def _one_batch(
    bg: BatchGrads,
    methods: tuple[str, ...],
    dampings: tuple[float, ...],
    generator: torch.Generator | None,
    options: method_table.MethodOptions,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(method, damping, direction) for one batch, then gamma, ratio, cosines and sanity."""
    gamma_sgd = float(gamma(bg, bg.g))  # damping-independent: computed once
    dirs: dict[tuple[str, float], Tensor] = {}
    ngd_info: list[dict[str, Any]] = []
    # A random method (SF) sees the SAME label draw at every damping: a method with a
    # separate draw (SF's sampled rows) draws once and reuses it; any other random method
    # gets the generator rewound to this batch's state before each call. Either way the
    # generator is left after one draw.
    start = generator.get_state() if generator is not None else None
    end = None
    draws = {m: method_table.draw_for(m, bg, generator=generator, options=options)
             for m in methods if method_table.get_method(m).draw is not None}
    if draws:
        end = generator.get_state() if generator is not None else None
    for lam in dampings:
        for m in methods:
            meth = method_table.get_method(m)
            if meth.random and meth.draw is None:
                generator.set_state(start)
            d, info = _direction(m, bg, lam, generator=generator, options=options, draw=draws.get(m))
            if meth.random and meth.draw is None:
                end = generator.get_state()
            dirs[(m, lam)] = d
            if m == "ngd" and "cg_iterations" in info:  # by CG (an exact solve reports no CG)
                ngd_info.append({"damping": lam, "cg_iterations": int(info["cg_iterations"]),
                                 "cg_residual": float(info["cg_residual"]), "cg_converged": bool(info["cg_converged"])})
    if end is not None:
        generator.set_state(end)
    out: list[dict[str, Any]] = []
    for m in methods:
        for lam in dampings:
            d = dirs[(m, lam)]
            gam = gamma_sgd if m == "sgd" else float(gamma(bg, d))
            finite = bool(torch.isfinite(d).all())
            cos_g = _cos(d, bg.g)
            out.append(
                {
                    "method": m,
                    "damping": lam,
                    "gamma": gam,
                    "gamma_ratio": gam / gamma_sgd,
                    "cos_to_ngd": _cos(d, dirs[("ngd", lam)]) if "ngd" in methods else None,
                    "cos_to_grad": cos_g,
                    "sanity": direction_sanity(finite, cos_g, gam),
                }
            )
    return out, ngd_info


def _direction(m: str, bg: BatchGrads, lam: float, *, generator, options, draw=None) -> tuple[Tensor, dict[str, Tensor]]:
    """Method m's direction at the paper-scale damping lam, and its diagnostics: the one table."""
    return method_table.compute_direction(m, bg, lam, generator=generator, options=options, draw=draw)


def _quantile(sorted_x: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a sorted non-empty list."""
    pos = q * (len(sorted_x) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_x) - 1)
    frac = pos - lo
    if frac == 0:
        return sorted_x[lo]
    return sorted_x[lo] + (sorted_x[hi] - sorted_x[lo]) * frac


def _stats(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, median, q25, q75) of the values (the caller has already left out the bad
    rows: nothing is dropped silently here); NaN when there are none."""
    x = sorted(values)
    if not x:
        return (math.nan,) * 4
    mean = sum(x) / len(x)
    return mean, statistics.median(x), _quantile(x, 0.25), _quantile(x, 0.75)


def aggregate(
    rows: list[dict[str, Any]], methods: Sequence[str] | None = None, dampings: Sequence[float] | None = None
) -> list[dict[str, Any]]:
    """Per (method, damping) over batches: mean, median and inter-quartile range
    [25th, 75th percentile] (linear interpolation) of the gamma ratio; the median
    gamma and the median cosine to NG (None when ngd was not evaluated).

    Only the rows whose direction passed the sanity check (:func:`row_is_ok`:
    finite, d^T g > 0, a finite positive ratio) enter the statistics; the others are
    COUNTED in ``n_bad`` (and listed per row by the caller), never averaged in.
    n_batches counts every batch. Statistics over no good row are NaN.
    Order: methods, then dampings, in the given (or first-seen) order.
    """
    if methods is None:
        methods = list(dict.fromkeys(r["method"] for r in rows))
    if dampings is None:
        dampings = list(dict.fromkeys(r["damping"] for r in rows))
    out: list[dict[str, Any]] = []
    for m in methods:
        for lam in dampings:
            sel = [r for r in rows if r["method"] == m and r["damping"] == lam]
            if not sel:
                continue
            good = [r for r in sel if row_is_ok(r)]
            mean, med, q25, q75 = _stats([r["gamma_ratio"] for r in good])
            # (a NaN cosine comes from a bad NGD direction, which its own row already reports)
            cos = [r["cos_to_ngd"] for r in good if r.get("cos_to_ngd") is not None and not math.isnan(r["cos_to_ngd"])]
            out.append(
                {
                    "method": m,
                    "damping": lam,
                    "gamma_ratio_median": med,
                    "gamma_ratio_mean": mean,
                    "gamma_ratio_iqr": [q25, q75],
                    "gamma_median": _stats([r["gamma"] for r in good])[1],
                    "cos_to_ngd_median": _stats(cos)[1] if cos else None,
                    "n_batches": len({r["batch"] for r in sel}),
                    "n_bad": len(sel) - len(good),
                }
            )
    return out


def bad_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows left out of the statistics, with what identifies them and why."""
    keys = ("stage", "batch", "method", "damping", "sanity", "cos_to_grad", "gamma", "gamma_ratio")
    out = []
    for r in rows:
        if not row_is_ok(r):
            bad = {k: r[k] for k in keys if k in r}
            if bad.get("sanity", SANITY_OK) == SANITY_OK:  # judged by its ratio alone
                ratio = r.get("gamma_ratio")
                bad["sanity"] = SANITY_ASCENT if ratio is not None and ratio <= 0 else SANITY_NONFINITE
            out.append(bad)
    return out


def aggregate_imbalance(per_batch: list[dict[str, float]]) -> dict[str, float]:
    """The median over batches of each imbalance figure (robust to one extreme batch);
    NaN values (a degenerate batch) are left out."""
    return {
        k: _stats([b[k] for b in per_batch if not math.isnan(b[k])])[1]
        for k in IMBALANCE_KEYS
        if per_batch and k in per_batch[0]
    }

"""Figures as matplotlib :class:`~matplotlib.figure.Figure` objects, drawn headless, in ONE house style.

Each builder returns the Figure (tests inspect its axes and lines) and never
touches pyplot's global state: figures are created with an Agg canvas
attached, so nothing depends on, or changes, the user's backend or display.

The house style is defined once, here, and every figure of the project uses it
(``ief plot``, ``ief demo toy``, ``ief eval-gamma``): the font sizes in
:data:`STYLE` (applied to every artist by :func:`styled` builders; no builder
passes its own font size), the Okabe-Ito :data:`PALETTE`, and a fixed colour /
line style per method or optimiser (:func:`method_style`), so iEF is the same
blue in a training-curve plot and in a gamma plot. :func:`save_figure` writes a
figure atomically as PNG, PDF or SVG, chosen by the file's suffix.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

# Readable at README size: a 12-13 pt body on a ~10 inch wide figure.
STYLE = {
    "font.size": 12,
    "axes.titlesize": 13,
    "axes.labelsize": 12,
    "figure.titlesize": 13,
    "legend.fontsize": 10,
    "legend.title_fontsize": 10,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
}

# Okabe-Ito, distinguishable for colour-blind readers: the only colours the figures use.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
BLUE, VERMILLION, GREEN, PURPLE, ORANGE, SKY, YELLOW, BLACK = PALETTE
INK, CONTOUR = "#333333", "#3b5b7a"  # the two neutrals (arrows, contour lines), never a data series
LINESTYLES = ("-", "--", "-.", ":")

# A fixed colour and line style per method / optimiser, the same in every figure.
METHOD_STYLES: dict[str, tuple[str, str]] = {
    "sgd": (BLACK, "--"),
    "ef": (VERMILLION, "-"),
    "ief": (BLUE, "-"),
    "sf": (GREEN, "-"),
    "ngd": (PURPLE, ":"),
    "adamw": (ORANGE, "-"),
    "adafactor": (SKY, "-"),
}
_LABELS = {"ief": "iEF", "adamw": "AdamW", "adafactor": "Adafactor"}

FIGURE_FORMATS = ("png", "pdf", "svg")
"""The file types :func:`save_figure` writes, chosen by the path's suffix."""


def method_label(name: str) -> str:
    """How a method is named in legends and tables: iEF, EF, SF, NGD, SGD, AdamW, ..."""
    return _LABELS.get(name, name.upper())


def method_style(name: str, others: Sequence[str] = ()) -> tuple[str, str]:
    """(colour, line style) of a method or optimiser. Names without a fixed style take
    the palette colours no fixed style uses, in order of ``others`` (the other unknown
    names of the same figure), so two unknown names never share a colour."""
    if name in METHOD_STYLES:
        return METHOD_STYLES[name]
    used = {c for c, _ in METHOD_STYLES.values()}
    free = [c for c in PALETTE if c not in used] or list(PALETTE)
    unknown = [n for n in dict.fromkeys(others) if n not in METHOD_STYLES]
    k = unknown.index(name) if name in unknown else len(unknown)
    return free[k % len(free)], "-"


def new_figure(width: float, height: float) -> Figure:
    """A Figure with an Agg canvas (no pyplot, no display), in the house style."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_bytes(fig: Figure, fmt: str, *, dpi: int = 100) -> bytes:
    """The figure encoded as ``fmt`` (png, pdf or svg).

    PNGs are reduced to a 256-colour palette (no dithering): these figures hold
    few distinct colours, and it makes the files ~3x smaller (small enough to
    commit for the README). PDF and SVG carry no creation date, so the same
    figure gives the same bytes.
    """
    import matplotlib

    fmt = fmt.lower()
    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"figure format must be one of {', '.join(FIGURE_FORMATS)}, got {fmt!r}")
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    if fmt == "png":
        from PIL import Image

        old_dpi = fig.dpi
        fig.set_dpi(dpi)
        try:
            rgba, size = canvas.print_to_buffer()
        finally:
            fig.set_dpi(old_dpi)
        image = Image.frombuffer("RGBA", size, rgba, "raw", "RGBA", 0, 1).convert("RGB")
        image = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        buf = io.BytesIO()
        image.save(buf, format="PNG", optimize=True)
        return buf.getvalue()
    buf = io.BytesIO()
    metadata = {"CreationDate": None} if fmt == "pdf" else {"Date": None}
    with matplotlib.rc_context({"svg.hashsalt": "iefcli"}):
        fig.savefig(buf, format=fmt, dpi=dpi, metadata=metadata)
    return buf.getvalue()


def figure_format(path: Path | str) -> str:
    """The format :func:`save_figure` would write for ``path`` (its suffix); ValueError if unsupported."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"{path}: a figure file must end in {', '.join('.' + f for f in FIGURE_FORMATS)}")
    return fmt


def save_figure(fig: Figure, path: Path | str, *, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` as PNG, PDF or SVG by its suffix, atomically
    (the run directory's writer: temp file + os.replace, never half-written)."""
    from iefcli.train.rundir import atomic_write_bytes

    path = Path(path)
    data = figure_bytes(fig, figure_format(path), dpi=dpi)
    atomic_write_bytes(path, data)
    return path


def save_png(fig: Figure, path: Path, *, dpi: int = 100) -> None:
    """:func:`save_figure` for a .png path (kept for callers written before PDF/SVG)."""
    save_figure(fig, path, dpi=dpi)


def styled(fn):
    """Run a figure builder under STYLE so fonts apply to every artist it makes."""

    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    wrapper.__name__ = fn.__name__
    wrapper.__qualname__ = fn.__qualname__
    wrapper.__doc__ = fn.__doc__
    return wrapper


_styled = styled


# --------------------------------------------------------------------- toy ---


@_styled
def toy_figure(result) -> Figure:
    """The paper's Figure 1 from a :class:`iefcli.eval.toy.ToyResult`: three panels.

    Each panel (SGD, NGD / iEF, EF): filled log-spaced contours of the mean
    loss, the unit update field (arrows point along -d), the two per-sample
    optimal lines x_n . theta = y_n (dashed), the global minimum (star) and
    one trajectory per starting point (solid, start marked by a circle).
    Per panel the lines are: 2 dashed optimal lines + one per trajectory.
    """
    from iefcli.eval.toy import PANELS

    fine_x, fine_y, loss_grid = (t.numpy() for t in result.loss_grid)
    xs, ys = result.xs.numpy(), result.ys.numpy()
    gx, gy = np.meshgrid(xs, ys)
    x0, x1, y0, y1 = float(fine_x[0]), float(fine_x[-1]), float(fine_y[0]), float(fine_y[-1])
    lo = max(float(loss_grid.min()), 1e-4)
    levels = np.logspace(math.log10(lo), math.log10(float(loss_grid.max())), 14)
    star = result.problem.theta_star.numpy()

    fig = new_figure(13.5, 4.8)
    axes = fig.subplots(1, len(PANELS), sharex=True, sharey=True)
    for ax, (method, title) in zip(axes, PANELS):
        ax.contourf(fine_x, fine_y, np.clip(loss_grid, lo, None), levels=levels, norm=LogNorm(), cmap="Blues_r", alpha=0.55)
        ax.contour(fine_x, fine_y, np.clip(loss_grid, lo, None), levels=levels, norm=LogNorm(), colors=CONTOUR, linewidths=0.5)
        u = result.field[method].numpy()
        ax.quiver(gx, gy, u[..., 0], u[..., 1], color=INK, angles="xy", scale_units="xy",
                  scale=1.6 * len(xs) / (x1 - x0), width=0.004, pivot="mid")
        for n, (x_n, y_n) in enumerate(result.problem.optimal_lines()):
            a, b = float(x_n[0]), float(x_n[1])
            t = float(y_n)
            # x_n . theta = y_n; parametrise by whichever coordinate is better conditioned.
            if abs(b) >= abs(a):
                px = np.array([x0, x1])
                py = (t - a * px) / b
            else:
                py = np.array([y0, y1])
                px = (t - b * py) / a
            ax.plot(px, py, linestyle="--", color=(VERMILLION, PURPLE)[n % 2], linewidth=1.6,
                    label=f"sample {n + 1} optimal")
        for k, path in enumerate(result.trajectories[method]):
            p = path.numpy()
            ax.plot(p[:, 0], p[:, 1], "-", color=GREEN, linewidth=1.8, marker=".", markersize=3,
                    label="trajectories" if k == 0 else None)
            ax.scatter(p[:1, 0], p[:1, 1], s=30, color=GREEN, edgecolors="black", zorder=4)
        ax.scatter([star[0]], [star[1]], marker="*", s=260, color=ORANGE, edgecolors="black", zorder=5,
                   label="global minimum")
        lr = result.settings.lr[method]
        lam = result.settings.damping[method]
        final = float(result.final_loss[method].mean())
        ax.set_title(f"{title}\nlr {lr:g}, damping {lam:g}: mean final loss {final:.2g}")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_xlabel(r"$\theta_1$")
        ax.set_aspect("equal")
    axes[0].set_ylabel(r"$\theta_2$")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    return fig


# -------------------------------------------------------------------- runs ---


def run_labels(runs: Sequence) -> list[str]:
    """Legend labels: the optimiser; where two runs share it, add what differs (lr, damping, recipe, dir)."""
    labels = [r.optimizer for r in runs]
    for extra in (
        lambda r: f"lr {r.summary.get('lr', r.recipe.get('optimizer', {}).get('lr'))}",
        lambda r: f"damping {r.summary.get('damping', r.recipe.get('optimizer', {}).get('damping'))}",
        lambda r: r.name,
        lambda r: str(r.path),
    ):
        dup = {lab for lab in labels if labels.count(lab) > 1}
        if not dup:
            break
        labels = [f"{lab}, {extra(r)}" if lab in dup else lab for lab, r in zip(labels, runs)]
    return labels


def group_by_task(runs: Sequence) -> list[tuple[str, list]]:
    """[(task, runs of that task)] in order of first appearance."""
    groups: dict[str, list] = {}
    for r in runs:
        groups.setdefault(r.task, []).append(r)
    return list(groups.items())


@_styled
def runs_figure(runs: Sequence, *, x: str = "step") -> Figure:
    """Training curves from :class:`iefcli.eval.reports.RunInfo` objects.

    One row of two panels per task (runs of different tasks are not mixed):
    training loss (log y) and the task's validation metric, against ``x`` =
    "step" or "time" (wall-clock seconds since the run started). One line
    per run in each panel, labelled by optimiser (plus what tells two runs
    apart when they share it), coloured by optimiser; the legend sits outside
    the axes, right of each row, so it never covers a curve. A run with no
    point in a panel gets no line there.
    """
    if x not in ("step", "time"):
        raise ValueError(f"x must be 'step' or 'time', got {x!r}")
    groups = group_by_task(runs)
    optimisers = [r.optimizer for r in runs]
    colours = {o: method_style(o, optimisers)[0] for o in optimisers}
    fig = new_figure(11.5, 0.6 + 3.9 * len(groups))
    axes = fig.subplots(len(groups), 2, squeeze=False)
    xlabel = "step" if x == "step" else "wall time (s)"
    for (task, group), (ax_loss, ax_val) in zip(groups, axes):
        labels = run_labels(group)
        metric = group[0].metric
        seen: dict[str, int] = {}
        for run, label in zip(group, labels):
            k = seen[run.optimizer] = seen.get(run.optimizer, -1) + 1
            style = dict(color=colours[run.optimizer], linestyle=LINESTYLES[k % len(LINESTYLES)], linewidth=1.8)
            xs, ys = run.curve("train", "loss", x=x)
            pos = [(a, b) for a, b in zip(xs, ys) if b > 0]  # log axis: a zero loss cannot be drawn
            if pos:
                ax_loss.plot([a for a, _ in pos], [b for _, b in pos], label=label, **style)
            xs, ys = run.curve("val", run.metric, x=x)
            if xs:
                ax_val.plot(xs, ys, label=label, marker="o", markersize=3.5, **style)
        ax_loss.set_yscale("log")
        if metric == "loss" and all(y > 0 for ln in ax_val.get_lines() for y in ln.get_ydata()):
            ax_val.set_yscale("log")  # a loss metric spans decades, like the training loss
        ax_loss.set_title(f"{task}: training loss")
        ax_loss.set_ylabel("loss (log scale)")
        ax_val.set_title(f"{task}: validation {metric}")
        ax_val.set_ylabel(metric)
        for ax in (ax_loss, ax_val):
            ax.set_xlabel(xlabel)
            ax.grid(True, which="major", alpha=0.3)
        handles, labs = ax_val.get_legend_handles_labels()
        if not handles:
            handles, labs = ax_loss.get_legend_handles_labels()
        if handles:
            ax_val.legend(handles, labs, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                          title="optimiser")
    return fig


# ------------------------------------------------------------------- gamma ---

GAMMA_FIGURES = ("ratio_vs_damping", "ratio_vs_stage", "imbalance_vs_stage")
"""The eval-gamma figures' file stems (the suffix is the chosen format)."""

IMBALANCE_LABELS = {
    "grad_norm_max_min": "grad norm max/min",
    "grad_norm_top10_bottom10": "grad norm top10%/bottom10%",
    "logit_grad_norm_max_min": "logit-grad norm max/min",
    "logit_grad_norm_top10_bottom10": "logit-grad norm top10%/bottom10%",
}


def _plain_log_ticks(ax) -> None:
    """Log-scale y labels as plain numbers (0.8, 2, 3) instead of 8x10^-1."""
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)


def _positive(v: float | None) -> float:
    """A value a log axis can draw, else NaN (a gap in the line)."""
    return v if v is not None and v > 0 and math.isfinite(v) else math.nan


def _panels(fig: Figure, n: int, ncol: int) -> tuple[list, int, int]:
    nrow = math.ceil(n / ncol)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    flat = [axes[i // ncol][i % ncol] for i in range(nrow * ncol)]
    for ax in flat[n:]:
        ax.set_visible(False)
    return flat[:n], ncol, nrow


def _results_by(doc: dict[str, Any]) -> dict[tuple[str, float], dict[str, Any]]:
    return {(r["method"], r["damping"]): r for r in doc["results"]}


@styled
def gamma_ratio_vs_damping(docs: dict[str, Any] | Sequence[dict[str, Any]]) -> Figure:
    """Median gamma ratio vs damping (log-log), IQR shaded: one panel per checkpoint,
    one line per method (the paper's damping figure). ``docs``: eval-gamma documents."""
    docs = [docs] if isinstance(docs, dict) else list(docs)
    ncol = min(3, len(docs))
    nrow = math.ceil(len(docs) / ncol)
    fig = new_figure(2.4 + 3.6 * ncol, 1.2 + 3.2 * nrow)
    panels, ncol, nrow = _panels(fig, len(docs), ncol)
    for i, (ax, doc) in enumerate(zip(panels, docs)):
        lams = sorted(doc["dampings"])
        by = _results_by(doc)
        for m in doc["methods"]:
            color, ls = method_style(m, doc["methods"])
            med = [_positive(by[(m, lam)]["gamma_ratio_median"]) for lam in lams]
            lo = [_positive(by[(m, lam)]["gamma_ratio_iqr"][0]) for lam in lams]
            hi = [_positive(by[(m, lam)]["gamma_ratio_iqr"][1]) for lam in lams]
            ax.plot(lams, med, marker="o", ms=4, color=color, ls=ls, label=method_label(m))
            ax.fill_between(lams, lo, hi, color=color, alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_title(f"step {doc['step']}")
        ax.grid(True, which="major", alpha=0.3)
        if i // ncol == nrow - 1 or i + ncol >= len(docs):
            ax.set_xlabel("damping λ")
        if i % ncol == 0:
            ax.set_ylabel("γ / γ(SGD)  (median, IQR shaded)")
    panels[0].legend()
    fig.suptitle("gamma relative to SGD (lower is closer to the natural gradient)")
    return fig


@styled
def gamma_ratio_vs_stage(docs: Sequence[dict[str, Any]]) -> Figure:
    """One panel per damping: median gamma ratio vs training step, one line per method
    (the paper's training-stage figure)."""
    lams = list(docs[0]["dampings"])
    methods = list(docs[0]["methods"])
    ncol = min(4, len(lams))
    nrow = math.ceil(len(lams) / ncol)
    fig = new_figure(1.2 + 3.2 * ncol, 1.2 + 2.8 * nrow)
    panels, ncol, nrow = _panels(fig, len(lams), ncol)
    steps = [d["step"] for d in docs]
    for i, (ax, lam) in enumerate(zip(panels, lams)):
        for m in methods:
            color, ls = method_style(m, methods)
            med = [_positive(_results_by(d)[(m, lam)]["gamma_ratio_median"]) for d in docs]
            ax.plot(steps, med, marker="o", ms=3, color=color, ls=ls, label=method_label(m))
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_title(f"λ = {lam:g}")
        ax.grid(True, alpha=0.3)
        if i % ncol == 0:
            ax.set_ylabel("γ / γ(SGD)")
        if i // ncol == nrow - 1 or i + ncol >= len(lams):
            ax.set_xlabel("training step")
    panels[0].legend()
    fig.suptitle("gamma relative to SGD through training (median over batches)")
    return fig


@styled
def imbalance_vs_stage(docs: Sequence[dict[str, Any]]) -> Figure:
    """Per-sample gradient-norm and logit-gradient-norm imbalance vs training step (one line per figure)."""
    fig = new_figure(6.8, 4.4)
    ax = fig.add_subplot()
    steps = [d["step"] for d in docs]
    for k, (key, label) in enumerate(IMBALANCE_LABELS.items()):
        ax.plot(steps, [_positive(d["imbalance"].get(key)) for d in docs], marker="o", ms=4,
                color=PALETTE[k], ls="-" if key.startswith("grad") else "--", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("imbalance (median over batches)")
    ax.set_title("per-sample gradient-norm imbalance through training")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def gamma_figures(docs: Sequence[dict[str, Any]]) -> dict[str, Figure]:
    """{file stem: Figure} of an eval-gamma run: ratio vs damping (a panel per checkpoint),
    and with more than one checkpoint ratio vs stage and imbalance vs stage."""
    docs = list(docs)
    figs = {"ratio_vs_damping": gamma_ratio_vs_damping(docs)}
    if len(docs) > 1:
        figs["ratio_vs_stage"] = gamma_ratio_vs_stage(docs)
        figs["imbalance_vs_stage"] = imbalance_vs_stage(docs)
    return figs

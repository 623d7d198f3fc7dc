"""Figures as matplotlib :class:`~matplotlib.figure.Figure` objects, drawn headless.

Each builder returns the Figure (tests inspect its axes and lines) and never
touches pyplot's global state: figures are created with an Agg canvas
attached, so nothing depends on, or changes, the user's backend or display.
:func:`save_png` writes one atomically.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

# Readable at README size: a 12-13 pt body on a ~10 inch wide figure.
STYLE = {
    "font.size": 12,
    "axes.titlesize": 13,
    "axes.labelsize": 12,
    "legend.fontsize": 10,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
}

# Okabe-Ito, distinguishable for colour-blind readers; cycled per run.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
LINESTYLES = ("-", "--", "-.", ":")


def new_figure(width: float, height: float) -> Figure:
    """A Figure with an Agg canvas (no pyplot, no display)."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path, *, dpi: int = 100) -> None:
    """Write ``fig`` to ``path`` as PNG via a temp file + os.replace (never half-written).

    The image is reduced to a 256-colour palette (no dithering): these
    figures hold few distinct colours, and it makes the files ~3x smaller
    (small enough to commit for the README).
    """
    from PIL import Image

    path = Path(path)
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    old_dpi = fig.dpi
    fig.set_dpi(dpi)
    try:
        rgba, size = canvas.print_to_buffer()
    finally:
        fig.set_dpi(old_dpi)
    image = Image.frombuffer("RGBA", size, rgba, "raw", "RGBA", 0, 1).convert("RGB")
    image = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG", optimize=True)
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; give the user's usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_mode() -> int:
    """0666 minus the process umask: the mode an ordinary open() would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _styled(fn):
    """Run a figure builder under STYLE so fonts apply to every artist it makes."""

    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


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
        ax.contour(fine_x, fine_y, np.clip(loss_grid, lo, None), levels=levels, norm=LogNorm(), colors="#3b5b7a", linewidths=0.5)
        u = result.field[method].numpy()
        ax.quiver(gx, gy, u[..., 0], u[..., 1], color="#333333", angles="xy", scale_units="xy",
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
            ax.plot(px, py, linestyle="--", color=("#D55E00", "#CC79A7")[n % 2], linewidth=1.6,
                    label=f"sample {n + 1} optimal")
        for k, path in enumerate(result.trajectories[method]):
            p = path.numpy()
            ax.plot(p[:, 0], p[:, 1], "-", color="#009E73", linewidth=1.8, marker=".", markersize=3,
                    label="trajectories" if k == 0 else None)
            ax.scatter(p[:1, 0], p[:1, 1], s=30, color="#009E73", edgecolors="black", zorder=4)
        ax.scatter([star[0]], [star[1]], marker="*", s=260, color="#E69F00", edgecolors="black", zorder=5,
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
    colours: dict[str, str] = {}
    for r in runs:
        colours.setdefault(r.optimizer, PALETTE[len(colours) % len(PALETTE)])
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

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


def save_png(fig: Figure, path: Path, *, dpi: int = 110) -> None:
    """Write ``fig`` to ``path`` as PNG via a temp file + os.replace (never half-written)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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

    fig = new_figure(15.0, 5.2)
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

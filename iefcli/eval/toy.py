"""The paper's Figure 1 problem: 2-parameter, 2-datum linear least squares.

A linear model z_n = x_n . theta (``nn.Linear(2, 1, bias=False)``, theta = its
weight, P = 2) with the core's MSE loss l_n = 0.5 (z_n - y_n)^2 on N = 2 data
points whose inputs have very different norms (so their per-sample gradients
have very different scales). The batch loss is the MEAN, as everywhere in
iefcli. Every update direction is computed by the CORE: one
:func:`iefcli.core.jacobian.batch_grads` call at theta, then the method table
:func:`iefcli.core.methods.compute_direction` (``sgd``, ``ef``, ``ief``,
``ngd``), so damping and lr are on the paper's scale; nothing here re-derives
a direction.

What the figure shows (restated from the paper, on its scale: rows
J_a = diag(r) X / N of the mean loss, s_a = r^2 / N^2, G_a = X^T X / N^2):
with X invertible,
- NGD: d = G_a^{-1} g = N (theta - theta*), straight at the minimum;
- iEF: d = J_a^T (J_a J_a^T)^{-1} s_a = X^{-1} r / N = (theta - theta*) / N:
  the same direction (the two coincide on this toy; NGD's step is N^2 times
  longer at the same lr, so the defaults give NGD lr / N^2);
- EF:  d = J_a^{-1} 1 = N X^{-1} (1 / r): every sample's loss is asked to drop
  by the same amount, so the sample that is nearly fitted (tiny r_n) dominates
  and the field is distorted, most of all near the per-sample optimal lines.
(r_n = x_n . theta - y_n; formulas undamped, for the reader, not used.)

Everything here is pure (no I/O, no printing, no randomness); the figure is
drawn by :mod:`iefcli.eval.figures` and the command lives in
:mod:`iefcli.commands.demo`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from iefcli.core.jacobian import BatchGrads, batch_grads
from iefcli.core.losses import MSE
from iefcli.core.methods import MethodOptions, compute_direction

METHODS = ("sgd", "ngd", "ief", "ef")
"""Direction names, in the order the demo reports them."""

PANELS = (("sgd", "SGD"), ("ief", "NGD / iEF"), ("ef", "EF"))
"""(method whose field and trajectories are drawn, panel title), left to right."""

DEFAULT_STARTS = ((-1.5, -1.0), (3.5, -0.5), (-1.0, 3.5), (3.0, 3.0), (1.0, -1.5))
"""The five fixed starting points theta_0 of the trajectories."""


@dataclass(frozen=True)
class ToyProblem:
    """Two data points (rows of ``inputs``, (2, 2)) and targets (2,), float64.

    The defaults put the global minimum at theta* = (1, 1) and give the first
    input about 2.5x the norm of the second, so the two per-sample gradients
    differ in scale by roughly that factor times the residual ratio.
    """

    inputs: Tensor = field(default_factory=lambda: torch.tensor([[1.0, 0.3], [0.2, 0.4]], dtype=torch.float64))
    theta_star: Tensor = field(default_factory=lambda: torch.tensor([1.0, 1.0], dtype=torch.float64))

    @property
    def targets(self) -> Tensor:
        """y = X theta*, (2,): both data points are fitted exactly at theta*."""
        return self.inputs @ self.theta_star

    def model(self) -> nn.Linear:
        """The model the core differentiates: z = x . theta, theta = ``weight`` (1, 2)."""
        # skip_init: no draw from the global RNG (theta is always passed in explicitly).
        m = nn.utils.skip_init(nn.Linear, 2, 1, bias=False, dtype=torch.float64)
        m.requires_grad_(True)
        return m

    def losses(self, thetas: Tensor) -> Tensor:
        """Mean loss (1/2) sum_n l_n at each theta, thetas (..., 2) -> (...).

        Evaluated with the core's MSE on the model's logits z = theta . x_n.
        """
        loss_fn = MSE()
        flat = thetas.reshape(-1, 2).to(torch.float64)
        z = flat @ self.inputs.T  # (M, N) logits, one row per theta
        per_sample = torch.stack(
            [loss_fn.per_sample(z[:, n : n + 1], self.targets[n].expand(z.shape[0], 1)) for n in range(2)]
        )  # (N, M)
        return per_sample.mean(dim=0).reshape(thetas.shape[:-1])

    def optimal_lines(self) -> list[tuple[Tensor, Tensor]]:
        """Per-sample optimal lines {theta : x_n . theta = y_n} as (x_n, y_n) pairs."""
        return [(self.inputs[n], self.targets[n]) for n in range(2)]


@dataclass(frozen=True)
class ToySettings:
    """Step sizes and dampings of the demo, on the paper's scale (docs/train.md).

    ``lr``: per method; SGD's is near 1 / lambda_max(X^T X / N) (the largest
    stable order of magnitude). The three preconditioned methods take the same
    step length per unit of direction on the mean loss's own scale: iEF lr,
    NGD and EF lr / N^2 (their paper-scale directions are N^2 longer; N = 2).
    ``damping``: lambda per method, added to J_a J_a^T (EF, iEF) or to G / N^2
    (NGD). NGD is exact (0); iEF near zero (1e-12 / N^2); EF needs real
    damping: undamped, a residual near zero makes its step explode
    (r_n <- r_n - c / r_n in residual space, c = lr N), and heavily damped
    it is SGD with step lr / lambda. 2.5e-3 keeps it stable and its own
    geometry visible: pulled onto the small-gradient sample's optimal line.
    """

    lr: dict = field(default_factory=lambda: {"sgd": 1.5, "ngd": 0.05, "ief": 0.2, "ef": 0.05})
    damping: dict = field(default_factory=lambda: {"sgd": 0.0, "ngd": 0.0, "ief": 2.5e-13, "ef": 2.5e-3})
    steps: int = 40
    starts: tuple = DEFAULT_STARTS


def grads_at(problem: ToyProblem, theta: Tensor, model: nn.Module | None = None) -> BatchGrads:
    """The core's :class:`BatchGrads` of the toy at theta (2,): rows J (2 x 2), s, g, GGN access."""
    model = problem.model() if model is None else model
    params = {"weight": theta.reshape(1, 2).to(torch.float64)}
    return batch_grads(
        model, params, problem.inputs, problem.targets.reshape(2, 1), MSE(), jacobian="vmap"
    )


# The dense GGN is 2 x 2 here: exact and cheaper than CG. (The duplicate filter never fires:
# the rows r_n x_n have |cos| = |cos(x_1, x_2)| = 0.69 everywhere.)
TOY_OPTIONS = MethodOptions(ngd_method="dense")


def direction(bg: BatchGrads, method: str, damping: float) -> Tensor:
    """d (P = 2,) for ``method`` in METHODS, from the method table (paper scale)."""
    if method not in METHODS:
        raise ValueError(f"unknown toy method {method!r}; choose one of {', '.join(METHODS)}")
    return compute_direction(method, bg, damping, options=TOY_OPTIONS)[0]


def trajectory(
    problem: ToyProblem,
    start: Tensor,
    method: str,
    lr: float,
    damping: float,
    steps: int,
    *,
    compare: tuple[str, float] | None = None,
) -> tuple[Tensor, float]:
    """theta_0 .. theta_K, (K + 1, 2), with theta_{k+1} = theta_k - lr * d(theta_k).

    With ``compare=(other_method, other_damping)`` also returns the largest
    ||d / ||d|| - d_other / ||d_other|| || seen along the path (the difference
    of the unit directions, from the same ``batch_grads`` call), else 0.0.
    """
    model = problem.model()
    theta = start.to(torch.float64)
    path = [theta]
    gap = torch.zeros((), dtype=torch.float64)
    for _ in range(steps):
        bg = grads_at(problem, theta, model)
        d = direction(bg, method, damping)
        if compare is not None:
            other = direction(bg, *compare)
            unit = d / torch.linalg.vector_norm(d).clamp_min(1e-300)
            unit_o = other / torch.linalg.vector_norm(other).clamp_min(1e-300)
            gap = torch.maximum(gap, torch.linalg.vector_norm(unit - unit_o))
        theta = theta - lr * d
        path.append(theta)
    return torch.stack(path), float(gap)


def direction_field(problem: ToyProblem, xs: Tensor, ys: Tensor, damping: dict, methods=METHODS) -> dict[str, Tensor]:
    """Unit update vectors -d/||d|| on the grid xs (A,) x ys (B,): method -> (B, A, 2).

    One core ``batch_grads`` call per grid point, all methods from it. Points
    where d = 0 (on the minimum) get a zero vector.
    """
    model = problem.model()
    out = {m: torch.zeros(len(ys), len(xs), 2, dtype=torch.float64) for m in methods}
    for i, yv in enumerate(ys):
        for j, xv in enumerate(xs):
            bg = grads_at(problem, torch.stack([xv, yv]).to(torch.float64), model)
            for m in methods:
                d = direction(bg, m, damping[m])
                norm = torch.linalg.vector_norm(d)
                out[m][i, j] = torch.where(norm > 0, -d / norm.clamp_min(1e-300), torch.zeros_like(d))
    return out


@dataclass
class ToyResult:
    """Everything the figure and the printed summary need.

    trajectories: method -> list of (K + 1, 2) paths, one per start
    final_loss:   method -> (n_starts,) mean loss after K steps
    field:        method -> (B, A, 2) unit update vectors on grid (xs, ys)
    loss_grid:    (B, A) mean loss on the grid, for the contours
    ief_ngd_gap:  max over the iEF trajectories of the unit directions' difference
                  ||d_iEF / ||d_iEF|| - d_NG / ||d_NG|| ||
    """

    problem: ToyProblem
    settings: ToySettings
    xs: Tensor
    ys: Tensor
    loss_grid: Tensor
    field: dict
    trajectories: dict
    final_loss: dict
    ief_ngd_gap: float


def run_toy(
    *,
    problem: ToyProblem | None = None,
    settings: ToySettings | None = None,
    grid: int = 15,
    extent: tuple[float, float, float, float] = (-2.0, 4.0, -2.0, 4.0),
) -> ToyResult:
    """Directions, fields and trajectories of SGD, NGD, iEF and EF on the toy.

    ``grid`` points per axis for the vector field over ``extent``
    (xmin, xmax, ymin, ymax); contours use a finer grid (closed-form loss).
    """
    problem = ToyProblem() if problem is None else problem
    settings = ToySettings() if settings is None else settings
    if grid < 2:
        raise ValueError(f"grid must be >= 2, got {grid}")
    if settings.steps < 1:
        raise ValueError(f"steps must be >= 1, got {settings.steps}")
    x0, x1, y0, y1 = extent
    fine_x = torch.linspace(x0, x1, 200, dtype=torch.float64)
    fine_y = torch.linspace(y0, y1, 200, dtype=torch.float64)
    gy, gx = torch.meshgrid(fine_y, fine_x, indexing="ij")
    loss_grid = problem.losses(torch.stack([gx, gy], dim=-1))

    xs = torch.linspace(x0, x1, grid, dtype=torch.float64)
    ys = torch.linspace(y0, y1, grid, dtype=torch.float64)
    field_ = direction_field(problem, xs, ys, settings.damping, methods=tuple(m for m, _ in PANELS))

    trajectories: dict[str, list[Tensor]] = {}
    final: dict[str, Tensor] = {}
    gap = 0.0
    for m in METHODS:
        # iEF and NGD coincide on this problem; measure it along iEF's own paths.
        compare = ("ngd", settings.damping["ngd"]) if m == "ief" else None
        paths = []
        for s in settings.starts:
            start = torch.tensor(s, dtype=torch.float64)
            path, g = trajectory(problem, start, m, settings.lr[m], settings.damping[m], settings.steps, compare=compare)
            paths.append(path)
            gap = max(gap, g)
        trajectories[m] = paths
        final[m] = problem.losses(torch.stack([p[-1] for p in paths]))

    return ToyResult(
        problem=problem,
        settings=settings,
        xs=xs,
        ys=ys,
        loss_grid=(fine_x, fine_y, loss_grid),
        field=field_,
        trajectories=trajectories,
        final_loss=final,
        ief_ngd_gap=gap,
    )

"""`ief demo toy`: the toy's directions against closed forms, the figure's
contents, and the command's printed numbers (NG/iEF beat EF in K steps)."""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

from iefcli.cli import app
from iefcli.eval.figures import toy_figure
from iefcli.eval.toy import DEFAULT_STARTS, METHODS, PANELS, ToyProblem, ToySettings, direction, grads_at, run_toy

runner = CliRunner()
F64 = torch.float64


def _closed_forms(p: ToyProblem, theta: torch.Tensor, lam_ef: float) -> dict[str, torch.Tensor]:
    """Dense float64 references written from the authors' formulas (N = 2): rows of the MEAN
    loss J_a = diag(r) X / N, s_a = r^2 / N^2, the mean-loss Fisher G_a = X^T X / N^2."""
    X, y = p.inputs, p.targets
    n = X.shape[0]
    r = X @ theta - y
    Ja = r[:, None] * X / n
    g = Ja.sum(0)
    return {
        "sgd": g,
        "ngd": torch.linalg.solve(X.T @ X / n**2, g),
        "ief": Ja.T @ torch.linalg.solve(Ja @ Ja.T, r**2 / n**2),
        "ef": Ja.T @ torch.linalg.solve(Ja @ Ja.T + lam_ef * torch.eye(2, dtype=F64), torch.ones(2, dtype=F64)),
    }


@pytest.mark.parametrize("theta", [(3.0, 3.0), (-1.5, 0.5), (0.2, 2.7)])
def test_toy_directions_match_closed_forms(theta):
    p = ToyProblem()
    th = torch.tensor(theta, dtype=F64)
    bg = grads_at(p, th)
    lam_ef = ToySettings().damping["ef"]
    ref = _closed_forms(p, th, lam_ef=lam_ef)
    for m in METHODS:
        lam = lam_ef if m == "ef" else 0.0
        torch.testing.assert_close(direction(bg, m, lam), ref[m], rtol=1e-10, atol=1e-12)
    # On this toy iEF and NGD both point at the minimum: iEF (theta - theta*) / N, NGD N (theta - theta*).
    torch.testing.assert_close(ref["ief"], (th - p.theta_star) / 2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ref["ngd"], (th - p.theta_star) * 2, rtol=1e-10, atol=1e-12)
    # ... and the core's per-sample loss is l_n = 0.5 r_n^2 (mean over n).
    r = p.inputs @ th - p.targets
    torch.testing.assert_close(p.losses(th), (0.5 * r**2).mean())


def test_ief_trajectory_is_geometric_and_field_is_unit():
    # Undamped iEF with step lr: theta_k - theta* = (1 - lr/N)^k (theta_0 - theta*).
    s = ToySettings(steps=6, damping={"sgd": 0.0, "ngd": 0.0, "ief": 0.0, "ef": 2.5e-3}, starts=((3.0, -1.0),))
    # NGD's paper-scale step is N^2 = 4 times iEF's at the same lr: the defaults compensate exactly.
    assert s.lr["ngd"] * 4 == s.lr["ief"]
    res = run_toy(settings=s, grid=4)  # 4 points per axis: none falls on the minimum (d = 0 there)
    path = res.trajectories["ief"][0]
    th0 = torch.tensor((3.0, -1.0), dtype=F64) - res.problem.theta_star
    k = torch.arange(7, dtype=F64)[:, None]
    expect = res.problem.theta_star + (1 - s.lr["ief"] / 2) ** k * th0
    torch.testing.assert_close(path, expect, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.trajectories["ngd"][0], expect, rtol=1e-10, atol=1e-12)
    assert res.ief_ngd_gap < 1e-10
    for method, _ in PANELS:
        norms = torch.linalg.vector_norm(res.field[method], dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
    # Arrows point along -d, downhill: a positive dot with -g at every grid point.
    for i, yv in enumerate(res.ys):
        for j, xv in enumerate(res.xs):
            g = direction(grads_at(res.problem, torch.stack([xv, yv])), "sgd", 0.0)
            for method, _ in PANELS:
                assert float(res.field[method][i, j] @ -g) > 0


def test_toy_figure_has_three_panels_with_lines_and_arrows():
    s = ToySettings(steps=3)
    res = run_toy(settings=s, grid=3)
    fig = toy_figure(res)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title().splitlines()[0] for ax in axes] == [t for _, t in PANELS]
    p = res.problem
    for ax, (method, _) in zip(axes, PANELS):
        dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        solid = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
        assert len(dashed) == 2 and len(solid) == len(DEFAULT_STARTS)
        for n, ln in enumerate(dashed):  # each dashed line lies on x_n . theta = y_n
            pts = torch.tensor(ln.get_xydata(), dtype=F64)
            torch.testing.assert_close(pts @ p.inputs[n], p.targets[n].expand(len(pts)))
        for ln, start in zip(solid, DEFAULT_STARTS):
            assert tuple(ln.get_xydata()[0]) == pytest.approx(start)
            assert len(ln.get_xydata()) == s.steps + 1
        quivers = [c for c in ax.collections if type(c).__name__ == "Quiver"]
        assert len(quivers) == 1 and quivers[0].N == 9


def _final_losses(stdout: str) -> dict[str, float]:
    out = {}
    for line in stdout.splitlines():
        m = re.match(r"^(\w+)\s+final loss after (\d+) steps: (\S+)", line)
        if m:
            out[m.group(1)] = (int(m.group(2)), float(m.group(3)))
    return out


def test_demo_toy_command(tmp_path):
    out = tmp_path / "fig"
    res = runner.invoke(app, ["demo", "toy", "--out", str(out), "--steps", "12", "--grid", "4"])
    assert res.exit_code == 0, res.output
    finals = _final_losses(res.stdout)
    assert set(finals) == set(METHODS)
    assert all(k == 12 for k, _ in finals.values())
    loss = {m: v for m, (_, v) in finals.items()}
    # The paper's point: NG and iEF converge, EF is distorted and lags behind.
    assert loss["ief"] < loss["ef"] / 2 and loss["ngd"] < loss["ef"] / 2
    assert loss["ief"] == pytest.approx(loss["ngd"], rel=1e-6)
    png = out / "toy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    # A second run refuses to replace the figure, with one line, exit 2; --overwrite replaces it.
    before = png.read_bytes()
    res2 = runner.invoke(app, ["demo", "toy", "--out", str(out), "--steps", "1", "--grid", "2"])
    assert res2.exit_code == 2
    assert res2.stderr.strip().count("\n") == 0 and "already exists" in res2.stderr and "--overwrite" in res2.stderr
    assert png.read_bytes() == before
    res3 = runner.invoke(app, ["demo", "toy", "--out", str(out), "--steps", "1", "--grid", "2", "--overwrite"])
    assert res3.exit_code == 0, res3.output
    assert png.read_bytes() != before


def test_demo_toy_out_is_a_file(tmp_path):
    f = tmp_path / "x"
    f.write_text("keep")
    res = runner.invoke(app, ["demo", "toy", "--out", str(f), "--steps", "1", "--grid", "2"])
    assert res.exit_code == 2 and "not a directory" in res.stderr
    assert "Traceback" not in res.output and f.read_text() == "keep"

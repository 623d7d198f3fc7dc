"""`ief reproduce` on a tiny subset: report structure, every claim with numbers and a verdict, resume.

One reproduce call (toy + digits + gamma, 3 steps, 2 seeds, one small gamma batch) is shared by
the tests of this module; the full --quick run is far too long for CI.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import typer
from typer.testing import CliRunner

from iefcli.commands import reproduce as cmd
from iefcli.eval.reproduce import FAILS, HOLDS, OPTIMIZERS, GammaSettings, reproduce

TINY_GAMMA = GammaSettings(dampings=(1e-12, 1e-8, 1.0), n_batches=1, batch_size=32, ngd_maxiter=30, stages=2)
TASKS = "toy,digits,gamma"


def _run(out, log=None):
    return reproduce(out=out, quick=True, tasks=TASKS, seeds=2, steps=3, gamma=TINY_GAMMA, log=log)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "out"
    return out, _run(out)


def _claim_rows(text: str) -> list[list[str]]:
    body = text.split("## Claims", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in body.splitlines() if ln.startswith("| ") and not ln.startswith("| section")]
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in rows]


def test_report_structure(first):
    out, res = first
    text = (out / "REPORT.md").read_text()
    for head in ("## Claims", "## 1. Optimisation", "## 2. Approximation quality", "## 3. Figure 1 toy",
                 "## Runs", "## Environment"):
        assert head in text, head
    # Table 2 layout: one row per optimiser in both tables, each cell a mean +- std over the 2 seeds
    for label in ("SGD", "AdamW", "Adafactor", "EF", "SF", "iEF"):
        cells = re.findall(rf"^\| {label} \| (.*) \|$", text, flags=re.M)
        assert len(cells) == 2, label
        assert all(re.fullmatch(r"[-\d.e]+ ± [\d.e-]+", c) for c in cells), cells
    # every figure referenced exists and is a PNG
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert {"toy.png", "optimisation_digits.png", "digits_gamma_vs_damping.png", "digits_gamma_vs_stage.png",
            "digits_imbalance_vs_stage.png"} <= {p.name for p in out.glob("*.png")}
    env = json.loads((out / "results.json").read_text())["environment"]
    assert env["versions"]["torch"] and env["python"] and env["cpu_count"] >= 1 and "platform" in env


def test_every_claim_has_numbers_and_a_verdict(first):
    out, res = first
    rows = _claim_rows((out / "REPORT.md").read_text())
    assert len(rows) == len(res.claims) >= 10
    sections = {r[0].split(" (")[0] for r in rows}
    assert sections == {"optimisation", "approximation", "toy"}
    for section, claim, measured, verdict in rows:
        assert claim and re.search(r"\d", measured), (claim, measured)
        assert verdict in (f"**{HOLDS}**", f"**{FAILS}**"), verdict
    # results.json carries the same claims
    doc = json.loads((out / "results.json").read_text())
    assert [c["claim"] for c in doc["claims"]] == [r[1] for r in rows]
    assert set(doc["optimisation"]["digits"]["optimizers"]) == set(OPTIMIZERS)
    assert all(v["n"] == 2 for v in doc["optimisation"]["digits"]["optimizers"].values())


def test_toy_recipe_matches_the_demo(first):
    """The toy-lsq recipe run by the training loop on the demo's data lands where the demo's path does."""
    out, res = first
    toy = json.loads((out / "results.json").read_text())["toy"]
    assert toy["data"]["x"] == [1.0, 0.3, 0.2, 0.4]
    assert max(toy["gaps"].values()) <= 1e-5
    assert toy["final"]["ief"] == pytest.approx(toy["final"]["ngd"], rel=1e-6)


def test_resume_reuses_finished_runs_and_redoes_missing_ones(first):
    out, res = first
    assert all(r.action == "trained" for r in res.runs)
    victim_resume = out / "runs" / "digits" / "sgd-seed1"
    victim_fresh = out / "runs" / "digits" / "ief-seed0"
    (victim_resume / "summary.json").unlink()  # stopped after its last checkpoint
    shutil.rmtree(victim_fresh)  # never started
    lines: list[str] = []
    again = _run(out, log=lines.append)
    actions = {(r.task, r.opt, r.seed): r.action for r in again.runs}
    assert actions.pop(("digits", "sgd", 1)) == "resumed"
    assert actions.pop(("digits", "ief", 0)) == "trained"
    assert set(actions.values()) == {"reused"}
    assert "gamma digits: reused" in lines
    assert [c.claim for c in again.claims] == [c.claim for c in res.claims]
    # the resumed run ends exactly as the original did (same seed, same steps)
    old = {(r.task, r.opt, r.seed): r.summary for r in res.runs}
    assert again.runs[[(r.task, r.opt, r.seed) for r in again.runs].index(("digits", "sgd", 1))].summary[
        "final_train_loss"] == pytest.approx(old[("digits", "sgd", 1)]["final_train_loss"], rel=1e-6)


def _app():
    app = typer.Typer()
    cmd.register(app)
    app.command("noop")(lambda: None)  # two commands: typer keeps the subcommand name
    return app


@pytest.mark.parametrize("args, msg", [
    (["--tasks", "digits,cifar"], "--tasks: unknown task 'cifar'"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--device", "tpu"], "--device tpu"),
])
def test_usage_errors(tmp_path, args, msg):
    r = CliRunner().invoke(_app(), ["reproduce", "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 2 and f"ief: error: {msg}" in r.output and "Traceback" not in r.output


def test_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    r = CliRunner().invoke(_app(), ["reproduce", "--out", str(tmp_path), "--tasks", "toy"])
    assert r.exit_code == 2 and "not a reproduce directory" in r.output
    assert (tmp_path / "mine.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- verdict logic on synthetic numbers

def _doc(step, ratios, imb):
    """ratios: {method: {damping: median ratio}}."""
    methods = list(ratios)
    dampings = list(next(iter(ratios.values())))
    return {"step": step, "methods": methods, "dampings": dampings, "imbalance": {"grad_norm_top10_bottom10": imb},
            "results": [{"method": m, "damping": lam, "gamma_ratio_median": ratios[m][lam]} for m in methods for lam in dampings]}


def _verdicts(claims):
    return {c.claim.split(" (")[0]: c.verdict for c in claims}


def test_gamma_verdicts_follow_the_numbers():
    from iefcli.eval.reproduce import gamma_claims

    small = {"small_damping_max": 1e-7}
    paperlike = {"sgd": {1e-12: 1.0, 1e-8: 1.0, 1.0: 1.0}, "ef": {1e-12: 3.0, 1e-8: 3.0, 1.0: 1.5},
                 "sf": {1e-12: 2.0, 1e-8: 2.0, 1.0: 0.9}, "ief": {1e-12: 0.5, 1e-8: 0.52, 1.0: 0.51},
                 "ngd": {1e-12: 0.4, 1e-8: 0.4, 1.0: 0.45}}
    v = _verdicts(gamma_claims({**small, "runs": {"t": {"docs": [_doc(10, paperlike, 2.0), _doc(20, paperlike, 5.0)]}}}))
    assert set(v.values()) == {HOLDS} and len(v) == 6, v
    contrary = {"sgd": {1e-12: 1.0, 1e-8: 1.0, 1.0: 1.0}, "ef": {1e-12: 0.3, 1e-8: 0.3, 1.0: 0.5},
                "sf": {1e-12: 2.0, 1e-8: 2.0, 1.0: 0.9}, "ief": {1e-12: 0.9, 1e-8: 0.5, 1.0: 0.2},
                "ngd": {1e-12: 0.4, 1e-8: 0.4, 1.0: 0.45}}
    v = _verdicts(gamma_claims({**small, "runs": {"t": {"docs": [_doc(10, contrary, 5.0), _doc(20, contrary, 2.0)]}}}))
    assert set(v.values()) == {FAILS}, v


def test_optimisation_verdicts_follow_the_numbers():
    from iefcli.eval.reproduce import optimisation_claims

    def task(loss, test, mode="max"):
        return {"title": "t", "metric": "accuracy", "mode": mode, "optimizers": {
            o: {"train_loss": (loss[o], 0.01), "test_metric": (test[o], 0.01)} for o in OPTIMIZERS}}

    good = task(dict(sgd=0.3, adamw=0.2, adafactor=0.25, ef=0.9, sf=0.4, ief=0.1),
                dict(sgd=0.9, adamw=0.91, adafactor=0.9, ef=0.5, sf=0.8, ief=0.95))
    v = [c.verdict for c in optimisation_claims({"a": good, "b": good})]
    assert v == [HOLDS] * 6
    bad = task(dict(sgd=0.05, adamw=0.2, adafactor=0.25, ef=0.01, sf=0.4, ief=0.1),
               dict(sgd=0.9, adamw=0.91, adafactor=0.9, ef=0.5, sf=0.8, ief=0.7))
    v = [c.verdict for c in optimisation_claims({"a": bad, "b": bad})]
    assert v == [FAILS] * 6
    # a 'min' metric ranks the other way
    lossy = task(dict(sgd=0.3, adamw=0.2, adafactor=0.25, ef=0.9, sf=0.4, ief=0.1),
                 dict(sgd=0.9, adamw=0.91, adafactor=0.9, ef=0.5, sf=0.8, ief=0.05), mode="min")
    assert optimisation_claims({"a": lossy})[-1].verdict == HOLDS


def test_ng_claim_uses_the_undamped_solve():
    """Damped NG need not win (at damping 1 it is close to SGD); exact NG (the smallest damping)
    must beat every method at every damping of its stage."""
    from iefcli.eval.reproduce import gamma_claims

    base = {"sgd": {1e-12: 1.0, 1.0: 1.0}, "ef": {1e-12: 3.0, 1.0: 0.9}, "sf": {1e-12: 2.0, 1.0: 0.95},
            "ief": {1e-12: 0.5, 1.0: 0.55}, "ngd": {1e-12: 0.4, 1.0: 0.98}}
    v = _verdicts(gamma_claims({"small_damping_max": 1e-7, "runs": {"t": {"docs": [_doc(10, base, 2.0)]}}}))
    assert v["exact NG"] == HOLDS
    beaten = {**base, "ief": {1e-12: 0.5, 1.0: 0.3}}  # iEF at damping 1 below exact NG
    v = _verdicts(gamma_claims({"small_damping_max": 1e-7, "runs": {"t": {"docs": [_doc(10, beaten, 2.0)]}}}))
    assert v["exact NG"] == FAILS

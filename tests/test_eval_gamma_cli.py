"""`ief eval-gamma` end to end on runs trained here (the paper's findings, JSON/CSV/PNG outputs, errors).

Two runs are trained once per module through the train helper's API: the
built-in 2-parameter least-squares toy (recipes/toy-lsq.yaml), and the
quickstart recipe (an MLP on scikit-learn digits with iEF) for 200 steps
(checkpoints at 0, 100, 200). Evaluations use small batches, two dampings and
a CG cap so that the file stays well under a minute.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import reference_eval as ref

from iefcli.cli import app
from iefcli.eval import figures, gamma_output as go
from iefcli.train.launch import train_recipe

runner = CliRunner()

TOY_SETS = ["device=cpu", "train.steps=6", "train.checkpoint_every=3", "train.eval_every=3"]

DIGITS_SETS = [
    "device=cpu",
    "model.sizes=[32]",
    "train.steps=200",
    "train.checkpoint_every=100",
    "train.eval_every=100",
]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("toy")
    summary = train_recipe("toy-lsq", sets=TOY_SETS, out=d / "run")
    assert summary["status"] == "completed"
    return d / "run"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("digits")
    summary = train_recipe("quickstart", sets=DIGITS_SETS, out=d / "run")
    assert summary["status"] == "completed"
    return d / "run"


def invoke(*args: str):
    return runner.invoke(app, ["eval-gamma", *map(str, args)])


def _by(doc):
    return {(r["method"], r["damping"]): r for r in doc["results"]}


# A cheap evaluation used by several tests (no ngd).
CHEAP = ("--methods", "sgd,ef,ief,sf", "--damping", "1e-10,1e-2", "--batches", "2", "--batch-size", "64", "--quiet")


def test_toy_ief_ratio_equals_ng_and_ef_is_worse(toy_run):
    r = invoke(toy_run, "--methods", "sgd,ef,ief,ngd", "--damping", "1e-12,1e-10", "--json", "--quiet")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["step"] == 6 and doc["batch_size"] == 2 and doc["n_batches"] == 1
    by = _by(doc)
    for lam in (1e-12, 1e-10):
        ief, ngd, ef = (by[(m, lam)]["gamma_ratio_median"] for m in ("ief", "ngd", "ef"))
        assert ief == pytest.approx(ngd, rel=1e-6)
        assert by[("ief", lam)]["cos_to_ngd_median"] == pytest.approx(1.0, abs=1e-6)
        assert ef > ief * 1.01
        assert ngd < 1


def test_digits_ng_smallest_ief_beats_sgd_and_ef(digits_run):
    r = invoke(
        digits_run, "--methods", "sgd,ef,ief,sf,ngd", "--damping", "1e-10,1e-6", "--batches", "2",
        "--batch-size", "100", "--ngd-maxiter", "150", "--json", "--quiet",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    by = _by(doc)
    for lam in (1e-10, 1e-6):
        ratios = {m: by[(m, lam)]["gamma_ratio_median"] for m in doc["methods"]}
        assert ratios["ngd"] == min(ratios.values()), ratios
        assert ratios["ngd"] < ratios["ief"]
        assert ratios["ief"] < 1, ratios
        assert ratios["ief"] < ratios["ef"], ratios
        assert by[("ngd", lam)]["cos_to_ngd_median"] == pytest.approx(1.0, abs=1e-9)
    # The trained model's per-sample gradient norms are imbalanced (why EF degrades).
    assert doc["imbalance"]["grad_norm_max_min"] > doc["imbalance"]["grad_norm_top10_bottom10"] > 1


def test_json_schema_and_determinism(digits_run):
    a = invoke(digits_run, *CHEAP, "--json", "--seed", "3")
    b = invoke(digits_run, *CHEAP, "--json", "--seed", "3")
    c = invoke(digits_run, *CHEAP, "--json", "--seed", "4")
    assert a.exit_code == b.exit_code == c.exit_code == 0, a.output
    assert a.stdout == b.stdout  # same seed: identical, to the last digit
    assert a.stdout != c.stdout  # another seed draws other batches
    doc = json.loads(a.stdout)
    assert isinstance(doc["checkpoint"], str) and Path(doc["checkpoint"]).name == "best"
    assert isinstance(doc["step"], int)
    assert doc["methods"] == ["sgd", "ef", "ief", "sf"] and doc["dampings"] == [1e-10, 1e-2]
    assert len(doc["results"]) == 4 * 2
    for r in doc["results"]:
        assert isinstance(r["method"], str) and isinstance(r["damping"], float)
        for k in ("gamma_ratio_median", "gamma_ratio_mean"):
            assert isinstance(r[k], float) and math.isfinite(r[k])
        lo, hi = r["gamma_ratio_iqr"]
        assert isinstance(lo, float) and isinstance(hi, float) and lo <= r["gamma_ratio_median"] <= hi
        assert r["n_batches"] == 2
    for k in ("grad_norm_max_min", "grad_norm_top10_bottom10", "logit_grad_norm_top10_bottom10"):
        assert isinstance(doc["imbalance"][k], float) and doc["imbalance"][k] >= 1
    assert doc["bad_rows"] == [] and all(r["n_bad"] == 0 for r in doc["results"])


def _toy_reference(ckpt: Path):
    """J, s, g, G_sum of the toy-lsq recipe's two data at a checkpoint's params, read with
    safetensors itself (not the library's loader), in closed form."""
    from safetensors.torch import load_file

    (w,) = load_file(str(ckpt / "params.safetensors")).values()
    # recipes/toy-lsq.yaml data.x, data.y (the data builder stores them as float32)
    X = torch.tensor([[1.0, 0.2], [0.3, 1.0]], dtype=torch.float32).double()
    y = torch.tensor([1.0, -1.0], dtype=torch.float32).double()
    return ref.linear_lsq(w, X, y)


def test_every_csv_and_json_number_matches_a_dense_reference(toy_run, tmp_path):
    out = tmp_path / "ev"
    lams = (1e-4, 1e-2, 1.0)
    r = invoke(toy_run, "--stage", "all", "--methods", "sgd,ef,ief,ngd", "--damping", ",".join(map(str, lams)),
               "--out", out, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    docs = json.loads(r.stdout)
    with open(out / go.CSV_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [d["step"] for d in docs] == [0, 3, 6] and len(rows) == 3 * 4 * len(lams)
    checked = 0
    for doc in docs:
        J, s, g, G = _toy_reference(Path(doc["checkpoint"]))
        by = _by(doc)
        g_sgd = ref.gamma(G, g, g, 2)
        for lam in lams:
            want = ref.paper_directions(J, s, g, G, lam)
            for m, d in want.items():
                (row,) = [x for x in rows if int(x["stage"]) == doc["step"] and x["method"] == m and float(x["damping"]) == lam]
                gam = ref.gamma(G, g, d, 2)
                assert float(row["gamma"]) == pytest.approx(gam, rel=1e-7), (doc["step"], m, lam)
                assert float(row["gamma_ratio"]) == pytest.approx(gam / g_sgd, rel=1e-7)
                assert float(row["cos_to_ngd"]) == pytest.approx(ref.cos(d, want["ngd"]), abs=1e-7)
                assert float(row["cos_to_grad"]) == pytest.approx(ref.cos(d, g), abs=1e-9) and row["sanity"] == "ok"
                # one batch: the JSON's medians are that batch's numbers
                assert by[(m, lam)]["gamma_ratio_median"] == pytest.approx(gam / g_sgd, rel=1e-7)
                assert by[(m, lam)]["gamma_median"] == pytest.approx(gam, rel=1e-7)
                checked += 1
        norms = J.norm(dim=1)
        assert doc["imbalance"]["grad_norm_max_min"] == pytest.approx(float(norms.max() / norms.min()), rel=1e-9)
    assert checked == 3 * 4 * len(lams)


def test_stage_all_out_dir_csv_pngs_and_figures(digits_run, tmp_path):
    out = tmp_path / "ev"
    r = invoke(digits_run, *CHEAP, "--stage", "all", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    docs = json.loads(r.stdout)
    assert [d["step"] for d in docs] == [0, 100, 200]
    assert json.loads((out / go.JSON_FILE).read_text()) == docs
    with open(out / go.CSV_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == go.CSV_COLUMNS
    assert len(rows) == 3 * 2 * 4 * 2  # stages x batches x methods x dampings
    assert {int(x["stage"]) for x in rows} == {0, 100, 200}
    assert all(x["cos_to_ngd"] == "" for x in rows)  # ngd not requested
    # every CSV row reappears in its stage's aggregate (the median of its batches)
    one = [float(x["gamma_ratio"]) for x in rows if x["stage"] == "200" and x["method"] == "ief" and x["damping"] == "1e-10"]
    agg = _by(docs[2])[("ief", 1e-10)]
    assert agg["gamma_ratio_median"] == pytest.approx(sum(one) / 2, rel=1e-12)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(f"{stem}.png" for stem in figures.GAMMA_FIGURES)
    for p in out.glob("*.png"):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # The figure objects: a panel per stage, one line per method in each.
    fig = figures.gamma_ratio_vs_damping(docs)
    panels = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title() for a in panels] == ["step 0", "step 100", "step 200"]
    for ax, doc in zip(panels, docs):
        assert [ln.get_label() for ln in ax.get_lines()] == ["SGD", "EF", "iEF", "SF"]
        assert ax.get_xscale() == "log"
        x, y = ax.get_lines()[2].get_data()
        assert list(x) == [1e-10, 1e-2]
        assert list(y) == [_by(doc)[("ief", lam)]["gamma_ratio_median"] for lam in (1e-10, 1e-2)]
    fig = figures.gamma_ratio_vs_stage(docs)
    panels = [a for a in fig.axes if a.get_visible()]
    assert len(panels) == 2
    for a in panels:
        assert len(a.get_lines()) == 4
        assert list(a.get_lines()[0].get_data()[0]) == [0, 100, 200]
    fig = figures.imbalance_vs_stage(docs)
    assert len(fig.axes[0].get_lines()) == 4
    # training makes per-sample gradient norms more imbalanced (the paper's stage figure)
    assert docs[-1]["imbalance"]["grad_norm_top10_bottom10"] > docs[0]["imbalance"]["grad_norm_top10_bottom10"]


def test_table_output_and_single_checkpoint_dir(digits_run):
    r = invoke(digits_run / "checkpoints" / "step-100", *CHEAP)
    assert r.exit_code == 0, r.output
    assert "gamma / gamma(SGD) at step 100" in r.stdout
    assert "iEF" in r.stdout and "1e-10" in r.stdout and "imbalance" in r.stdout
    assert r.stderr == ""  # --quiet


def test_out_dir_never_overwritten_without_flag(digits_run, tmp_path):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = invoke(digits_run, *CHEAP, "--out", out)
    assert r.exit_code == 2 and "--overwrite" in r.stderr and r.stderr.count("\n") == 1
    assert "Traceback" not in r.output
    r = invoke(digits_run, *CHEAP, "--out", out, "--overwrite")  # not our directory: still refused
    assert r.exit_code == 2 and "refusing" in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    out2 = tmp_path / "ev2"
    assert invoke(digits_run, *CHEAP, "--out", out2).exit_code == 0
    first = (out2 / go.JSON_FILE).read_text()
    assert invoke(digits_run, *CHEAP, "--out", out2, "--seed", "9").exit_code == 2
    assert (out2 / go.JSON_FILE).read_text() == first
    assert invoke(digits_run, *CHEAP, "--out", out2, "--seed", "9", "--overwrite").exit_code == 0
    assert (out2 / go.JSON_FILE).read_text() != first
    assert not list(tmp_path.glob(".*"))  # no temporaries left behind


@pytest.mark.parametrize(
    "args, needle",
    [
        (["{run}/nope"], "not found"),
        (["{run}", "--methods", "sgd,nope"], "unknown method 'nope'"),
        (["{run}", "--damping", "1e-3,abc"], "'abc' is not a number"),
        (["{run}", "--methods", "sf", "--damping", "0"], "sf needs damping > 0"),
        (["{run}", "--stage", "7"], "no checkpoint at step 7"),
        (["{run}", "--stage", "soon"], "expected best, last, all or a step number"),
        (["{run}/best", "--stage", "all"], "single checkpoint"),
        (["{run}", "--split", "dev"], "--split dev"),
        (["{run}", "--batches", "0"], "--batches must be >= 1"),
        (["{run}", "--out", "{run}/../ev", "--figures", "jpg"], "--figures jpg: choose png, pdf, svg"),
    ],
)
def test_bad_input_one_line_exit_2(digits_run, args, needle):
    r = invoke(*[a.format(run=digits_run) for a in args], "--quiet")
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("ief: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert needle in r.stderr
    assert r.stdout == ""


def test_corrupt_and_missing_files_exit_2(digits_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    (run / "checkpoints" / "step-100" / "params.safetensors").write_bytes(b"not a safetensors file")
    r = invoke(run, "--stage", "100", "--quiet")
    assert r.exit_code == 2 and "step-100/params.safetensors" in r.stderr and r.stderr.count("\n") == 1
    r = invoke(run, "--stage", "all", "--quiet")  # every file is read before any evaluation
    assert r.exit_code == 2 and "step-100/params.safetensors" in r.stderr
    (run / "checkpoints" / "step-200" / "meta.json").write_text('{"step": "two hundred"}')
    r = invoke(run, "--stage", "200", "--quiet")
    assert r.exit_code == 2 and "step-200/meta.json" in r.stderr and "not an integer" in r.stderr
    (run / "best" / "meta.json").write_text("{oops")
    r = invoke(run, "--quiet")
    assert r.exit_code == 2 and "meta.json" in r.stderr
    (run / "recipe.yaml").unlink()
    r = invoke(run / "checkpoints" / "step-0", "--quiet")
    assert r.exit_code == 2 and "recipe.yaml" in r.stderr and "Traceback" not in r.output


def test_progress_goes_to_stderr_and_json_stays_clean(digits_run):
    r = invoke(digits_run, "--stage", "all", "--methods", "sgd,ief", "--damping", "1e-8", "--batches", "2",
               "--batch-size", "32", "--json")
    assert r.exit_code == 0, r.output
    docs = json.loads(r.stdout)  # stdout is the JSON and nothing else
    assert r.stdout == json.dumps(docs, indent=2) + "\n"
    assert [d["results"][1]["method"] for d in docs] == ["ief"] * 3
    # Not a terminal here: one progress line per checkpoint on stderr, none on stdout.
    lines = r.stderr.splitlines()
    assert [ln.split(" (")[0] for ln in lines] == [f"eval-gamma: step {s} done" for s in (0, 100, 200)]
    assert "(2/6 batches," in lines[0] and "(6/6 batches," in lines[-1]
    assert "eval-gamma" not in r.stdout


def test_interrupt_exits_130_and_leaves_no_output(digits_run, tmp_path, monkeypatch):
    def boom(results):
        raise KeyboardInterrupt

    monkeypatch.setattr(go, "build_figures", boom)  # interrupted while writing --out
    out = tmp_path / "ev"
    r = invoke(digits_run, *CHEAP, "--out", out)
    assert r.exit_code == 130 and r.stderr == "ief: error: interrupted\n"
    assert list(tmp_path.iterdir()) == []  # neither DIR nor a temporary


def test_a_bad_direction_is_reported_everywhere_and_left_out(toy_run, tmp_path, monkeypatch):
    """End to end: SF made to point uphill at one damping is listed in the JSON's bad_rows,
    marked in the CSV, flagged in the table and named in a note; its statistics are empty."""
    import iefcli.eval.gamma_eval as ge

    real = ge._direction

    def uphill_sf(m, bg, lam, **kw):
        d, info = real(m, bg, lam, **kw)
        return (-bg.g if (m, lam) == ("sf", 1e-2) else d), info

    monkeypatch.setattr(ge, "_direction", uphill_sf)
    args = (toy_run, "--methods", "sgd,ief,sf", "--damping", "1e-4,1e-2")
    out = tmp_path / "ev"
    r = invoke(*args, "--json", "--out", out)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [(b["batch"], b["method"], b["damping"], b["sanity"]) for b in doc["bad_rows"]] == [(0, "sf", 1e-2, "not-descent")]
    assert doc["bad_rows"][0]["cos_to_grad"] == pytest.approx(-1.0, abs=1e-12)
    by = _by(doc)
    assert by[("sf", 1e-2)]["n_bad"] == 1 and by[("sf", 1e-2)]["gamma_ratio_median"] is None  # NaN -> null
    assert by[("sf", 1e-4)]["n_bad"] == 0 and by[("sf", 1e-4)]["gamma_ratio_median"] > 0
    assert "1 direction(s) failed the sanity check (sf not-descent x1)" in r.stderr
    with open(out / go.CSV_FILE, newline="") as f:
        sanity = {(x["method"], x["damping"]): x["sanity"] for x in csv.DictReader(f)}
    assert sanity[("sf", "0.01")] == "not-descent" and sanity[("sf", "0.0001")] == "ok" and sanity[("ief", "0.01")] == "ok"
    r = invoke(*args, "--quiet")
    assert r.exit_code == 0, r.output
    header = next(ln for ln in r.stdout.splitlines() if "damping" in ln)
    assert "SF !" in header and "iEF !" not in header
    assert "left out of the median/IQR" in " ".join(r.stdout.split())


def test_figures_option_picks_the_file_type(toy_run, tmp_path):
    out = tmp_path / "ev"
    r = invoke(toy_run, "--stage", "all", "--methods", "sgd,ief", "--damping", "1e-4", "--out", out, "--figures", "svg", "-q")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [go.JSON_FILE, go.CSV_FILE, *(f"{stem}.svg" for stem in figures.GAMMA_FIGURES)])
    assert all(p.read_bytes().startswith(b"<?xml") for p in out.glob("*.svg"))

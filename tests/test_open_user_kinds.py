"""Models and data by import path (`model.kind: mypkg.models:build_cnn`), through the real CLI:
train, compare, plot, eval-gamma and resume a run whose code lives in the user's own package."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from iefcli.cli import app
from iefcli.errors import UsageError
from iefcli.train import registry, rundir
from iefcli.train.recipe import recipe_from_dict
from iefcli.train.task import build_task
from iefcli.train.user_kinds import (IMPORT_PATHS_FILE, accept_import_kinds, is_import_kind, make_splits,
                                     record_import_paths)

runner = CliRunner()

MODELS = '''
import torch
from torch import nn

def build_cnn(width, input_shape, n_outputs):
    """A tiny conv net over (1, 8, 8) digits."""
    assert tuple(input_shape) == (1, 8, 8), input_shape
    return nn.Sequential(nn.Conv2d(1, width, 3), nn.Tanh(), nn.Flatten(), nn.Linear(width * 36, n_outputs))

NOT_CALLABLE = 3
'''
DATA = '''
import torch
from sklearn.datasets import load_digits

class Digits(torch.utils.data.Dataset):
    """A map-style Dataset (read item by item by iefcli)."""
    def __init__(self, n):
        x, y = load_digits(return_X_y=True)
        self.x = torch.tensor(x[:n], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
        self.y = torch.tensor(y[:n])
    def __len__(self):
        return len(self.y)
    def __getitem__(self, i):
        return self.x[i], self.y[i]

def load(n=300):
    return Digits(n)

def load_regression(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    return {"train": (x.numpy(), x.sum(1).numpy()), "validation": (x[:8], x[:8].sum(1))}
'''


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    """A user package `mypkg_open` in tmp_path/code, found through the current directory."""
    code = tmp_path / "code"
    (code / "mypkg_open").mkdir(parents=True)
    (code / "mypkg_open" / "__init__.py").write_text("")
    (code / "mypkg_open" / "models.py").write_text(MODELS)
    (code / "mypkg_open" / "data.py").write_text(DATA)
    monkeypatch.chdir(code)
    yield code
    _forget(code)


def _forget(code: Path) -> None:
    for name in [m for m in sys.modules if m == "mypkg_open" or m.startswith("mypkg_open.")]:
        del sys.modules[name]
    while str(code) in sys.path:
        sys.path.remove(str(code))


RECIPE = {
    "name": "mine", "seed": 0, "device": "cpu",
    "model": {"kind": "mypkg_open.models:build_cnn", "args": {"width": 2}},
    "data": {"kind": "mypkg_open.data:load", "args": {"n": 300}, "val_fraction": 0.2, "test_fraction": 0.2},
    "optimizer": {"name": "ief"},
    "train": {"steps": 6, "batch_size": 32, "eval_every": 3, "checkpoint_every": 3, "log_every": 1},
}


def test_is_import_kind():
    assert is_import_kind("a.b:c") and is_import_kind("a:c.d") and is_import_kind("_x1:y")
    assert not any(is_import_kind(k) for k in ("mlp", "a.b", "a:b:c", ":b", "a:", "a b:c", "1a:b", None))


def test_import_path_run_trains_compares_plots_evaluates_and_resumes(pkg, tmp_path, monkeypatch):
    recipe_file = pkg / "mine.yaml"
    recipe_file.write_text(yaml.safe_dump(RECIPE))
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", str(recipe_file), "--out", str(run), "-q", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["status"] == "completed" and summary["total_steps"] == 6
    train_losses = [r["loss"] for r in rundir.read_metrics(run) if r["split"] == "train"]
    assert train_losses[-1] < train_losses[0]
    params = rundir.load_checkpoint_params(run)
    assert set(params) == {"0.weight", "0.bias", "3.weight", "3.bias"} and params["0.weight"].shape == (2, 1, 3, 3)
    saved = yaml.safe_load((run / rundir.RECIPE_FILE).read_text())
    assert saved["model"] == {"kind": "mypkg_open.models:build_cnn", "args": {"width": 2}}
    assert json.loads((run / IMPORT_PATHS_FILE).read_text())["sys_path"] == [str(pkg)]

    # From elsewhere, with the user's code NOT importable from the current directory:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _forget(pkg)
    # compare and plot read the run directory only: they never import the model's code
    res = runner.invoke(app, ["compare", str(run), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)
    res = runner.invoke(app, ["plot", str(run), "--out", str(tmp_path / "fig.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "fig.png").stat().st_size > 0
    assert "mypkg_open.models" not in sys.modules and "mypkg_open" not in sys.modules

    # eval-gamma rebuilds the model: found through the run's import_paths.json
    res = runner.invoke(app, ["eval-gamma", str(run), "--methods", "sgd,ief", "--damping", "1e-7",
                              "--batches", "2", "--batch-size", "8", "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert "mypkg_open.models" in sys.modules

    # resume after a crash that left only step-3: the same parameters at step 6 as the uninterrupted run
    part = tmp_path / "part"
    shutil.copytree(run, part)
    shutil.rmtree(rundir.checkpoint_dir(part, 6))
    (part / rundir.SUMMARY_FILE).unlink()
    _forget(pkg)
    res = runner.invoke(app, ["train", "--resume", str(part), "-q"])
    assert res.exit_code == 0, res.output
    a = rundir.load_checkpoint_params(rundir.checkpoint_dir(run, 6))
    b = rundir.load_checkpoint_params(rundir.checkpoint_dir(part, 6))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _build(pkg, model=None, data=None):
    r = recipe_from_dict({**RECIPE, "model": model or RECIPE["model"], "data": data or RECIPE["data"]},
                         source="r.yaml")
    return build_task(r, "cpu")


@pytest.mark.parametrize("model, match", [
    ({"kind": "mypkg_open.models:nope"}, "r.yaml: model.kind: module mypkg_open.models has no attribute 'nope'"),
    ({"kind": "mypkg_open.models:NOT_CALLABLE"}, "r.yaml: model.kind: mypkg_open.models:NOT_CALLABLE is a int, not a callable"),
    ({"kind": "mypkg_open.models:build_cnn", "args": {"widht": 2}}, "r.yaml: model.args: build_cnn: .*widht"),
    ({"kind": "mypkg_open.models:build_cnn", "args": {"width": 2}, "sizes": [3]}, "r.yaml: model.sizes: unknown key"),
    ({"kind": "mypkg_open.nothere:build"}, r"r.yaml: model.kind: cannot import mypkg_open.nothere"),
    ({"kind": "no_such_pkg_open.models:build"}, r"r.yaml: model.kind: cannot import no_such_pkg_open.models "
                                                r"\(No module named 'no_such_pkg_open'\); install it or put it on PYTHONPATH"),
])
def test_import_failures_are_one_line(pkg, model, match):
    with pytest.raises(UsageError, match=match) as e:
        _build(pkg, model=model)
    assert "\n" not in str(e.value)


def test_accept_import_kinds_adds_only_import_paths():
    m, d = {"mlp": "x:y"}, {}
    accept_import_kinds(m, d, {"model": {"kind": "a.b:c"}, "data": {"kind": "digits"}})
    assert m == {"mlp": "x:y", "a.b:c": "iefcli.train.user_kinds:build_user_model"} and d == {}


def test_data_callable_regression_mapping(pkg):
    """A mapping with train + validation of numpy/tensor pairs; float targets -> MSE, (N,) -> (N, 1); test carved."""
    t = _build(pkg, model={"kind": "linear", "bias": True},
               data={"kind": "mypkg_open.data:load_regression", "test_fraction": 0.25})
    assert t.info.loss == "mse" and t.info.metric == "loss" and t.info.mode == "min" and t.info.n_outputs == 1
    assert (t.size("train"), t.size("val"), t.size("test")) == (30, 8, 10)
    x, y = t.splits["val"].inputs, t.splits["val"].targets
    assert y.shape == (8, 1) and torch.allclose(y[:, 0], x.sum(1))


def test_make_splits_validation_names_split_and_row():
    x = torch.zeros(10, 2)
    y = torch.arange(10) % 3
    s = make_splits({"train": (x, y)}, seed=0, val_fraction=0.2, test_fraction=0.2)
    assert s.info.n_outputs == 3 and len(s.train) == 6 and s.info.loss == "cross_entropy"
    s1 = make_splits({"train": (x, y[:, None])}, seed=0, val_fraction=0.2, test_fraction=0.2)
    assert torch.equal(s1.train.targets, s.train.targets) and s1.train.targets.dim() == 1
    # the same seed gives the same split; the splits partition the rows
    s2 = make_splits({"train": (torch.arange(10.0)[:, None], y)}, seed=0, val_fraction=0.2, test_fraction=0.2)
    rows = torch.cat([s2.train.inputs, s2.val.inputs, s2.test.inputs])[:, 0]
    assert sorted(rows.tolist()) == list(range(10))
    xb = x.clone()
    xb[4, 1] = float("nan")
    with pytest.raises(UsageError, match=r"train split: input row 4 is not finite"):
        make_splits({"train": (xb, y), "val": (x, y), "test": (x, y)}, seed=0)
    with pytest.raises(UsageError, match=r"val split: target of row 1 is not an integer class"):
        make_splits({"train": (x, y), "val": (x, torch.tensor([0, 1.5] + [0.0] * 8)), "test": (x, y)}, seed=0,
                    task="classification")
    with pytest.raises(UsageError, match=r"data.num_classes: is 2 but a label is 2"):
        make_splits({"train": (x, y)}, seed=0, num_classes=2)

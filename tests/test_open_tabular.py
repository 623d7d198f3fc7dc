"""Tabular data (CSV/TSV/JSON lines/NPZ/Parquet/datasets) and image folders: a CSV trains through `ief train`;
bad cells are one line naming the file, the line and the column."""

from __future__ import annotations

import csv
import importlib.util
import json
import random

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from iefcli.cli import app
from iefcli.errors import UsageError
from iefcli.train import registry
from iefcli.train.recipe import recipe_from_dict
from iefcli.train.task import build_task

runner = CliRunner()


@pytest.fixture(autouse=True)
def kinds(monkeypatch):
    # Until the lead registers them in iefcli/train/registry.py (see the report).
    monkeypatch.setitem(registry.DATA_KINDS, "tabular", "iefcli.train.tabular:build_tabular")
    monkeypatch.setitem(registry.DATA_KINDS, "image_folder", "iefcli.train.tabular:build_image_folder")


def _rows(n=200, seed=0):
    """Two gaussian blobs in 3-d, labelled by name; a useless constant column."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.randrange(2)
        rows.append({"f1": rng.gauss(2.0 * y, 0.5), "f2": rng.gauss(-1.0 * y, 0.5), "f3": rng.gauss(0, 1),
                     "const": 1.0, "species": ["setosa", "virginica"][y]})
    return rows


def _csv(path, rows, delimiter=","):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def _task(data, model=None):
    r = recipe_from_dict({"name": "t", "seed": 0, "device": "cpu", "data": data,
                          "model": model or {"kind": "mlp", "sizes": [8]}}, source="r.yaml")
    return build_task(r, "cpu")


def test_csv_trains_through_the_cli(tmp_path):
    data = _csv(tmp_path / "blobs.csv", _rows())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"kind": "mlp", "sizes": [8]},
        "data": {"kind": "tabular", "path": "blobs.csv", "label": "species", "features": ["f1", "f2", "f3"],
                 "test_fraction": 0.25},
        "optimizer": {"name": "sgd", "lr": 1.0}, "device": "cpu",
        "train": {"steps": 12, "batch_size": 32, "eval_every": 6, "checkpoint_every": 6},
    }))
    res = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "run"), "-q", "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["status"] == "completed" and s["metric"] == "accuracy"
    assert s["test_metric"] >= 0.9  # separable blobs (2 sigma apart on f1 alone)
    assert data.exists()


def test_csv_splits_classes_and_standardisation(tmp_path):
    _csv(tmp_path / "b.csv", _rows(100))
    t = _task({"kind": "tabular", "path": str(tmp_path / "b.csv"), "label": "species", "val_fraction": 0.2,
               "test_fraction": 0.1})
    assert (t.size("train"), t.size("val"), t.size("test")) == (70, 20, 10)
    assert t.info.input_shape == (4,) and t.info.n_outputs == 2 and t.info.extra["classes"] == ["setosa", "virginica"]
    x = t.splits["train"].inputs.to(torch.float64)
    assert torch.allclose(x[:, :3].mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(x[:, :3].std(0), torch.ones(3, dtype=torch.float64), atol=1e-5)
    assert torch.equal(x[:, 3], torch.zeros(70, dtype=torch.float64))  # constant column: std 0 -> left centred
    # labels follow the rows: f1 is ~2*y, so the class means differ in the standardised f1
    y = t.splits["train"].targets
    assert x[y == 1, 0].mean() > x[y == 0, 0].mean() + 1.0


@pytest.mark.parametrize("edit, match", [
    (lambda rows: rows[3].update(f2="abc"), r"b\.csv: line 5: column 'f2': 'abc' is not a number"),
    (lambda rows: rows[0].update(f1="nan"), r"b\.csv: line 2: column 'f1': 'nan' is not finite"),
    (lambda rows: rows[7].update(species=""), r"b\.csv: line 9: column 'species': '' is not a class label"),
])
def test_bad_cells_name_file_line_and_column(tmp_path, edit, match):
    rows = _rows(20)
    edit(rows)
    _csv(tmp_path / "b.csv", rows)
    with pytest.raises(UsageError, match=r"^r\.yaml: data\.path: .*" + match) as e:
        _task({"kind": "tabular", "path": str(tmp_path / "b.csv"), "label": "species"})
    assert "\n" not in str(e.value)


def test_structure_errors(tmp_path):
    _csv(tmp_path / "b.csv", _rows(20))
    with pytest.raises(UsageError, match=r"no column 'kind' \(columns: f1, f2, f3, const, species\)"):
        _task({"kind": "tabular", "path": str(tmp_path / "b.csv"), "label": "kind"})
    (tmp_path / "short.csv").write_text("a,b,label\n1,2,0\n1,0\n")
    with pytest.raises(UsageError, match=r"short\.csv: line 3: 2 fields, the header has 3"):
        _task({"kind": "tabular", "path": str(tmp_path / "short.csv")})
    with pytest.raises(UsageError, match=r"r\.yaml: data\.path: .*nope\.csv: file not found"):
        _task({"kind": "tabular", "path": str(tmp_path / "nope.csv")})
    with pytest.raises(UsageError, match=r"r\.yaml: data\.features: must be a non-empty list"):
        _task({"kind": "tabular", "path": str(tmp_path / "b.csv"), "features": "f1"})


def test_regression_from_tsv_and_jsonl(tmp_path):
    rows = [{"a": i * 0.1, "b": (i % 7) * 1.0, "target": 0.5 * i + 0.25} for i in range(40)]
    _csv(tmp_path / "r.tsv", rows, delimiter="\t")
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("r.tsv", "r.jsonl"):
        t = _task({"kind": "tabular", "path": str(tmp_path / name), "label": "target", "standardize": False},
                  model={"kind": "linear", "bias": True})
        assert t.info.loss == "mse" and t.info.metric == "loss" and t.info.n_outputs == 1
        s = t.splits["train"]
        assert s.targets.shape == (t.size("train"), 1)
        assert torch.allclose(s.targets[:, 0].double(), 5.0 * s.inputs[:, 0].double() + 0.25, atol=1e-5)
    rows[6]["b"] = None  # JSON null: not a number (numpy alone would read it as NaN)
    (tmp_path / "n.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UsageError, match=r"n\.jsonl: line 7: column 'b': None is not a number"):
        _task({"kind": "tabular", "path": str(tmp_path / "n.jsonl"), "label": "target"})


def test_npz_integer_classes(tmp_path):
    x = np.random.default_rng(0).normal(size=(30, 2, 2))
    y = np.arange(30) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    t = _task({"kind": "tabular", "path": str(tmp_path / "d.npz"), "standardize": False})
    assert t.info.n_outputs == 3 and t.info.input_shape == (2, 2)
    xb = x.copy()
    xb[11, 0, 1] = np.inf
    np.savez(tmp_path / "bad.npz", x=xb, y=y)
    with pytest.raises(UsageError, match=r"bad\.npz: x: row 11 is not finite"):
        _task({"kind": "tabular", "path": str(tmp_path / "bad.npz")})


def test_parquet(tmp_path):
    if importlib.util.find_spec("pyarrow") is None:
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
        with pytest.raises(UsageError, match=r"d\.parquet: reading Parquet needs pyarrow \(pip install pyarrow\)"):
            _task({"kind": "tabular", "path": str(tmp_path / "d.parquet")})
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [float(i) for i in range(20)], "label": [i % 2 for i in range(20)]}),
                   tmp_path / "d.parquet")
    assert _task({"kind": "tabular", "path": str(tmp_path / "d.parquet")}).info.n_outputs == 2


def test_hf_datasets_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets", reason="optional package datasets not installed")
    rows = _rows(40)
    d = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:30]),
                              "validation": datasets.Dataset.from_list(rows[30:])})
    d.save_to_disk(str(tmp_path / "ds"))
    t = _task({"kind": "tabular", "path": str(tmp_path / "ds"), "label": "species"})
    assert t.size("val") == 10 and t.size("train") + t.size("test") == 30


def test_image_folder(tmp_path):
    from PIL import Image

    for k, cls in enumerate(["cat", "dog"]):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(10):
            a = np.full((6, 5), 40 + 150 * k + i, dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / "img" / cls / f"{i}.png")
    t = _task({"kind": "image_folder", "path": str(tmp_path / "img"), "size": [4, 3], "standardize": False,
               "val_fraction": 0.2, "test_fraction": 0.2}, model={"kind": "mlp", "sizes": [4]})
    assert t.info.input_shape == (1, 4, 3) and t.info.extra["classes"] == ["cat", "dog"]
    s = t.splits["train"]
    assert s.inputs.shape == (12, 1, 4, 3)
    # pixel values come back to their class: cat < 50/255 < dog
    assert torch.all((s.inputs.mean((1, 2, 3)) > 100 / 255) == (s.targets == 1))


class _FakeDataset:
    """What iefcli uses of datasets.Dataset: len() and to_dict() (columns)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def to_dict(self):
        return {k: [r[k] for r in self.rows] for k in self.rows[0]}


def test_datasets_glue_with_a_stand_in_module(tmp_path, monkeypatch):
    """The save_to_disk / load_dataset path, with a stand-in `datasets` module when the real one is absent:
    DatasetDict splits keep their names (validation -> val), a lone Dataset is split by the fractions."""
    import sys
    import types

    rows = _rows(50)
    fake = types.ModuleType("datasets")

    class DatasetDict(dict):
        pass

    calls = []
    fake.DatasetDict = DatasetDict
    fake.load_from_disk = lambda p: calls.append(("disk", p)) or DatasetDict(
        train=_FakeDataset(rows[:30]), validation=_FakeDataset(rows[30:40]), test=_FakeDataset(rows[40:]))
    fake.load_dataset = lambda fmt, data_files, **kw: calls.append((fmt, data_files, kw)) or DatasetDict(
        train=_FakeDataset(rows))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    (tmp_path / "ds").mkdir()
    t = _task({"kind": "tabular", "path": str(tmp_path / "ds"), "label": "species", "standardize": False})
    assert (t.size("train"), t.size("val"), t.size("test")) == (30, 10, 10)
    assert torch.equal(t.splits["val"].inputs[:, 0], torch.tensor([r["f1"] for r in rows[30:40]], dtype=torch.float32))
    _csv(tmp_path / "b.tsv", rows, delimiter="\t")
    t = _task({"kind": "tabular", "path": str(tmp_path / "b.tsv"), "label": "species", "reader": "datasets",
               "val_fraction": 0.2, "test_fraction": 0.2})
    assert calls[-1] == ("csv", str(tmp_path / "b.tsv"), {"delimiter": "\t"})
    assert (t.size("train"), t.size("val"), t.size("test")) == (30, 10, 10)


def test_parquet_glue_with_a_stand_in_module(tmp_path, monkeypatch):
    import sys
    import types

    pa = types.ModuleType("pyarrow")
    pq = types.ModuleType("pyarrow.parquet")

    class _Table:
        def to_pydict(self):
            return {"a": [float(i) for i in range(20)], "b": [1.0] * 20, "label": [i % 2 for i in range(20)]}

    pq.read_table = lambda p: _Table()
    pa.parquet = pq
    monkeypatch.setitem(sys.modules, "pyarrow", pa)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", pq)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    t = _task({"kind": "tabular", "path": str(tmp_path / "d.parquet"), "standardize": False})
    assert t.info.n_outputs == 2 and t.info.input_shape == (2,)
    x, y = t.splits["train"].inputs, t.splits["train"].targets
    assert torch.equal(y, x[:, 0].long() % 2)  # rows stay aligned through the split

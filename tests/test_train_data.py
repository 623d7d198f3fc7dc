"""Built-in data: digits split by seed, Fashion-MNIST idx files from data.path, the toy."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from iefcli.errors import UsageError
from iefcli.train.recipe import recipe_from_dict
from iefcli.train.task import build_task


def _digits(seed):
    return build_task(recipe_from_dict({"seed": seed, "model": {"sizes": [4]}}), "cpu")


def test_digits_split_fixed_by_seed_and_disjoint():
    a, b, c = _digits(0), _digits(0), _digits(1)
    sizes = [a.size(s) for s in ("train", "val", "test")]
    assert sum(sizes) == 1797 and sizes[1] == round(0.15 * 1797) and sizes[2] == round(0.2 * 1797)
    assert torch.equal(a.splits["val"].inputs, b.splits["val"].inputs)
    assert not torch.equal(a.splits["val"].inputs, c.splits["val"].inputs)
    rows = {tuple(r.tolist()) for s in ("train", "val", "test") for r in a.splits[s].inputs}
    assert len(rows) >= 1790  # no sample is reused across splits (digits has a few exact duplicates)
    tr = a.splits["train"].inputs
    assert torch.allclose(tr.mean(0), torch.zeros(64), atol=1e-5)  # standardised with train statistics


def _write_idx(d, stem, header: bytes, payload: np.ndarray, gz: bool):
    data = header + payload.astype(np.uint8).tobytes()
    (d / (stem + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_a_directory_of_idx_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    n_tr, n_te = 50, 20
    tr_img, te_img = rng.integers(0, 256, (n_tr, 28, 28)), rng.integers(0, 256, (n_te, 28, 28))
    tr_lab, te_lab = rng.integers(0, 10, n_tr), rng.integers(0, 10, n_te)
    _write_idx(tmp_path, "train-images-idx3-ubyte", struct.pack(">IIII", 2051, n_tr, 28, 28), tr_img, gz)
    _write_idx(tmp_path, "train-labels-idx1-ubyte", struct.pack(">II", 2049, n_tr), tr_lab, gz)
    _write_idx(tmp_path, "t10k-images-idx3-ubyte", struct.pack(">IIII", 2051, n_te, 28, 28), te_img, gz)
    _write_idx(tmp_path, "t10k-labels-idx1-ubyte", struct.pack(">II", 2049, n_te), te_lab, gz)
    r = recipe_from_dict({"model": {"sizes": [4]}, "data": {"kind": "fashion_mnist", "path": str(tmp_path), "n_val": 10}})
    t = build_task(r, "cpu")
    assert (t.size("train"), t.size("val"), t.size("test")) == (40, 10, 20)
    # the test split is the t10k file in order, headers skipped, standardised with train statistics
    assert torch.equal(t.splits["test"].targets, torch.as_tensor(te_lab, dtype=torch.long))
    x = t.splits["test"].inputs
    assert x.shape == (20, 784)
    # undo the standardisation with the model-free relation between two pixels
    raw = torch.as_tensor(te_img.reshape(20, 784), dtype=torch.float32) / 255.0
    slope = (x[0, 1] - x[0, 0]) / (raw[0, 1] - raw[0, 0])
    assert torch.allclose((x - x[0, 0]) / slope + raw[0, 0], raw, atol=1e-4)
    # a truncated file is a one-line usage error naming the file
    (tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))).write_bytes(
        gzip.compress(b"\0" * 100) if gz else b"\0" * 100)
    with pytest.raises(UsageError, match="t10k-images-idx3-ubyte.*corrupt"):
        build_task(r, "cpu")


def test_toy_lsq():
    r = recipe_from_dict({"model": {"kind": "linear", "init": [-1.0, 2.0]}, "data": {"kind": "toy_lsq"}, "dtype": "float64"})
    t = build_task(r, "cpu")
    assert t.loss_fn.name == "mse" and t.metric_name == "loss" and t.metric_mode == "min"
    (w,) = t.params().values()
    assert w.tolist() == [[-1.0, 2.0]]
    x = torch.tensor([[1.0, 0.2], [0.3, 1.0]], dtype=torch.float64)
    y = torch.tensor([1.0, -1.0], dtype=torch.float64)
    expect = 0.5 * ((x @ torch.tensor([-1.0, 2.0], dtype=torch.float64) - y) ** 2).mean()
    assert t.evaluate(split="train")["loss"] == pytest.approx(float(expect))

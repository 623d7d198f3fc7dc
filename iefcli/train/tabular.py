"""Data people have: tables (CSV/TSV, JSON lines, NPZ, Parquet, Hugging Face ``datasets``) and image folders.

``data.kind: tabular``::

    data:
      kind: tabular
      path: data/iris.csv     # .csv .tsv .jsonl .json .npz .parquet, or a datasets save_to_disk directory
      label: species          # the target column (default "label"; NPZ: the target array, default "y")
      features: null          # columns to use (default: every other column; NPZ: ["x"])
      task: auto              # auto | classification | regression
      val_fraction: 0.15      # held out of the rows for validation
      test_fraction: 0.15     # and for test
      standardize: true       # features standardised with the training split's mean/std

Integer labels are class indices; text labels are class names (sorted, so
the same file always gives the same indices; the names are kept in
``DataInfo.extra["classes"]``); labels with a fractional part make it a
regression (MSE). Every feature must be a finite number: a bad cell is one
error line naming the file, the line (CSV/JSON lines: 1-based, header = line 1)
or row, and the column. Parquet needs ``pyarrow``; a ``save_to_disk``
directory, and ``.json``/``.csv`` read through the ``datasets`` package when
``reader: datasets`` is asked, need ``datasets``; both are optional and the
error says which package to install. A ``DatasetDict`` with
train/validation/test splits keeps them; otherwise the fractions split the rows
(a permutation fixed by the recipe's seed).

``data.kind: image_folder``: ``path/<class name>/*.png|jpg|...`` read with
Pillow, resized to ``size`` ``[H, W]``, ``channels`` 1 (grey) or 3 (RGB),
scaled to [0, 1] (then standardised like the tables); classes are the sorted
sub-directory names.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iefcli.errors import UsageError
from iefcli.train.data import DataSplits, Split
from iefcli.train.recipe import Field, check_keys
from iefcli.train.user_kinds import make_splits


def _fraction(v: float) -> str | None:
    return None if 0 < v < 1 else f"must be in (0, 1), got {v:g}"


TABULAR_FIELDS = {
    "path": Field("str", None, "a .csv/.tsv/.jsonl/.json/.npz/.parquet file or a datasets save_to_disk directory"),
    "label": Field("str", None, "the target column (default: label; NPZ: the target array, default y)", optional=True),
    "features": Field("any", None, "feature columns (default: every other column; NPZ: [x])", optional=True,
                      check=lambda v: None if isinstance(v, list) and v and all(isinstance(c, str) for c in v)
                      else f"must be a non-empty list of column names, got {v!r}"),
    "task": Field("str", "auto", "auto | classification | regression", choices=("auto", "classification", "regression")),
    "val_fraction": Field("float", 0.15, "fraction of the rows held out for validation", check=_fraction),
    "test_fraction": Field("float", 0.15, "fraction of the rows held out for test", check=_fraction),
    "standardize": Field("bool", True, "standardise features with the training split's mean/std"),
    "reader": Field("str", "auto", "auto | datasets (read .csv/.json through the datasets package)",
                    choices=("auto", "datasets")),
}

IMAGE_FIELDS = {
    "path": Field("str", None, "directory of one sub-directory of images per class"),
    "size": Field("int_list", [28, 28], "resize every image to [H, W]",
                  check=lambda v: None if len(v) == 2 and all(s > 0 for s in v) else f"must be [H, W] > 0, got {v}"),
    "channels": Field("int", 1, "1 (grey) or 3 (RGB)", check=lambda v: None if v in (1, 3) else f"must be 1 or 3, got {v}"),
    "flatten": Field("bool", False, "flatten images to vectors (for MLPs)"),
    "val_fraction": Field("float", 0.15, "fraction held out for validation", check=_fraction),
    "test_fraction": Field("float", 0.15, "fraction held out for test", check=_fraction),
    "standardize": Field("bool", True, "standardise pixels with the training split's mean/std"),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class Table:
    """Columns of one split: name -> list of raw cells, and where each row came from (for errors)."""

    def __init__(self, file: str, columns: dict[str, list], where: list[str]):
        self.file, self.columns, self.where = file, columns, where

    def __len__(self) -> int:
        return len(self.where)


# ----------------------------------------------------------------------------- readers


def _read_delimited(path: Path, delimiter: str) -> Table:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter=delimiter))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"{path}: cannot read: {e}") from None
    if not rows:
        raise UsageError(f"{path}: empty file (expected a header line of column names)")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header):
        raise UsageError(f"{path}: line 1: duplicate column names in the header")
    cols: dict[str, list] = {h: [] for h in header}
    where = []
    for i, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise UsageError(f"{path}: line {i}: {len(row)} fields, the header has {len(header)}")
        for h, c in zip(header, row):
            cols[h].append(c.strip())
        where.append(f"line {i}")
    return Table(str(path), cols, where)


def _read_json_records(path: Path) -> Table:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read: {e}") from None
    records: list[tuple[str, Any]] = []
    if path.suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(obj, dict) and all(isinstance(v, list) for v in obj.values()):  # columns
            n = {len(v) for v in obj.values()}
            if len(n) > 1:
                raise UsageError(f"{path}: columns have different lengths")
            return Table(str(path), {k: list(v) for k, v in obj.items()}, [f"row {i}" for i in range(n.pop() if n else 0)])
        if not isinstance(obj, list):
            raise UsageError(f"{path}: expected a list of records or a mapping of columns")
        records = [(f"record {i}", r) for i, r in enumerate(obj)]
    else:
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {i}", json.loads(line)))
            except json.JSONDecodeError:
                raise UsageError(f"{path}: line {i}: not valid JSON") from None
    cols: dict[str, list] = {}
    for k, (where, r) in enumerate(records):
        if not isinstance(r, dict):
            raise UsageError(f"{path}: {where}: not a JSON object")
        if k == 0:
            cols = {c: [] for c in r}
        if set(r) != set(cols):
            raise UsageError(f"{path}: {where}: keys {sorted(r)} differ from the first record's {sorted(cols)}")
        for c in cols:
            cols[c].append(r[c])
    return Table(str(path), cols, [w for w, _ in records])


def _read_parquet(path: Path) -> Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        cols = pq.read_table(str(path)).to_pydict()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several unrelated types for bad files
        raise UsageError(f"{path}: cannot read Parquet: {str(e).splitlines()[0]}") from None
    n = len(next(iter(cols.values()), []))
    return Table(str(path), cols, [f"row {i}" for i in range(n)])


def _read_datasets(path: Path) -> dict[str, Table]:
    """A ``save_to_disk`` directory, or a .csv/.json file through ``datasets``: split -> Table."""
    try:
        import datasets
    except ImportError:
        raise UsageError(f"{path}: reading a Hugging Face dataset needs the datasets package (pip install datasets)") from None
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        else:
            fmt = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}.get(path.suffix)
            if fmt is None:
                raise UsageError(f"{path}: datasets can read .csv/.tsv/.json/.jsonl here, not {path.suffix}")
            kw = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
            ds = datasets.load_dataset(fmt, data_files=str(path), **kw)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a bad directory
        raise UsageError(f"{path}: cannot load with datasets: {str(e).splitlines()[0]}") from None
    parts = dict(ds) if isinstance(ds, datasets.DatasetDict) else {"train": ds}
    out = {}
    names = {"validation": "val", "valid": "val", "dev": "val"}
    for split, d in parts.items():
        cols = d.to_dict()
        out[names.get(split, split)] = Table(f"{path} [{split}]", cols, [f"row {i}" for i in range(len(d))])
    return out


def read_tables(path: Path, reader: str = "auto") -> dict[str, Table]:
    """split -> Table for a tabular file ("train" only unless the source has its own splits)."""
    if path.is_dir():
        return _read_datasets(path)
    if not path.is_file():
        raise UsageError(f"{path}: file not found")
    if reader == "datasets":
        return _read_datasets(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return {"train": _read_delimited(path, "\t" if suffix == ".tsv" else ",")}
    if suffix in (".jsonl", ".json"):
        return {"train": _read_json_records(path)}
    if suffix == ".parquet":
        return {"train": _read_parquet(path)}
    raise UsageError(f"{path}: unknown table format {suffix!r} (use .csv .tsv .jsonl .json .npz .parquet)")


# ----------------------------------------------------------------------------- table -> tensors


def _number(cell: Any) -> float | None:
    if isinstance(cell, bool):
        return float(cell)
    if isinstance(cell, (int, float)):
        return float(cell)
    if isinstance(cell, str):
        try:
            return float(cell)
        except ValueError:
            return None
    return None


def _features(t: Table, names: list[str]) -> np.ndarray:
    """(rows, features) float64; the first bad cell (not a number, or not finite) is one error line."""
    x = np.empty((len(t), len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        col = t.columns[name]
        try:  # numpy parses the whole column at C speed; the slow loop only runs to name a bad cell
            if any(c is None or isinstance(c, (list, dict)) for c in col):  # numpy would read None as NaN
                raise ValueError
            x[:, j] = np.asarray(col, dtype=np.float64) if col else x[:, j]
        except (TypeError, ValueError):
            for i, cell in enumerate(col):
                if _number(cell) is None:
                    raise UsageError(f"{t.file}: {t.where[i]}: column {name!r}: {cell!r} is not a number") from None
            x[:, j] = [_number(c) for c in col]
        bad = ~np.isfinite(x[:, j])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UsageError(f"{t.file}: {t.where[i]}: column {name!r}: {col[i]!r} is not finite")
    return x


def _labels(tables: dict[str, Table], label: str, task: str) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """Targets per split: integer classes, class names -> indices, or float regression targets."""
    cells = [(name, i, c) for name, t in tables.items() for i, c in enumerate(t.columns[label])]
    nums = [_number(c) for _, _, c in cells]

    def bad(name: str, i: int, c: Any, why: str) -> UsageError:
        return UsageError(f"{tables[name].file}: {tables[name].where[i]}: column {label!r}: {c!r} {why}")

    if task == "regression" or all(v is not None for v in nums):
        for (name, i, c), v in zip(cells, nums):
            if v is None:
                raise bad(name, i, c, "is not a number")
            if not math.isfinite(v):
                raise bad(name, i, c, "is not finite")
        integral = all(v.is_integer() for v in nums)
        if task == "regression" or (task == "auto" and not integral):
            return {name: torch.tensor([_number(c) for c in t.columns[label]], dtype=torch.float64)
                    for name, t in tables.items()}, None
        if integral:
            for (name, i, c), v in zip(cells, nums):
                if v < 0:
                    raise bad(name, i, c, "is a negative class index")
            return {name: torch.tensor([int(_number(c)) for c in t.columns[label]], dtype=torch.long)
                    for name, t in tables.items()}, None
    for name, i, c in cells:
        if not isinstance(c, (str, int)) or isinstance(c, bool) or c == "":
            raise UsageError(f"{tables[name].file}: {tables[name].where[i]}: column {label!r}: {c!r} is not a class label")
    classes = sorted({str(c) for _, _, c in cells})
    index = {c: k for k, c in enumerate(classes)}
    out = {name: torch.tensor([index[str(c)] for c in t.columns[label]], dtype=torch.long) for name, t in tables.items()}
    return out, classes


def _npz(path: Path, label: str | None, features: list[str] | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    try:
        arrays = np.load(str(path), allow_pickle=False)
        names = list(arrays.files)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read NPZ: {e}") from None
    label = label or "y"
    features = features or ["x"]
    for k in [label, *features]:
        if k not in names:
            raise UsageError(f"{path}: no array {k!r} (arrays: {', '.join(names)})")
    y = arrays[label]
    xs = [arrays[k].reshape(arrays[k].shape[0], -1) if len(features) > 1 else arrays[k] for k in features]
    if any(a.shape[0] != y.shape[0] for a in xs):
        raise UsageError(f"{path}: arrays {', '.join([label, *features])} have different numbers of rows")
    x = np.concatenate(xs, axis=1) if len(xs) > 1 else xs[0]
    if not np.issubdtype(x.dtype, np.number):
        raise UsageError(f"{path}: array {features[0]!r} is not numeric ({x.dtype})")
    bad = ~np.isfinite(x.reshape(x.shape[0], -1).astype(np.float64)).all(axis=1)
    if bad.any():
        raise UsageError(f"{path}: {features[0]}: row {int(np.flatnonzero(bad)[0])} is not finite")
    return {"train": (torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))}


def _standardize(s: DataSplits) -> DataSplits:
    x = s.train.inputs.to(torch.float64)
    mu, sd = x.mean(0), x.std(0) if x.shape[0] > 1 else torch.ones_like(x[0])
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))

    def f(split: Split) -> Split:
        return Split(((split.inputs.to(torch.float64) - mu) / sd).to(torch.float32), split.targets)

    s.info.extra["standardize"] = {"mean": mu.tolist(), "std": sd.tolist()}
    return DataSplits(f(s.train), f(s.val), f(s.test), s.info)


def build_tabular(section: dict, ctx) -> DataSplits:
    """Registry builder for ``data.kind: tabular`` (see the module docstring)."""
    cfg = check_keys(ctx.recipe, "data", section, TABULAR_FIELDS)
    if cfg["val_fraction"] + cfg["test_fraction"] >= 0.9:
        raise ctx.recipe.error("data.test_fraction", "val_fraction + test_fraction must be < 0.9")
    path = ctx.recipe.resolve_path(cfg["path"])
    try:
        if path.suffix.lower() == ".npz" and path.is_file():
            parts = _npz(path, cfg["label"], cfg["features"])
            classes = None
        else:
            tables = read_tables(path, cfg["reader"])
            first = next(iter(tables.values()))
            label = cfg["label"] or "label"
            for t in tables.values():
                missing = [c for c in [label, *(cfg["features"] or [])] if c not in t.columns]
                if missing:
                    raise UsageError(f"{t.file}: no column {missing[0]!r} (columns: {', '.join(t.columns)})")
            names = cfg["features"] or [c for c in first.columns if c != label]
            if not names:
                raise UsageError(f"{first.file}: no feature columns besides the label {label!r}")
            targets, classes = _labels(tables, label, cfg["task"])
            parts = {s: (torch.from_numpy(_features(t, names)), targets[s]) for s, t in tables.items()
                     if s in ("train", "val", "test")}
            if "train" not in parts:
                raise UsageError(f"{path}: no train split (splits: {', '.join(tables)})")
    except UsageError as e:
        raise ctx.recipe.error("data.path", str(e)) from None
    splits = make_splits(parts, seed=ctx.seed, val_fraction=cfg["val_fraction"], test_fraction=cfg["test_fraction"],
                         task=cfg["task"], num_classes=len(classes) if classes else None, ctx=ctx)
    if classes:
        splits.info.extra["classes"] = classes
    return _standardize(splits) if cfg["standardize"] else splits


def build_image_folder(section: dict, ctx) -> DataSplits:
    """Registry builder for ``data.kind: image_folder`` (see the module docstring)."""
    cfg = check_keys(ctx.recipe, "data", section, IMAGE_FIELDS)
    if cfg["val_fraction"] + cfg["test_fraction"] >= 0.9:
        raise ctx.recipe.error("data.test_fraction", "val_fraction + test_fraction must be < 0.9")
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ctx.recipe.error("data.kind", "image_folder needs Pillow (pip install pillow)") from None
    root = ctx.recipe.resolve_path(cfg["path"])
    if not root.is_dir():
        raise ctx.recipe.error("data.path", f"{root}: directory not found")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ctx.recipe.error("data.path", f"{root}: needs one sub-directory per class (found {len(classes)})")
    h, w = cfg["size"]
    mode = "L" if cfg["channels"] == 1 else "RGB"
    xs, ys = [], []
    for k, c in enumerate(classes):
        files = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for f in files:
            try:
                with Image.open(f) as im:
                    a = np.asarray(im.convert(mode).resize((w, h)), dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError) as e:
                raise ctx.recipe.error("data.path", f"{f}: cannot read image: {e}") from None
            xs.append(a.reshape(h, w, cfg["channels"]).transpose(2, 0, 1))
            ys.append(k)
    if not xs:
        raise ctx.recipe.error("data.path", f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class directories")
    x = torch.from_numpy(np.stack(xs))
    if cfg["flatten"]:
        x = x.reshape(x.shape[0], -1)
    splits = make_splits({"train": (x, torch.tensor(ys))}, seed=ctx.seed, val_fraction=cfg["val_fraction"],
                         test_fraction=cfg["test_fraction"], task="classification", num_classes=len(classes), ctx=ctx)
    splits.info.extra["classes"] = classes
    if cfg["standardize"]:
        mu, sd = splits.train.inputs.mean(), splits.train.inputs.std()
        sd = sd if sd > 0 else torch.ones(())
        f = lambda s: Split((s.inputs - mu) / sd, s.targets)  # noqa: E731
        splits = DataSplits(f(splits.train), f(splits.val), f(splits.test), splits.info)
    return splits

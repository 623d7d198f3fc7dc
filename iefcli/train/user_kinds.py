"""Models and data by import path: ``model.kind: my_package.models:build_cnn``.

A ``kind`` of the form ``module.path:attribute`` names the user's own
callable; the adapters below turn it into a registry builder (see
:mod:`iefcli.train.registry` for the builder contract). Nothing else in
iefcli needs to know about it, and commands that only read a run directory
(``compare``, ``plot``) never import the user's code: the run's recipe.yaml
holds the import path as a string.

Model::

    model:
      kind: my_package.models:build_cnn
      args: {width: 32}              # keyword arguments of the callable

``build_cnn(**args)`` returns an ``nn.Module`` (or ``(module, forward)`` with
``forward(model, params, inputs) -> logits``). Parameters the callable
declares but ``args`` does not give are filled from the data when their name
is ``input_shape`` (one sample's shape), ``n_outputs`` (classes or regression
dims) or ``data_info`` (the whole :class:`iefcli.train.data.DataInfo`).

Data::

    data:
      kind: my_package.data:load
      args: {path: data.npz}
      val_fraction: 0.15             # carved from train when the callable gives no val split
      test_fraction: 0.15            # likewise for test
      task: auto                     # auto | classification | regression
      num_classes: null              # classification: default max label + 1

``load(**args)`` (plus ``seed=`` the recipe's seed, when ``load`` declares a
``seed`` parameter) returns one of: a :class:`~iefcli.train.data.DataSplits`
(full control); a mapping ``{"train": S, "val": S, "test": S}`` (val/test
optional); or one ``S`` for everything, split by the fractions and the
recipe's seed. ``S`` is an ``(inputs, targets)`` pair of tensors / numpy
arrays, a :class:`~iefcli.train.data.Split`, or a ``torch.utils.data.Dataset``
whose items are ``(input, target)`` (read once, stacked into tensors).
Integer targets mean classification (cross-entropy, accuracy); floating
targets mean regression (MSE; a (N,) target becomes (N, 1); the metric is the
loss).

Finding the code: the module is imported normally; when that fails because the
top-level package is missing, the current directory, the recipe's directory
and the directories recorded in the run's ``import_paths.json`` (written by
:func:`record_import_paths` next to recipe.yaml) are put on ``sys.path`` and
the import is tried again. Import failures are one UsageError line naming the
recipe key.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from iefcli.errors import UsageError
from iefcli.train.data import DataInfo, DataSplits, Split, _split_indices

IMPORT_PATHS_FILE = "import_paths.json"
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
IMPORT_KIND = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")
MODEL_KEYS = ("kind", "args", "forward")
DATA_KEYS = ("kind", "args", "val_fraction", "test_fraction", "task", "num_classes")
FILLED_FROM_DATA = ("input_shape", "n_outputs", "data_info")


def is_import_kind(kind: Any) -> bool:
    """True for ``module.path:attr`` strings (the registry's built-in kinds have no colon)."""
    return isinstance(kind, str) and IMPORT_KIND.match(kind) is not None


def _error(ctx, key: str, message: str) -> UsageError:
    recipe = getattr(ctx, "recipe", None)
    return recipe.error(key, message) if recipe is not None else UsageError(f"{key}: {message}")


def search_dirs(recipe: Any = None) -> list[Path]:
    """Where a missing top-level package is looked for: the current directory, the
    recipe's directory, and (a run's recipe.yaml) the run's recorded import paths."""
    dirs = [Path.cwd()]
    path = getattr(recipe, "path", None)
    if path is not None:
        path = Path(path)
        dirs.append(path.parent)
        rec = path.parent / IMPORT_PATHS_FILE
        if rec.is_file():
            try:
                obj = json.loads(rec.read_text(encoding="utf-8"))
                dirs += [Path(p) for p in obj.get("sys_path", []) if isinstance(p, str)]
            except (OSError, ValueError, AttributeError):
                pass  # a damaged hint file only loses the hint; the import error says the rest
    out: list[Path] = []
    for d in dirs:
        if d not in out and d.is_dir():
            out.append(d)
    return out


def resolve_callable(spec: str, key: str, *, search: Sequence[Path] = (), ctx: Any = None) -> Callable[..., Any]:
    """Import ``module.path:attr`` (attr may be dotted) and return it; errors name ``key``."""
    if not is_import_kind(spec):
        raise _error(ctx, key, f"{spec!r} is not an import path of the form module.path:function")
    module_name, _, attr = spec.partition(":")
    top = module_name.split(".")[0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if not (missing == top or module_name.startswith(missing + ".") or missing == module_name):
            raise _error(ctx, key, f"importing {module_name} failed: {e}") from None
        added = [str(d) for d in search if str(d) not in sys.path]
        sys.path[:0] = added
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e2:
            for d in added:
                sys.path.remove(d)
            raise _error(ctx, key, f"cannot import {module_name} ({e2}); install it or put it on PYTHONPATH") from None
        except Exception as e2:  # noqa: BLE001 - the user's module raised while importing
            raise _error(ctx, key, f"importing {module_name} failed: {type(e2).__name__}: {e2}") from None
    except Exception as e:  # noqa: BLE001 - the user's module raised while importing
        raise _error(ctx, key, f"importing {module_name} failed: {type(e).__name__}: {e}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise _error(ctx, key, f"module {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise _error(ctx, key, f"{spec} is a {type(obj).__name__}, not a callable")
    return obj


def _check_section(section: Mapping[str, Any], allowed: Sequence[str], where: str, ctx) -> dict:
    unknown = [k for k in section if k not in allowed]
    if unknown:
        raise _error(ctx, f"{where}.{unknown[0]}", f"unknown key for an import-path kind (known: {', '.join(allowed)})")
    args = section.get("args") or {}
    if not isinstance(args, Mapping):
        raise _error(ctx, f"{where}.args", f"must be a mapping of keyword arguments, got {type(args).__name__}")
    return dict(args)


def _call(fn: Callable[..., Any], args: dict, extra: Mapping[str, Any], key: str, ctx) -> Any:
    """fn(**args), adding ``extra`` values for parameters fn declares and args lacks;
    a mismatch between args and fn's signature is a one-line error on ``key``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    kwargs = dict(args)
    if sig is not None:
        for name, value in extra.items():
            if name in sig.parameters and name not in kwargs:
                kwargs[name] = value
        params = sig.parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            unknown = [k for k in kwargs if k not in params]
            if unknown:
                raise _error(ctx, key, f"{getattr(fn, '__qualname__', fn)}: unexpected argument {unknown[0]!r} "
                                       f"(it takes: {', '.join(params) or 'nothing'})")
        try:
            sig.bind(**kwargs)
        except TypeError as e:
            raise _error(ctx, key, f"{getattr(fn, '__qualname__', fn)}: {e}") from None
    return fn(**kwargs)


# ----------------------------------------------------------------------------- model


def build_user_model(section: dict, ctx) -> nn.Module | tuple[nn.Module, Any]:
    """Registry builder for ``model.kind: module:callable`` (see the module docstring)."""
    args = _check_section(section, MODEL_KEYS, "model", ctx)
    search = search_dirs(getattr(ctx, "recipe", None))
    fn = resolve_callable(section["kind"], "model.kind", search=search, ctx=ctx)
    info: DataInfo | None = getattr(ctx, "data", None)
    extra = {} if info is None else {"input_shape": tuple(info.input_shape), "n_outputs": int(info.n_outputs),
                                     "data_info": info}
    built = _call(fn, args, extra, "model.args", ctx)
    forward = None
    if isinstance(built, tuple) and len(built) == 2:
        built, forward = built
    if section.get("forward") is not None:
        forward = resolve_callable(section["forward"], "model.forward", search=search, ctx=ctx)
    if not isinstance(built, nn.Module):
        raise _error(ctx, "model.kind", f"{section['kind']} returned a {type(built).__name__}, not a torch.nn.Module")
    return built if forward is None else (built, forward)


# ----------------------------------------------------------------------------- data


def _as_tensor(x: Any, what: str, ctx) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().cpu()
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise _error(ctx, "data.kind", f"{what}: cannot make a tensor from a {type(x).__name__}: {e}") from None


def _from_dataset(ds: Any, what: str, ctx) -> tuple[Tensor, Tensor]:
    tensors = getattr(ds, "tensors", None)  # TensorDataset: no per-item loop
    if isinstance(tensors, tuple) and len(tensors) == 2:
        return tensors[0].detach().cpu(), tensors[1].detach().cpu()
    try:
        n = len(ds)
    except TypeError:
        raise _error(ctx, "data.kind", f"{what}: a Dataset must have a length (map-style)") from None
    xs, ys = [], []
    for i in range(n):
        item = ds[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise _error(ctx, "data.kind", f"{what}: item {i} is not an (input, target) pair")
        xs.append(_as_tensor(item[0], f"{what} item {i} input", ctx))
        ys.append(_as_tensor(item[1], f"{what} item {i} target", ctx))
    if not xs:
        raise _error(ctx, "data.kind", f"{what}: the Dataset is empty")
    try:
        return torch.stack(xs), torch.stack(ys)
    except RuntimeError as e:
        raise _error(ctx, "data.kind", f"{what}: items have different shapes ({e})") from None


def to_pair(obj: Any, what: str, ctx=None) -> tuple[Tensor, Tensor]:
    """(inputs, targets) tensors from a pair, a Split or a map-style Dataset."""
    if isinstance(obj, Split):
        return obj.inputs, obj.targets
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, y = _as_tensor(obj[0], f"{what} inputs", ctx), _as_tensor(obj[1], f"{what} targets", ctx)
    elif isinstance(obj, torch.utils.data.Dataset):
        x, y = _from_dataset(obj, what, ctx)
    else:
        raise _error(ctx, "data.kind", f"{what}: expected an (inputs, targets) pair or a torch Dataset, "
                                       f"got {type(obj).__name__}")
    if x.shape[0] != y.shape[0]:
        raise _error(ctx, "data.kind", f"{what}: {x.shape[0]} inputs but {y.shape[0]} targets")
    return x, y


def _fraction(v: Any, key: str, ctx) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        raise _error(ctx, key, f"must be in (0, 1), got {v!r}")
    return float(v)


def make_splits(
    parts: Mapping[str, tuple[Tensor, Tensor]],
    *,
    seed: int,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    task: str = "auto",
    num_classes: int | None = None,
    ctx: Any = None,
    where: str = "data",
) -> DataSplits:
    """DataSplits from ``{"train": (x, y), ["val": ..., "test": ...]}``.

    Missing val / test splits are carved from train (fractions of train, a
    seeded permutation). ``task``: classification needs integer-valued targets
    in [0, num_classes); regression takes float targets ((N,) -> (N, 1)).
    Inputs must be finite floats (integers are converted to float32).
    """
    if "train" not in parts:
        raise _error(ctx, where, "no training split")
    x, y = parts["train"]
    carve = [s for s in ("val", "test") if s not in parts]
    out: dict[str, tuple[Tensor, Tensor]] = {s: parts[s] for s in ("val", "test") if s in parts}
    if carve:
        n = x.shape[0]
        n_val = round(val_fraction * n) if "val" in carve else 0
        n_test = round(test_fraction * n) if "test" in carve else 0
        if n - n_val - n_test < 1 or ("val" in carve and n_val < 1) or ("test" in carve and n_test < 1):
            raise _error(ctx, f"{where}.val_fraction", f"{n} training rows cannot be split into "
                                                      f"train/{'/'.join(carve)} with these fractions")
        tr, va, te = _split_indices(n, n_val, n_test, seed)
        if "val" in carve:
            out["val"] = (x[va], y[va])
        if "test" in carve:
            out["test"] = (x[te], y[te])
        x, y = x[tr], y[tr]
    out["train"] = (x, y)

    ys = [out[s][1] for s in ("train", "val", "test")]
    floating = any(t.is_floating_point() for t in ys)
    if task == "auto":
        task = "regression" if floating else "classification"
    if task not in ("classification", "regression"):
        raise _error(ctx, f"{where}.task", f"must be one of auto, classification, regression; got {task!r}")
    splits = {}
    for s in ("train", "val", "test"):
        xs, t = out[s]
        if not xs.is_floating_point():
            xs = xs.to(torch.float32)
        bad = ~torch.isfinite(xs.reshape(xs.shape[0], -1)).all(dim=1)
        if bool(bad.any()):
            raise _error(ctx, where, f"{s} split: input row {int(bad.nonzero()[0])} is not finite (NaN or Inf)")
        if task == "classification":
            if t.is_floating_point() or t.dtype == torch.bool:
                tf = t.to(torch.float64)
                if not bool((tf == tf.round()).all()) or not bool(torch.isfinite(tf).all()):
                    i = int((~((tf == tf.round()) & torch.isfinite(tf))).reshape(tf.shape[0], -1).any(1).nonzero()[0])
                    raise _error(ctx, where, f"{s} split: target of row {i} is not an integer class ({t[i].tolist()})")
            t = t.to(torch.long)
            if t.dim() == 2 and t.shape[1] == 1:
                t = t[:, 0]  # (N, 1) labels, as a column vector
            if t.dim() != 1:
                raise _error(ctx, where, f"{s} split: classification targets must be one label per row, "
                                         f"got shape {tuple(t.shape)}")
        else:
            t = t.to(torch.float32) if not t.is_floating_point() else t
            if t.dim() == 1:
                t = t.unsqueeze(1)
            bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
            if bool(bad.any()):
                raise _error(ctx, where, f"{s} split: target of row {int(bad.nonzero()[0])} is not finite")
        splits[s] = Split(xs, t)
    if task == "classification":
        labels = torch.cat([splits[s].targets for s in splits])
        if bool((labels < 0).any()):
            raise _error(ctx, where, f"class labels must be >= 0, got {int(labels.min())}")
        n_cls = int(labels.max()) + 1 if num_classes is None else int(num_classes)
        if int(labels.max()) >= n_cls:
            raise _error(ctx, f"{where}.num_classes", f"is {n_cls} but a label is {int(labels.max())}")
        info = DataInfo(input_shape=tuple(splits["train"].inputs.shape[1:]), n_outputs=n_cls)
    else:
        info = DataInfo(input_shape=tuple(splits["train"].inputs.shape[1:]),
                        n_outputs=int(splits["train"].targets.shape[1]), loss="mse", metrics=(), metric="loss",
                        mode="min")
    return DataSplits(splits["train"], splits["val"], splits["test"], info)


def build_user_data(section: dict, ctx) -> DataSplits:
    """Registry builder for ``data.kind: module:callable`` (see the module docstring)."""
    args = _check_section(section, DATA_KEYS, "data", ctx)
    val_fraction = _fraction(section.get("val_fraction", 0.15), "data.val_fraction", ctx)
    test_fraction = _fraction(section.get("test_fraction", 0.15), "data.test_fraction", ctx)
    num_classes = section.get("num_classes")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise _error(ctx, "data.num_classes", f"must be a positive integer or null, got {num_classes!r}")
    fn = resolve_callable(section["kind"], "data.kind", search=search_dirs(getattr(ctx, "recipe", None)), ctx=ctx)
    got = _call(fn, args, {"seed": ctx.seed}, "data.args", ctx)
    if isinstance(got, DataSplits):
        return got
    if isinstance(got, Mapping):
        names = {"validation": "val", "valid": "val", "eval": "val"}
        parts = {}
        for k, v in got.items():
            s = names.get(k, k)
            if s not in ("train", "val", "test"):
                raise _error(ctx, "data.kind", f"{section['kind']} returned a split named {k!r} "
                                               "(expected train, val, test)")
            parts[s] = to_pair(v, f"{section['kind']} {k} split", ctx)
    else:
        parts = {"train": to_pair(got, f"{section['kind']} result", ctx)}
    return make_splits(parts, seed=ctx.seed, val_fraction=val_fraction, test_fraction=test_fraction,
                       task=section.get("task", "auto"), num_classes=num_classes, ctx=ctx)


# ----------------------------------------------------------------------------- run directory


def import_roots(kinds: Iterable[str]) -> list[str]:
    """The sys.path directories the top-level packages of ``kinds`` were imported from."""
    roots: list[str] = []
    for kind in kinds:
        if not is_import_kind(kind):
            continue
        top = kind.partition(":")[0].split(".")[0]
        mod = sys.modules.get(top)
        file = getattr(mod, "__file__", None)
        if not file:
            continue
        p = Path(file).resolve()
        root = p.parent.parent if p.name == "__init__.py" else p.parent
        if str(root) not in roots:
            roots.append(str(root))
    return roots


def record_import_paths(run_dir: Path | str, recipe: Mapping[str, Any]) -> Path | None:
    """Write RUN/import_paths.json for a run whose model or data kind is an import
    path (after the task was built, so the modules are imported). Later commands
    that rebuild the model (eval-gamma, --resume) find the code from any current
    directory; compare and plot never read it. None when no kind is an import path."""
    from iefcli.train.rundir import atomic_write_json

    kinds = {sec: recipe.get(sec, {}).get("kind") for sec in ("model", "data")}
    kinds = {k: v for k, v in kinds.items() if is_import_kind(v)}
    if not kinds:
        return None
    path = Path(run_dir) / IMPORT_PATHS_FILE
    atomic_write_json(path, {"kinds": kinds, "sys_path": import_roots(kinds.values())})
    return path


def accept_import_kinds(model_kinds: dict[str, str], data_kinds: dict[str, str], recipe_raw: Mapping[str, Any]) -> None:
    """Register the recipe's import-path kinds in the registry tables (each maps to
    this module's adapters). For callers that cannot change the registry lookup;
    :func:`builder_for` is the direct way."""
    for sec, table, adapter in (("model", model_kinds, "build_user_model"), ("data", data_kinds, "build_user_data")):
        kind = (recipe_raw.get(sec) or {}).get("kind") if isinstance(recipe_raw.get(sec), Mapping) else None
        if is_import_kind(kind):
            table.setdefault(kind, f"iefcli.train.user_kinds:{adapter}")


def builder_for(section: str) -> Callable[..., Any]:
    """The adapter for an import-path kind of ``section`` ("model" or "data")."""
    return build_user_model if section == "model" else build_user_data

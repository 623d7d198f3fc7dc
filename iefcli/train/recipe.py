"""Recipes: the YAML schema, defaults, ``--set`` overrides and validation.

A recipe is loaded with ``yaml.safe_load`` (nothing in it is executed),
``--set key.path=value`` overrides are applied (each value parsed as a YAML
scalar), the defaults below fill what is missing, and everything is checked
before any work starts. Problems raise :class:`iefcli.errors.UsageError` with
one line naming the file and the dotted key, e.g.
``recipe.yaml: optimizer.lr: must be > 0, got -1``.

The ``model`` and ``data`` sections are open: their ``kind`` picks a builder
from :mod:`iefcli.train.registry` and that builder checks its own keys.
Everything else is fixed by :data:`SCHEMA` (documented in docs/train.md).

Built-in recipes live in the repository's top-level ``recipes/`` directory
and are addressed by file stem (``quickstart`` -> ``recipes/quickstart.yaml``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

import iefcli
from iefcli.core.methods import MethodOptions
from iefcli.errors import UsageError
from iefcli.optim.base import OptimConfig

RECIPES_DIR = Path(iefcli.__file__).resolve().parents[1] / "recipes"
# An installed wheel has no repository around it: packaging may place the
# recipes inside the package instead (iefcli/recipes/); the repository's win.
PACKAGED_RECIPES_DIR = Path(iefcli.__file__).resolve().parent / "recipes"


def recipe_dirs() -> list[Path]:
    """Where built-in recipes are looked up, in order (only those that exist)."""
    return [d for d in (RECIPES_DIR, PACKAGED_RECIPES_DIR) if d.is_dir()]

OPTIMIZERS = ("sgd", "adamw", "adafactor", "ef", "sf", "ief", "ngd", "kfac", "ekfac", "iekfac")
# The one home of each optimiser default: the direction options in core.methods.MethodOptions,
# the update options in optim.base.OptimConfig; the schema reads them, it never restates them.
_METHOD = MethodOptions()
_OPT = {f.name: f.default for f in fields(OptimConfig)}


@dataclass(frozen=True)
class Field:
    """One recipe key: its type, default and range check.

    kind: "int" | "float" | "str" | "bool" | "int_list" | "float_list" | "str_list" | "map"
    (a nested mapping, checked by its own fields where it is used) | "any" (``check`` decides); ``optional`` allows null;
    ``choices`` restricts strings; ``check(value) -> message | None`` adds a range check.
    """

    kind: str
    default: Any
    help: str
    optional: bool = False
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None


def _gt(x: float) -> Callable[[Any], str | None]:
    return lambda v: None if v > x else f"must be > {x:g}, got {v:g}"


def _ge(x: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= x else f"must be >= {x:g}, got {v:g}"


def _in01(lo_open: bool, hi_open: bool) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = (v > 0 if lo_open else v >= 0) and (v < 1 if hi_open else v <= 1)
        return None if ok else f"must be in {'(' if lo_open else '['}0, 1{')' if hi_open else ']'}, got {v:g}"

    return check


MAX_SEED = 2**32 - 1
"""Seeds are 0 .. 2**32 - 1: the loop derives generator seeds as seed * 1_000_003 + offset,
which must stay within what torch.Generator.manual_seed accepts."""


def _check_seed(v: int) -> str | None:
    return None if 0 <= v <= MAX_SEED else f"must be in [0, {MAX_SEED}], got {v}"


def _betas(v: list[float]) -> str | None:
    if len(v) != 2 or not all(0 <= b < 1 for b in v):
        return f"must be two numbers in [0, 1), got {v}"
    return None


# Top-level scalar keys, then the fixed sections. model/data/loss are handled separately.
TOP: dict[str, Field] = {
    "name": Field("str", None, "recipe name (default: the file's stem); names the run directory", optional=True),
    "description": Field("str", "", "one line shown by `ief recipes`"),
    "seed": Field("int", 0, "seeds model init, data split and order, and SF sampling", check=_check_seed),
    "device": Field("str", "auto", "auto (CUDA when present) | cpu | cuda", choices=("auto", "cpu", "cuda")),
    "dtype": Field("str", "float32", "float32 | float64 (model and data)", choices=("float32", "float64")),
}

SCHEMA: dict[str, dict[str, Field]] = {
    "loss": {
        "kind": Field("str", "auto", "auto (the data's own loss) | cross_entropy | token_cross_entropy | mse",
                      choices=("auto", "cross_entropy", "token_cross_entropy", "mse")),
        "ignore_index": Field("int", -100, "token_cross_entropy: label of padding positions"),
        "reduction": Field("str", "sample_sum", "token_cross_entropy: sample_sum (sum over the sample's tokens) | "
                           "batch_token_mean (the authors': mean over the batch's valid tokens)",
                           choices=("sample_sum", "batch_token_mean")),
        "tokens": Field("str", "all", "token_cross_entropy: all | first (only each sample's first label token, "
                        "as the authors' gamma; implies batch_token_mean)", choices=("all", "first")),
    },
    "optimizer": {
        "name": Field("str", "ief", " | ".join(OPTIMIZERS), choices=OPTIMIZERS),
        "lr": Field("float", None, "learning rate (null: the optimiser's default)", optional=True, check=_gt(0)),
        "damping": Field("float", None, "ef/sf/ief/ngd: damping lambda added to J J^T or G (null: default)",
                         optional=True, check=_ge(0)),
        "momentum": Field("float", _OPT["momentum"], "sgd/ef/sf/ief/ngd: heavy-ball momentum on the direction", check=_in01(False, True)),
        "nesterov": Field("bool", _OPT["nesterov"], "sgd: Nesterov momentum"),
        "weight_decay": Field("float", None, "decoupled weight decay (null: 0.01 for adamw, 0 otherwise)",
                              optional=True, check=_ge(0)),
        "betas": Field("float_list", list(_OPT["betas"]), "adamw: (beta1, beta2)", check=_betas),
        "eps": Field("float", _OPT["eps"], "adamw: epsilon", check=_gt(0)),
        "beta2_decay": Field("float", _OPT["beta2_decay"], "adafactor: beta2 decay exponent", check=lambda v: None if v <= 0 else f"must be <= 0, got {v:g}"),
        "dup_threshold": Field("float", _METHOD.dup_threshold, "ef/sf/ief: drop the smaller of two rows with |cos| > this (null: off)",
                               optional=True, check=_in01(True, False)),
        "jacobian": Field("str", _OPT["jacobian"], "per-sample rows: auto | vmap | fast", choices=("auto", "vmap", "fast")),
        "chunk_size": Field("int", _OPT["chunk_size"], "samples per vmap chunk (null: all at once)", optional=True, check=_gt(0)),
        "mc_samples": Field("int", _METHOD.mc_samples, "sf: Monte-Carlo label draws per datum", check=_gt(0)),
        "cg_tol": Field("float", _METHOD.cg_tol, "ngd: CG relative-residual tolerance (null: 1e-5 f32 / 1e-10 f64)",
                        optional=True, check=_gt(0)),
        "cg_maxiter": Field("int", _METHOD.cg_maxiter, "ngd: CG iteration cap", check=_gt(0)),
        "clip_update_norm": Field("float", _OPT["clip_update_norm"], "clip the step lr*d to this L2 norm (null: off)",
                                  optional=True, check=_gt(0)),
        # The K-FAC family (docs/kfac.md); defaults from iefcli.optim.base.OptimConfig.
        "fisher_type": Field("str", _OPT["fisher_type"], "kfac/ekfac/iekfac: factor labels sampled | empirical "
                             "(null: sampled for kfac/ekfac, empirical for iekfac)", optional=True,
                             choices=("sampled", "empirical")),
        "seq_mode": Field("str", _OPT["seq_mode"], "kfac family: sequence inputs expand | reduce", choices=("expand", "reduce")),
        "damping_split": Field("str", _OPT["damping_split"], "kfac: eigen (exact Tikhonov) | pi (pi-damping)",
                               choices=("eigen", "pi")),
        "stat_interval": Field("int", _OPT["stat_interval"], "kfac family: update factor statistics every N steps", check=_gt(0)),
        "inv_interval": Field("int", _OPT["inv_interval"], "kfac family: recompute eigenbases every N steps", check=_gt(0)),
        "stat_decay": Field("float", _OPT["stat_decay"], "kfac family: running-average decay of the statistics",
                            check=_in01(False, True)),
    },
    "schedule": {
        "kind": Field("str", "constant", "constant | linear | cosine (decay to min_lr_ratio * lr)",
                      choices=("constant", "linear", "cosine")),
        "warmup_steps": Field("int", 0, "linear warm-up from 0 over this many steps", check=_ge(0)),
        "min_lr_ratio": Field("float", 0.0, "final lr / lr for linear and cosine", check=_in01(False, False)),
    },
    "train": {
        "steps": Field("int", None, "total optimiser steps (wins over epochs)", optional=True, check=_gt(0)),
        "epochs": Field("int", 10, "passes over the training split (when steps is null)", check=_gt(0)),
        "batch_size": Field("int", 64, "training batch size", check=_gt(0)),
        "eval_batch_size": Field("int", 512, "batch size for evaluation passes", check=_gt(0)),
        "eval_every": Field("int", 50, "validate every N steps (and at the end)", check=_gt(0)),
        "log_every": Field("int", 10, "write a train line every N steps", check=_gt(0)),
        "checkpoint_every": Field("int", 100, "write checkpoints/step-N every N steps (and at the end)", check=_gt(0)),
        "max_bad_steps": Field("int", 3, "consecutive NaN/Inf steps before the run fails", check=_gt(0)),
        "drop_last": Field("bool", True, "skip a final short training batch each epoch"),
        "accumulate": Field("int", 1, "micro-batches per step (the batch is split; ef/sf/ief stay exact over it)",
                            check=_gt(0)),
    },
    "output": {
        "dir": Field("str", "runs/{name}", "run directory ({name} is the recipe name)"),
        # YAML 1.1 reads a bare on/off as true/false: both spellings are accepted.
        "tensorboard": Field("any", "auto", "TensorBoard event files in RUN/tensorboard: auto (when installed) | on | off",
                             check=lambda v: None if v in ("auto", "on", "off") or isinstance(v, bool)
                             else f"must be one of auto, on, off; got {v!r}"),
    },
}

SECTIONS = ("model", "data", *SCHEMA)
OPEN_SECTIONS = {"model": "mlp", "data": "digits"}  # section -> default kind


class Recipe(dict):
    """A validated, fully resolved recipe: a plain nested dict plus where it came from.

    ``recipe["optimizer"]["lr"]`` etc.; ``recipe.source`` is the file (or
    "<built-in name>") used in error messages; ``recipe.path`` the file, for
    resolving relative paths inside it.
    """

    def __init__(self, data: Mapping[str, Any], source: str, path: Path | None = None):
        super().__init__(data)
        self.source = source
        self.path = path

    def error(self, key: str, message: str) -> UsageError:
        """A UsageError for the dotted ``key`` of this recipe."""
        return UsageError(f"{self.source}: {key}: {message}")

    def plain(self) -> dict:
        return copy.deepcopy(dict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.plain(), sort_keys=False)

    def resolve_path(self, value: str) -> Path:
        """A path from the recipe: ~ expanded; relative paths are taken from the
        current directory when they exist there, else from the recipe's directory."""
        p = Path(value).expanduser()
        if p.is_absolute() or p.exists() or self.path is None:
            return p
        alt = self.path.parent / p
        return alt if alt.exists() else p


# ----------------------------------------------------------------------------- loading


def builtin_recipes() -> list[tuple[str, str, Path]]:
    """[(name, description, path)] for every built-in recipe, sorted by name
    (a name in an earlier :func:`recipe_dirs` entry hides a later one)."""
    found: dict[str, Path] = {}
    for d in recipe_dirs():
        for p in d.glob("*.yaml"):
            found.setdefault(p.stem, p)
    out = []
    for name in sorted(found):
        p, desc = found[name], ""
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
            if isinstance(raw, dict):
                desc = str(raw.get("description", "") or "")
        except (OSError, yaml.YAMLError):
            desc = "(unreadable)"
        out.append((name, desc.strip().splitlines()[0] if desc.strip() else "", p))
    return out


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file path, or a built-in name (``quickstart``) -> recipes/quickstart.yaml."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    if p.exists():
        raise UsageError(f"{p}: not a recipe file")
    stem = str(name_or_path)
    for suffix in (".yaml", ".yml"):
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    if "/" not in stem:
        for d in recipe_dirs():
            if (d / f"{stem}.yaml").is_file():
                return d / f"{stem}.yaml"
    raise UsageError(f"{name_or_path}: no such recipe file or built-in recipe (see `ief recipes`)")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (["a", "b", "c"], value parsed as a YAML scalar)."""
    if "=" not in text:
        raise UsageError(f"--set {text}: expected KEY.PATH=VALUE")
    key, _, raw = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise UsageError(f"--set {text}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise UsageError(f"--set {text}: value is not a YAML scalar") from None
    check_expanded_size(value, f"--set {key}")
    return parts, value


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    out = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise UsageError(f"--set {text}: {'.'.join(parts[: i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def load_recipe_file(name_or_path: str | Path, overrides: Iterable[str] = (), *, notes: list[str] | None = None) -> Recipe:
    """Read a recipe (with its ``extends`` chain), apply the ``--set`` overrides (an
    ``optimizer.name`` switch resets the other optimizer keys to the new optimiser's
    defaults, see :mod:`iefcli.train.extends`), fill defaults, validate. Raises UsageError."""
    from iefcli.train.extends import load_recipe

    return load_recipe(name_or_path, overrides, notes=notes)


MAX_RECIPE_NODES = 100_000
"""The most values (mappings, lists and scalars, aliases counted each time they are used) a
recipe or a ``--set`` value may expand to: a YAML alias bomb of a few hundred bytes expands to
billions, which would hang validation and print a huge error."""


def check_expanded_size(obj: Any, source: str, limit: int = MAX_RECIPE_NODES) -> None:
    """Refuse a loaded YAML document that expands (aliases included) beyond ``limit`` values."""
    count, stack = 0, [obj]
    while stack:
        node = stack.pop()
        count += 1
        if count > limit:
            raise UsageError(f"{source}: the YAML expands to more than {limit} values (aliases included); refusing it")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def recipe_from_dict(raw: Mapping[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate an in-memory recipe (tests, library use)."""
    return resolve(copy.deepcopy(dict(raw)), source=source, path=None)


# ----------------------------------------------------------------------------- validation


def _typename(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _coerce(source: str | None, key: str, f: Field, v: Any) -> Any:
    def bad(msg: str) -> UsageError:
        return UsageError(f"{source}: {key}: {msg}" if source else f"{key}: {msg}")

    if v is None:
        if f.optional:
            return None
        raise bad(f"must be set (a {f.kind})")
    if f.kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            else:
                raise bad(f"must be an integer, got {_typename(v)} {v!r}")
    elif f.kind == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            # YAML 1.1 reads "1e-7" (no dot) as a string; accept numeric strings.
            try:
                v = float(v) if isinstance(v, str) else None
            except ValueError:
                v = None
            if v is None:
                raise bad(f"must be a number, got {_typename(v)}")
        v = float(v)
        if v != v or v in (float("inf"), float("-inf")):
            raise bad(f"must be a finite number, got {v}")
    elif f.kind == "bool":
        if not isinstance(v, bool):
            raise bad(f"must be true or false, got {_typename(v)} {v!r}")
    elif f.kind == "str":
        if not isinstance(v, str):
            raise bad(f"must be a string, got {_typename(v)} {v!r}")
        if f.choices and v not in f.choices:
            raise bad(f"must be one of {', '.join(f.choices)}; got {v!r}")
    elif f.kind == "int_list":
        if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise bad(f"must be a list of integers, got {v!r}")
    elif f.kind == "float_list":
        if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise bad(f"must be a list of numbers, got {v!r}")
        v = [float(x) for x in v]
    elif f.kind == "str_list":
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise bad(f"must be a list of names, got {v!r}")
    elif f.kind == "map":
        if not isinstance(v, dict):
            raise bad(f"must be a mapping, got {_typename(v)} {v!r}")
        v = copy.deepcopy(v)
    elif f.kind != "any":  # pragma: no cover - a schema bug, not a user error
        raise ValueError(f"unknown field kind {f.kind!r}")
    if f.check is not None:
        msg = f.check(v)
        if msg:
            raise bad(msg)
    return v


def _fill(source: str | None, prefix: str, fields: Mapping[str, Field], given: Mapping[str, Any]) -> dict:
    unknown = [k for k in given if k not in fields]
    if unknown:
        where = f"{source}: " if source else ""
        raise UsageError(f"{where}{prefix}{unknown[0]}: unknown key (known: {', '.join(fields)})")
    return {k: _coerce(source, f"{prefix}{k}", f, given.get(k, copy.deepcopy(f.default))) for k, f in fields.items()}


def resolve(raw: dict, *, source: str, path: Path | None) -> Recipe:
    """Fill defaults and validate every fixed key; check model/data kinds exist."""
    from iefcli.train.registry import DATA_KINDS, MODEL_KINDS
    from iefcli.train.user_kinds import is_import_kind

    unknown = [k for k in raw if k not in TOP and k not in SECTIONS]
    if unknown:
        raise UsageError(f"{source}: {unknown[0]}: unknown key (known: {', '.join([*TOP, *SECTIONS])})")
    out: dict[str, Any] = _fill(source, "", TOP, {k: raw[k] for k in TOP if k in raw})
    if out["name"] is None:
        out["name"] = path.stem if path is not None else "run"
    for section, default_kind in OPEN_SECTIONS.items():
        sec = raw.get(section)
        if sec is None:
            sec = {}
        if not isinstance(sec, dict):
            raise UsageError(f"{source}: {section}: must be a mapping, got {_typename(sec)}")
        sec = copy.deepcopy(sec)
        kind = sec.setdefault("kind", default_kind)
        kinds = MODEL_KINDS if section == "model" else DATA_KINDS
        if not isinstance(kind, str) or (kind not in kinds and not is_import_kind(kind)):
            raise UsageError(f"{source}: {section}.kind: must be one of {', '.join(kinds)}, "
                             f"or module.path:callable; got {kind!r}")
        out[section] = sec
    for section, fields in SCHEMA.items():
        sec = raw.get(section)
        if sec is None:
            sec = {}
        if not isinstance(sec, dict):
            raise UsageError(f"{source}: {section}: must be a mapping, got {_typename(sec)}")
        out[section] = _fill(source, f"{section}.", fields, sec)
    _cross_checks(source, out)
    return Recipe({k: out[k] for k in [*TOP, *SECTIONS]}, source=source, path=path)


def _cross_checks(source: str, r: dict) -> None:
    opt = r["optimizer"]
    if opt["name"] == "sf" and opt["damping"] is not None and opt["damping"] == 0:
        raise UsageError(f"{source}: optimizer.damping: sf needs damping > 0 (it divides by it), got 0")
    if r["train"]["steps"] is not None and r["schedule"]["warmup_steps"] > r["train"]["steps"]:
        raise UsageError(
            f"{source}: schedule.warmup_steps: must be <= train.steps ({r['train']['steps']}), "
            f"got {r['schedule']['warmup_steps']}"
        )
    if "{" in r["output"]["dir"].replace("{name}", ""):
        raise UsageError(f"{source}: output.dir: only {{name}} may be substituted, got {r['output']['dir']!r}")


def fill_section(fields: Mapping[str, Field], given: Mapping[str, Any], where: str, source: str | None = None) -> dict:
    """Validate one mapping against ``fields`` and fill its defaults: the schema
    for nested sections a builder owns (``model.peft``). Errors name
    ``where.key`` (and the recipe file when ``source`` is given)."""
    if not isinstance(given, Mapping):
        prefix = f"{source}: " if source else ""
        raise UsageError(f"{prefix}{where}: must be a mapping, got {_typename(given)}")
    return _fill(source, f"{where}.", fields, given)


def check_keys(recipe: Recipe, section: str, given: Mapping[str, Any], fields: Mapping[str, Field]) -> dict:
    """For builders: validate an open section (model/data) against ``fields``
    (``kind`` is allowed implicitly) and return it with defaults filled."""
    body = {k: v for k, v in given.items() if k != "kind"}
    filled = _fill(recipe.source, f"{section}.", fields, body)
    return {"kind": given.get("kind"), **filled}

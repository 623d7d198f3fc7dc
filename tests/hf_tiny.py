"""Tiny offline fixtures for the hf tests: a word-level tokenizer directory,
a synthetic sentiment data set, and tiny model configs (no downloads).

The data is made so that a model CAN learn it: each text holds exactly one
sentiment word whose polarity is the label, among neutral filler words.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

POS = ["good", "great", "fun", "superb", "lovely"]
NEG = ["bad", "awful", "dull", "poor", "boring"]
FILLER = ["the", "movie", "was", "a", "film", "plot", "very", "and", "it"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
WORDS = ["positive", "negative"] + POS + NEG + FILLER
VOCAB = {w: i for i, w in enumerate(SPECIAL + WORDS)}


def make_tokenizer(directory: Path) -> Path:
    """Save a BERT-style word-level fast tokenizer ([CLS] a [SEP] (b [SEP])) to ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", VOCAB["[CLS]"]), ("[SEP]", VOCAB["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", eos_token="[EOS]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    fast.save_pretrained(directory)
    return directory


def make_rows(n: int, seed: int, labels=("0", "1")) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.randrange(2)
        words = [rng.choice(FILLER) for _ in range(rng.randrange(1, 6))]
        words.append(rng.choice(POS if y else NEG))
        words += [rng.choice(FILLER) for _ in range(rng.randrange(0, 4))]
        rows.append({"text": " ".join(words), "label": labels[y]})
    return rows


def write_split_files(directory: Path, fmt: str = "csv", sizes=(64, 32, 32), labels=("0", "1")) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, (split, n) in enumerate(zip(("train", "val", "test"), sizes)):
        rows = make_rows(n, seed=i, labels=labels)
        path = directory / f"{split}.{fmt}"
        with open(path, "w", encoding="utf-8", newline="") as f:
            if fmt == "jsonl":
                for r in rows:
                    f.write(json.dumps(r) + "\n")
            else:
                w = csv.DictWriter(f, ["text", "label"], delimiter="\t" if fmt == "tsv" else ",")
                w.writeheader()
                w.writerows(rows)
    return directory


BERT = {"model_type": "bert", "vocab_size": len(VOCAB), "hidden_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 24, "max_position_embeddings": 40, "initializer_range": 0.5}
T5 = {"model_type": "t5", "vocab_size": len(VOCAB), "d_model": 16, "d_kv": 8, "d_ff": 24, "num_layers": 1,
      "num_decoder_layers": 1, "num_heads": 2, "decoder_start_token_id": 0, "pad_token_id": 0,
      "eos_token_id": VOCAB["[EOS]"]}

"""Peak memory of one accumulated iEF step: micro-batches set the memory, not the global batch.

    python -m iefcli.dist.bench --memory                      # the table: 1x512 ... 16x32
    python -m iefcli.dist.bench --memory --cap-mb 500         # the same under an address-space cap
    python -m iefcli.dist.bench --memory --model bert-lora    # BERT with LoRA (the paper's setting)

The model (:class:`AttnNet`) is a small transformer classifier whose attention is formed
eagerly (softmax of Q K^T, as BERT's eager attention): with sequence length T = 128 its
autograd graph holds N x H x T x T attention probabilities per layer, while the fast
path keeps only each Linear layer's input and output gradient (N x T x d numbers) per
layer. That is the case the micro-batches are for: one batch of 512 keeps the graph of
512 sequences; 8 micro-batches of 64 keep the graph of 64 at a time plus the factors of
all 512 (which the exact Gram of the global batch needs).

Each configuration runs in a fresh worker process (``--worker``), started with glibc's
``MALLOC_MMAP_THRESHOLD_`` so freed tensors go back to the system; the peak is the
growth of the resident set during the step (VmHWM after resetting it, minus VmRSS before)
plus the model and the batch, as ``ief bench`` measures. With ``cap_mb`` the worker first
limits its address space (RLIMIT_AS) to what it has mapped after a warm-up plus
``cap_mb``: a step that needs more fails with the allocator's error, reported in one line.
Each worker also saves its direction, so the table compares every accumulated direction
with the one-batch direction (float32; exactness in float64 is tested in tests/test_dist.py).
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile

import torch
from torch import nn

__all__ = ["AttnNet", "MODELS", "build", "make_batch", "step_direction", "measure", "format_table", "SPLITS"]

SPLITS = ((1, 512), (2, 256), (4, 128), (8, 64), (16, 32))
"""(micro-batches, micro-batch size) of the global batch 512."""


class _Layer(nn.Module):
    """Pre-norm transformer layer: eager multi-head softmax attention and a GELU MLP (every weight a Linear)."""

    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.f1, self.f2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x):
        n, t, d = x.shape
        h = self.n1(x)
        split = lambda z: z.reshape(n, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)  # (N, H, T, T)
        x = x + self.o((p @ v).transpose(1, 2).reshape(n, t, d))
        return x + self.f2(torch.nn.functional.gelu(self.f1(self.n2(x))))


class AttnNet(nn.Module):
    """Token ids (N, T) -> embedding -> ``layers`` transformer layers -> mean over T -> class logits.
    ``train_embedding=False`` (the default) freezes the embedding, as a pretrained one often is."""

    def __init__(self, vocab: int = 1000, d: int = 32, heads: int = 8, ff: int = 64, layers: int = 2,
                 classes: int = 4, train_embedding: bool = False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.emb.weight.requires_grad_(train_embedding)
        self.layers = nn.ModuleList(_Layer(d, heads, ff) for _ in range(layers))
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(dim=1))


def make_batch(n: int, t: int, *, vocab: int = 1000, classes: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g), torch.randint(0, classes, (n,), generator=g)


MODELS = ("attn", "bert-lora")
"""``attn``: :class:`AttnNet`; ``bert-lora``: ``ief bench``'s 2-layer BERT (hidden 128, eager attention)
with LoRA r=8 on query/value, the paper's setting (only the LoRA factors and the classifier train)."""


def build(model: str, seed: int = 0):
    """(module, forward, inputs builder ids -> inputs, vocab, classes) of a benchmark model."""
    from iefcli.core.jacobian import default_forward

    if model == "attn":
        torch.manual_seed(seed)
        return AttnNet(), default_forward, (lambda ids: ids), 1000, 4
    if model == "bert-lora":
        from iefcli.eval.bench import _bert_lora

        net, forward, classes, vocab = _bert_lora(seed)
        return net.eval(), forward, (lambda ids: {"input_ids": ids}), vocab, classes
    raise ValueError(f"unknown model {model!r}; choose {', '.join(MODELS)}")


def step_direction(model: nn.Module, ids, y, accumulate: int, *, damping: float = 1e-7,
                   method: str = "ief", forward=None) -> torch.Tensor:
    """One step's direction over the batch, as ``accumulate`` micro-batches (paper-scale damping)."""
    from iefcli.core.jacobian import default_forward
    from iefcli.core.losses import CrossEntropy
    from iefcli.core.methods import compute_direction
    from iefcli.core.params import trainable_params
    from iefcli.dist.comm import Comm
    from iefcli.dist.grads import global_batch_grads

    params = trainable_params(model)
    bg = global_batch_grads(model, params, ids, y, CrossEntropy(), comm=Comm.local(), accumulate=accumulate,
                            forward=forward or default_forward)
    d, _ = compute_direction(method, bg, damping)
    return d


# ----------------------------------------------------------------------------- the worker process


def _worker(cfg: dict) -> dict:
    from iefcli.eval.bench import _proc_kib, _reset_peak_rss  # the bench's peak-RSS probes

    torch.set_num_threads(1)
    model, forward, wrap, vocab, classes = build(cfg.get("model", "attn"))
    ids, y = make_batch(cfg["batch"], cfg["seq"], vocab=vocab, classes=classes)
    step_direction(model, wrap(ids[:4]), y[:4], 2, forward=forward)  # warm-up: lazy initialisation
    gc.collect()
    held = sum(p.numel() * p.element_size() for p in model.parameters()) + ids.numel() * 8 + y.numel() * 8
    if cfg.get("cap_mb"):
        limit = _proc_kib("VmSize") * 1024 + int(cfg["cap_mb"] * 2**20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    before = _proc_kib("VmRSS")
    _reset_peak_rss()  # VmHWM back to the current resident set
    try:
        d = step_direction(model, wrap(ids), y, cfg["accumulate"], forward=forward)
    except (MemoryError, RuntimeError) as e:  # the allocator's "can't allocate memory" under the cap
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return {"ok": False, "error": f"{type(e).__name__}: {first[:160]}"}
    peak = (_proc_kib("VmHWM") - before) * 1024 + held
    torch.save(d, cfg["out"])
    return {"ok": True, "peak_mb": peak / 2**20}


def measure(*, model: str = "attn", splits=SPLITS, batch: int = 512, seq: int = 128, cap_mb: float | None = None,
            reference: torch.Tensor | None = None, timeout_s: float = 900) -> tuple[list[dict], torch.Tensor | None]:
    """One row per (micro-batches, size): peak MB (or the error under the cap) and the direction's
    relative difference from ``reference`` (default: the first split's direction, the one batch).
    Returns (rows, the reference)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for acc, micro in splits:
            out = os.path.join(tmp, f"d{acc}.pt")
            cfg = {"model": model, "batch": batch, "seq": seq, "accumulate": acc, "cap_mb": cap_mb, "out": out}
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
            proc = subprocess.run([sys.executable, "-m", "iefcli.dist.memory", "--worker", json.dumps(cfg)],
                                  capture_output=True, text=True, env=env, timeout=timeout_s)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                res = {"ok": False, "error": f"worker exit {proc.returncode}: {tail[:160]}"}
            else:
                res = json.loads(proc.stdout.strip().splitlines()[-1])
            row = {"micro_batches": acc, "micro_batch": micro, **res}
            if res["ok"]:
                d = torch.load(out)
                if reference is None:
                    reference = d
                row["rel_diff_vs_one_batch"] = float((d - reference).norm() / reference.norm())
            rows.append(row)
    return rows, reference


def _short(error: str) -> str:
    m = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", error)
    return f"out of memory (allocating {int(m.group(1)) / 2**20:.0f} MB)" if m else error


def format_table(rows: list[dict], cap_mb: float | None = None) -> str:
    head = "| global batch 512 as | peak MB" + (f" (cap {cap_mb:g} MB)" if cap_mb else "") + " | direction vs 1 x 512 |"
    lines = [head, "|---|---:|---:|"]
    for r in rows:
        peak = f"{r['peak_mb']:.0f}" if r["ok"] else f"fails: {_short(r['error'])}"
        diff = f"{r['rel_diff_vs_one_batch']:.1e}" if "rel_diff_vs_one_batch" in r else "-"
        diff = "(reference)" if diff == "0.0e+00" and r["micro_batches"] == 1 else diff
        lines.append(f"| {r['micro_batches']} x {r['micro_batch']} | {peak} | {diff} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
    else:  # pragma: no cover
        print("usage: python -m iefcli.dist.bench --memory [--cap-mb MB]", file=sys.stderr)
        raise SystemExit(2)

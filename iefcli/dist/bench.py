"""Measure the distributed / accumulated step: bytes moved, step time, peak memory.

    python -m iefcli.dist.bench --hidden 512 --batch 64                     # one process
    torchrun --standalone --nproc-per-node 2 -m iefcli.dist.bench --hidden 512 --batch 64
    python -m iefcli.dist.bench --batch 512 --accumulate 8                  # micro-batches of 64
    python -m iefcli.dist.bench --memory --model bert-lora --cap-mb 500     # peak memory vs micro-batch

One JSON line (rank 0): P, the global batch, the number of all_gather / all_reduce calls
and the bytes all_gathered / all_reduced per step by this rank (payload, from
:class:`iefcli.dist.comm.Comm`), the analysis' prediction for the fast path, the median
step time, and the peak resident memory of the process (ru_maxrss; run one configuration
per process). A step is the training loop's own: the optimiser's ``update`` (direction,
metrics, new parameters) with :class:`iefcli.dist.grads.DistModelFn`, as under
``ief train``. The model is a synthetic MLP (inputs ``--d-in``, ``--depth`` hidden layers
of ``--hidden`` units, tanh, 10 classes) on random data.

``--memory``: peak memory of an attention model's step vs the micro-batch size
(:mod:`iefcli.dist.memory`).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
from torch import nn

from iefcli.core.losses import CrossEntropy
from iefcli.core.params import trainable_params
from iefcli.dist.comm import finished, init_from_env
from iefcli.dist.grads import DistModelFn
from iefcli.optim import OptimConfig, make_optimizer
from iefcli.train.task import Batch


def _model(d_in: int, hidden: int, depth: int, classes: int) -> nn.Module:
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.Tanh()]
        d = hidden
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


def predicted_gather_bytes(model: nn.Module, n_local: int, classes: int, itemsize: int = 4) -> int:
    """The fast path's all_gather payload of one rank for an MLP: per Linear layer the
    captured X (n x d_in) and E (n x d_out), plus the per-sample loss (float), logits and
    logit gradients (n x classes each)."""
    per_sample = sum(m.in_features + m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    return n_local * (per_sample + 1 + 2 * classes) * itemsize


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m iefcli.dist.bench")
    ap.add_argument("--d-in", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64, help="global batch")
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--method", default="ief")
    ap.add_argument("--jacobian", default="fast", choices=("fast", "vmap"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--momentum", type=float, default=0.0)
    ap.add_argument("--memory", action="store_true",
                    help="peak memory of global batch 512 as 1x512 ... 16x32 (iefcli.dist.memory); one process")
    ap.add_argument("--cap-mb", type=float, default=None,
                    help="with --memory: run every split again with its address space capped at this many MB")
    ap.add_argument("--model", default="attn", choices=("attn", "bert-lora"),
                    help="with --memory: the attention model (iefcli.dist.memory.AttnNet) or BERT with LoRA")
    a = ap.parse_args(argv)
    if a.memory:
        return _memory(a.model, a.cap_mb)

    comm = init_from_env("cpu")
    finished(False)  # until this run ends without error (see iefcli.dist.comm: the barrier at exit)
    torch.manual_seed(0)
    model = _model(a.d_in, a.hidden, a.depth, a.classes)
    params = trainable_params(model)
    p_size = sum(v.numel() for v in params.values())
    g = torch.Generator().manual_seed(1)
    batch = Batch(torch.randn(a.batch, a.d_in, generator=g), torch.randint(0, a.classes, (a.batch,), generator=g))
    opt = make_optimizer(OptimConfig(name=a.method, lr=1e-3, damping=1e-6, jacobian=a.jacobian,
                                     momentum=a.momentum), model=model, loss_fn=CrossEntropy())
    opt.fn = DistModelFn(model, opt.fn.loss_fn, comm=comm, accumulate=a.accumulate, keep_jacobians=a.method == "sf")
    state = opt.init(params)
    times, per_step = [], []
    for step in range(a.steps + 1):  # the first step is a warm-up
        before = (comm.bytes_gathered, comm.bytes_reduced, dict(comm.calls))
        t0 = time.perf_counter()
        params, state, metrics = opt.update(params, state, batch, key=step, lr=1e-3)
        float(metrics["cos_update_grad"])  # the loop logs it: the step is done when it is read
        if step:
            times.append(time.perf_counter() - t0)
            per_step.append((comm.bytes_gathered - before[0], comm.bytes_reduced - before[1],
                             {k: comm.calls[k] - before[2][k] for k in comm.calls}))
    n_local = -(-a.batch // comm.world)
    out = {
        "ranks": comm.world, "batch": a.batch, "accumulate": a.accumulate, "micro_batch": n_local // a.accumulate,
        "method": a.method, "jacobian": a.jacobian, "P": p_size,
        "gathered_bytes_per_step": per_step[-1][0], "reduced_bytes_per_step": per_step[-1][1],
        "all_gather_calls_per_step": per_step[-1][2]["all_gather"],
        "all_reduce_calls_per_step": per_step[-1][2]["all_reduce"],
        "predicted_fast_gather_bytes": predicted_gather_bytes(model, n_local, a.classes) if comm.world > 1 else 0,
        "P_bytes": 4 * p_size,
        "step_s_median": statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if comm.rank == 0:
        print(json.dumps(out))
    finished()
    return out


def _memory(model: str, cap_mb: float | None) -> dict:
    from iefcli.dist.memory import format_table, measure

    rows, ref = measure(model=model)
    print(format_table(rows), flush=True)
    out = {"model": model, "uncapped": rows}
    if cap_mb:
        capped, _ = measure(model=model, cap_mb=cap_mb, reference=ref)
        print(format_table(capped, cap_mb), flush=True)
        out["capped"] = capped
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

"""Measure the distributed / accumulated step: bytes moved, step time, peak memory.

    python -m iefcli.dist.bench --hidden 512 --batch 64                     # one process
    torchrun --standalone --nproc-per-node 2 -m iefcli.dist.bench --hidden 512 --batch 64
    python -m iefcli.dist.bench --batch 512 --accumulate 8                  # micro-batches of 64

One JSON line (rank 0): P, the global batch, bytes all_gathered / all_reduced per step by
this rank (payload, from :class:`iefcli.dist.comm.Comm`), the analysis' prediction for the
fast path, the median step time, and the peak resident memory of the process (ru_maxrss;
run one configuration per process). The model is a synthetic MLP (inputs ``--d-in``,
``--depth`` hidden layers of ``--hidden`` units, tanh, 10 classes) on random data.
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
from iefcli.core.methods import compute_direction
from iefcli.core.params import trainable_params
from iefcli.dist.comm import Comm, init_from_env
from iefcli.dist.grads import global_batch_grads


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
    a = ap.parse_args(argv)

    comm = init_from_env("cpu")
    torch.manual_seed(0)
    model = _model(a.d_in, a.hidden, a.depth, a.classes)
    params = trainable_params(model)
    p_size = sum(v.numel() for v in params.values())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(a.batch, a.d_in, generator=g)
    y = torch.randint(0, a.classes, (a.batch,), generator=g)
    lf = CrossEntropy()
    times, per_step = [], []
    for step in range(a.steps + 1):  # the first step is a warm-up
        g0, r0 = comm.bytes_gathered, comm.bytes_reduced
        t0 = time.perf_counter()
        bg = global_batch_grads(model, params, x, y, lf, comm=comm, accumulate=a.accumulate, jacobian=a.jacobian,
                                keep_jacobians=a.method == "sf")
        d, _ = compute_direction(a.method, bg, 1e-6, generator=torch.Generator().manual_seed(step))
        _ = bg.g  # the loop's metrics (grad_norm, cos_update_grad) combine g as well
        params = {k: v - 1e-3 * dv for (k, v), dv in zip(params.items(), bg.layout.unflatten(d).values())}
        if step:
            times.append(time.perf_counter() - t0)
            per_step.append((comm.bytes_gathered - g0, comm.bytes_reduced - r0))
    n_local = -(-a.batch // comm.world)
    out = {
        "ranks": comm.world, "batch": a.batch, "accumulate": a.accumulate, "micro_batch": n_local // a.accumulate,
        "method": a.method, "jacobian": a.jacobian, "P": p_size,
        "gathered_bytes_per_step": per_step[-1][0], "reduced_bytes_per_step": per_step[-1][1],
        "predicted_fast_gather_bytes": predicted_gather_bytes(model, n_local, a.classes) if comm.world > 1 else 0,
        "P_bytes": 4 * p_size,
        "step_s_median": statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if comm.rank == 0:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

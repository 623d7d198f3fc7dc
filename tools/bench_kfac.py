"""K-FAC family measurements (docs/kfac.md): gamma ratios on a trained run, and step times.

    python tools/bench_kfac.py gamma RUN_DIR [--batches 4] [--batch-size 40] [--dampings 1e-1,1e-3,...]
    python tools/bench_kfac.py time [--batch-sizes 32,128,512] [--model mlp] [--repeats 3] [--inv-interval 10]
    python tools/bench_kfac.py memory [--batch-sizes 32,512,2048]

gamma: for every checkpoint of RUN_DIR (a `ief train` run), in float64 on the first
``--batches`` training batches (in order), gamma(d)/gamma(SGD) for ef, ief, kfac, ekfac,
iekfac at each paper-scale damping (iefcli.core.methods.compute_direction; the K-FAC ones
stateless: factors and diagonal from that batch), averaged over the batches.
time: seconds per optimiser step on ``iefcli.bench``'s MLP (random batch), for SGD
(torch.optim), exact iEF (the core's fast path) and kfac/ekfac/iekfac (this package's pure
update), the K-FAC ones as (one inverse step + (I-1) plain steps) / I for inverse interval I.
memory: peak RSS above the workload's own, of a fresh process per (N, method) running two steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def cmd_gamma(a) -> dict:
    import iefcli.kfac as K
    from iefcli.core.jacobian import batch_grads
    from iefcli.core.methods import MethodOptions, compute_direction
    from iefcli.gamma import gamma_ratio
    from iefcli.train import rundir
    from iefcli.train.task import build_task

    K.register(fisher_type=a.fisher, seq_mode=a.seq_mode)
    recipe = rundir.load_recipe(a.run)
    task = build_task(recipe, "cpu")
    task.model.to(torch.float64)
    batches = []
    for i, b in enumerate(task.batches("train", a.batch_size)):
        if i >= a.batches:
            break
        x = b.inputs.to(torch.float64) if torch.is_floating_point(b.inputs) else b.inputs
        batches.append((x, b.targets))
    methods = a.methods.split(",")
    out = {}
    for step, ck in rundir.list_checkpoints(a.run):
        params = {k: v.to(torch.float64) for k, v in rundir.load_checkpoint_params(ck).items()}
        res = {m: {} for m in methods}
        for x, y in batches:
            bg = batch_grads(task.model, params, x, y, task.loss_fn, jacobian="vmap", forward=task.forward)
            for m in methods:
                for lam in a.dampings:
                    gen = torch.Generator().manual_seed(0)
                    d, _ = compute_direction(m, bg, lam, generator=gen, options=MethodOptions(dup_threshold=None))
                    res[m].setdefault(lam, []).append(float(gamma_ratio(bg, d)))
        out[step] = {m: {lam: statistics.mean(v) for lam, v in r.items()} for m, r in res.items()}
        print(f"step {step}")
        print("  damping  " + " ".join(f"{m:>9}" for m in methods))
        for lam in a.dampings:
            print(f"  {lam:7.0e}  " + " ".join(f"{out[step][m][lam]:9.3f}" for m in methods))
    return out


def cmd_time(a) -> dict:
    try:
        from iefcli.eval.bench import build_workload, make_step
    except ImportError:
        from iefcli.bench import build_workload, make_step
    import iefcli.kfac as K
    from iefcli.optim import ModelFn, OptimConfig

    torch.set_num_threads(a.threads)
    rows = {}
    for n in a.batch_sizes:
        wl = build_workload(a.model, n, seed=0)
        times: dict[str, float] = {}
        for m in ("sgd", "ief"):
            f = make_step(m, wl, damping=1e-7, lr=1e-6)
            f()
            ts = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
            times[m] = min(ts)
        batch = type("B", (), {"inputs": wl.inputs, "targets": wl.targets})()
        for m in K.METHODS:
            opt = K.KFACOptimizer(OptimConfig(name=m, lr=1e-6, damping=1e-3), ModelFn(wl.model, wl.loss_fn, wl.forward),
                                  options=K.KFACOptions(inv_interval=a.inv_interval))
            p = {k: v.detach() for k, v in wl.model.named_parameters()}
            _, st, _ = opt.update(p, opt.init(p), batch, key=0, lr=1e-6)  # warm-up; a state with bases
            t_inv, t_plain = [], []
            for i in range(2 * a.repeats):
                st = {**st, "step": torch.tensor(a.inv_interval if i % 2 == 0 else 1)}  # inverse / plain step
                t0 = time.perf_counter()
                _, new_st, _ = opt.update(p, st, batch, key=i, lr=1e-6)
                (t_inv if i % 2 == 0 else t_plain).append(time.perf_counter() - t0)
                st = new_st
            ti, tp = min(t_inv), min(t_plain)
            times[m] = (ti + (a.inv_interval - 1) * tp) / a.inv_interval
            times[m + "_inverse_step"] = ti
            times[m + "_plain_step"] = tp
        rows[n] = times
        print(f"N={n:4d}  " + "  ".join(f"{k}={v * 1e3:.1f}ms" for k, v in times.items()))
    return rows


def _one_step_peak(a) -> None:
    """(internal) one process: build the workload, run two steps of one method, print peak RSS in MiB."""
    import resource

    try:
        from iefcli.eval.bench import build_workload, make_step
    except ImportError:
        from iefcli.bench import build_workload, make_step
    import iefcli.kfac as K
    from iefcli.optim import ModelFn, OptimConfig

    torch.set_num_threads(1)
    wl = build_workload(a.model, a.n, seed=0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if a.method in ("sgd", "ief"):
        f = make_step(a.method, wl, damping=1e-7, lr=1e-6)
        f()
        f()
    else:
        opt = K.KFACOptimizer(OptimConfig(name=a.method, lr=1e-6, damping=1e-3),
                              ModelFn(wl.model, wl.loss_fn, wl.forward))
        p = {k: v.detach() for k, v in wl.model.named_parameters()}
        st = opt.init(p)
        batch = type("B", (), {"inputs": wl.inputs, "targets": wl.targets})()
        for i in range(2):  # an inverse step, then a plain one, with the state held
            p, st, _ = opt.update(p, st, batch, key=i, lr=1e-6)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": peak / 1024, "above_workload_mib": (peak - base) / 1024}))


def cmd_memory(a) -> dict:
    """Peak RSS of a fresh process per (N, method): two steps each (Linux ru_maxrss)."""
    import subprocess
    import sys

    rows = {}
    for n in a.batch_sizes:
        rows[n] = {}
        for m in ("sgd", "ief", "kfac", "ekfac", "iekfac"):
            out = subprocess.run([sys.executable, __file__, "_one", "--method", m, "--n", str(n), "--model", a.model],
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows[n][m] = json.loads(out)
        print(f"N={n:4d}  " + "  ".join(f"{m}={v['above_workload_mib']:.0f}MiB" for m, v in rows[n].items()))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gamma")
    g.add_argument("run")
    g.add_argument("--batches", type=int, default=4)
    g.add_argument("--batch-size", type=int, default=40)
    g.add_argument("--dampings", type=_floats, default=[1e-1, 1e-3, 1e-5, 1e-7, 1e-9])
    g.add_argument("--methods", default="ef,ief,kfac,ekfac,iekfac")
    g.add_argument("--fisher", default=None, choices=("sampled", "empirical"), help="default: per method")
    g.add_argument("--seq-mode", default="expand", choices=("expand", "reduce"))
    g.add_argument("--json")
    t = sub.add_parser("time")
    t.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[32, 128, 512])
    t.add_argument("--model", default="mlp")
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--inv-interval", type=int, default=10)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--json")
    mem = sub.add_parser("memory")
    mem.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[32, 512, 2048])
    mem.add_argument("--model", default="mlp")
    mem.add_argument("--json")
    one = sub.add_parser("_one")
    one.add_argument("--method", required=True)
    one.add_argument("--n", type=int, required=True)
    one.add_argument("--model", default="mlp")
    a = ap.parse_args()
    if a.cmd == "_one":
        return _one_step_peak(a)
    out = {"gamma": cmd_gamma, "time": cmd_time, "memory": cmd_memory}[a.cmd](a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

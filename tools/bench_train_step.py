"""Time an `ief train` step INSIDE the training loop against `ief bench`'s step (and, for the
torch.optim baselines, against a plain torch loop), paired and interleaved, in one process.

    python tools/bench_train_step.py                       # quickstart + bench-mlp x sgd, adamw, ief
    python tools/bench_train_step.py --recipes quickstart --optimizers sgd --steps 60 --json

For each (recipe, optimiser) one real training run (:func:`iefcli.train.loop.train`, into a
temporary run directory, no validation or checkpoint until the last step) is driven through its
own ``plan.batches_from``: the clock starts when the loop receives a batch and stops when it asks
for the next one, so a **loop step** is everything the loop does per step (the update, the host
read of loss and update norm, the state change, the metrics line on logging steps, events) and
excludes data loading. Right after each loop step, in the same iteration, come

- a **bench step**: ``iefcli.eval.bench.Step`` with the recipe's resolved optimiser config (same
  optimiser, lr, damping, batch size), on the recipe's first training batch: what ``ief bench
  --recipe R`` times;
- for sgd / adamw / adafactor, a **plain step**: ``opt.zero_grad(); loss(model(x), y).backward();
  opt.step()`` with the same ``torch.optim`` class and options on a copy of the model.

The last step (validation, checkpoint) and ``--skip`` first steps are left out. Means over the
steps (logging steps included, so their cost is spread as in a real run) and medians are
reported, wall and process CPU time; ratios are loop / bench and bench / plain. Absolute times on
a shared machine are noisy; the ratios come from paired steps.

``bench-mlp`` is the digits recipe with the bench's MLP (64-1024-1024-10, P = 1.13M).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RECIPES = {
    "quickstart": ("quickstart", []),
    "bench-mlp": ("digits-ief", ["model.sizes=[1024,1024]"]),
}
TORCH_OPTIMS = ("sgd", "adamw", "adafactor")


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _plain_step(task, cfg, batch):
    """A plain torch loop's step (module call, .backward(), torch.optim.step) on a copy of the model."""
    from iefcli.optim.torch_optims import TorchOptimizer

    model = copy.deepcopy(task.model).train(task.model.training)
    leaves = [p for p in model.parameters() if p.requires_grad]
    opt = TorchOptimizer(cfg, None)._make(leaves, cfg.lr)
    x, y = batch.inputs, batch.targets

    def call():
        out = model(**x) if isinstance(x, dict) else model(*x) if isinstance(x, tuple) else model(x)
        return out.logits if hasattr(out, "logits") else out

    def step():
        opt.zero_grad()
        task.loss_fn.per_sample(call(), y).mean().backward()
        opt.step()

    return step


def measure(recipe_name: str, optimizer: str, *, steps: int, skip: int, tensorboard: str = "auto") -> dict:
    from iefcli.eval.bench import Step, Workload
    from iefcli.train import loop
    from iefcli.train.extends import load_recipe
    from iefcli.train.task import build_task

    base, sets = RECIPES.get(recipe_name, (recipe_name, []))
    total = steps + skip + 1
    sets = [*sets, f"optimizer.name={optimizer}", f"train.steps={total}", f"train.eval_every={total}",
            f"train.checkpoint_every={total}", f"output.tensorboard={tensorboard}"]
    recipe = load_recipe(base, sets, notes=[])
    task = build_task(recipe, "cpu")
    plan = loop.plan_run(recipe, task)
    bs = recipe["train"]["batch_size"]
    first = next(task.batches("train", bs, torch.Generator().manual_seed(0)))
    wl = Workload(f"recipe:{recipe_name}", task.model, first.inputs, first.targets, task.loss_fn, task.forward, bs)
    try:
        # the bench's default step: the one `ief train` runs between log lines (the loop's mean
        # includes its logging steps, so the ratio carries their cost)
        bench = Step(optimizer, wl, config=plan.cfg, diagnostics=False)
    except TypeError:  # an older tree (before Step took a config): the same step by hand
        from iefcli.optim import make_optimizer

        bench = Step(optimizer, wl)
        bench.opt = make_optimizer(plan.cfg, model=wl.model, loss_fn=wl.loss_fn, forward=wl.forward)
        bench.lr, bench.state = plan.cfg.lr, bench.opt.init(bench.params)
    plain = _plain_step(task, plan.cfg, first) if optimizer in TORCH_OPTIMS else None
    rows: list[dict[str, float]] = []

    class TimedPlan(loop.Plan):
        def batches_from(self, step):
            for batch in super().batches_from(step):
                w0, c0 = _clock()
                yield batch
                w1, c1 = _clock()
                row = {"loop": w1 - w0, "loop_cpu": c1 - c0}
                bench()
                w2, c2 = _clock()
                row.update(bench=w2 - w1, bench_cpu=c2 - c1)
                if plain is not None:
                    plain()
                    w3, c3 = _clock()
                    row.update(plain=w3 - w2, plain_cpu=c3 - c2)
                rows.append(row)

    timed = TimedPlan(**{f: getattr(plan, f) for f in loop.Plan.__dataclass_fields__})
    with tempfile.TemporaryDirectory() as tmp:
        loop.train(recipe=recipe, run_dir=Path(tmp) / "run", plan=timed)
    kept = rows[skip:-1]  # the last step validates and checkpoints
    out = {"recipe": recipe_name, "optimizer": optimizer, "batch_size": bs, "steps": len(kept), "tensorboard": tensorboard,
           "loop_steps": len(rows), "bench_steps": bench.steps,
           "n_params": wl.n_params, "threads": torch.get_num_threads(), "log_every": recipe["train"]["log_every"]}
    for k in kept[0]:
        xs = [r[k] * 1e3 for r in kept]
        out[f"{k}_ms_mean"], out[f"{k}_ms_median"] = statistics.fmean(xs), statistics.median(xs)
    for a, b in (("loop", "bench"), ("bench", "plain"), ("loop", "plain")):
        if f"{b}_ms_mean" in out:
            out[f"{a}_over_{b}"] = out[f"{a}_ms_mean"] / out[f"{b}_ms_mean"]
            out[f"{a}_over_{b}_cpu"] = out[f"{a}_cpu_ms_mean"] / out[f"{b}_cpu_ms_mean"]
            out[f"{a}_over_{b}_median"] = out[f"{a}_ms_median"] / out[f"{b}_ms_median"]
    return out


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"  # noqa: E501


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default="quickstart,bench-mlp", help="built-in names, files, or bench-mlp")
    ap.add_argument("--optimizers", default="sgd,adamw,ief")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per run")
    ap.add_argument("--skip", type=int, default=3, help="untimed first steps (warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tensorboard", default="auto", choices=("auto", "on", "off"),
                    help="the recipes' output.tensorboard (auto: on when the package is installed, as in ief train)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    results = [measure(r, o, steps=a.steps, skip=a.skip, tensorboard=a.tensorboard)
               for r in a.recipes.split(",") for o in a.optimizers.split(",")]
    if a.json:
        print(json.dumps(results, indent=2))
        return 0
    print("| recipe | optimizer | bench ms | loop ms | loop/bench (wall, CPU) | plain ms | bench/plain (wall, CPU) "
          "| loop/plain (wall, CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['recipe']} | {r['optimizer']} | {r['bench_ms_mean']:.2f} | {r['loop_ms_mean']:.2f} | "
              f"{_fmt(r['loop_over_bench'])}, {_fmt(r['loop_over_bench_cpu'])} | "
              f"{_fmt(r.get('plain_ms_mean'))} | {_fmt(r.get('bench_over_plain'))}, {_fmt(r.get('bench_over_plain_cpu'))} | "
              f"{_fmt(r.get('loop_over_plain'))}, {_fmt(r.get('loop_over_plain_cpu'))} |")
    print(f"(means over {results[0]['steps']} paired steps, {results[0]['threads']} thread(s); medians in --json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

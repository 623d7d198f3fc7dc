"""The training loop: the shell around the pure optimiser step.

Read top to bottom: build the task and optimiser -> (resume) -> for each step:
lr from the schedule, one pure ``opt.update``, a NaN/Inf check, log, validate
(best/ on improvement), checkpoint -> test at the best checkpoint -> summary.

Determinism (what makes --resume exact): epoch e's batch order is
``randperm`` from a generator seeded with ``seed * 1_000_003 + e``; step t's
random key (SF's label draws) is ``seed * 1_000_003 + t`` (offset); the lr is a
function of t. A checkpoint therefore only needs (step, params, optimiser
state, best-so-far): the batches and keys after it are recomputed exactly.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from iefcli.core.jacobian import check_all_params_used
from iefcli.errors import EXIT_INTERRUPTED, IEFError, RunFailed, UsageError
from iefcli.optim import CURVATURE, config_from_recipe, make_optimizer
from iefcli.train import rundir
from iefcli.train.recipe import Recipe
from iefcli.train.schedule import lr_at
from iefcli.train.task import Task, build_task

SEED_STRIDE = 1_000_003
KEY_OFFSET = 7_919

class Interrupted(IEFError):
    """Ctrl-C during training, after the checkpoint was saved (exit 130)."""

    exit_code = EXIT_INTERRUPTED


# Event callback: on_event(kind, payload) with kind in start | step | eval | checkpoint | bad_step | end.
OnEvent = Callable[[str, dict], None]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * SEED_STRIDE + epoch)


def step_key(seed: int, step: int) -> int:
    return (seed * SEED_STRIDE + KEY_OFFSET + step) % (2**63 - 1)


def _better(a: float, b: float | None, mode: str) -> bool:
    if b is None:
        return True
    return a > b if mode == "max" else a < b


def run_dir_for(recipe: Recipe, out: str | Path | None) -> Path:
    if out is not None:
        return Path(out)
    return Path(recipe["output"]["dir"].replace("{name}", recipe["name"]))


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty directory unless --overwrite; with it, clear an old RUN directory only."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir}: exists and is not a directory")
    if rundir.is_nonempty_dir(run_dir):
        if not overwrite:
            raise UsageError(f"{run_dir}: run directory exists and is not empty (use --overwrite, or --resume {run_dir})")
        if not ((run_dir / rundir.RECIPE_FILE).exists() or (run_dir / rundir.METRICS_FILE).exists()):
            raise UsageError(f"{run_dir}: not a run directory (no recipe.yaml or metrics.jsonl); refusing to overwrite it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


@dataclass
class TrainState:
    """Loop counters saved in every checkpoint (trainer_state.json)."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_steps: int = 0
    elapsed_s: float = 0.0
    recent_losses: list[float] = field(default_factory=list)

    def as_json(self, seed: int, steps_per_epoch: int) -> dict:
        epoch, batch = divmod(self.step, steps_per_epoch)
        return {
            "step": self.step, "epoch": epoch, "batch_in_epoch": batch, "steps_per_epoch": steps_per_epoch,
            "data_order": {"generator_seed": seed * SEED_STRIDE + epoch, "rule": "randperm(n_train) per epoch"},
            "rng": {"step_key": step_key(seed, self.step), "rule": "seed*1000003 + 7919 + step"},
            "best_metric": self.best_metric, "best_step": self.best_step, "bad_steps": self.bad_steps,
            "elapsed_s": self.elapsed_s, "recent_losses": self.recent_losses,
        }


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    """0-d tensors -> Python numbers for logging (the host reads happen here, in the shell)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            v = v.item()
        if isinstance(v, bool):
            out[k] = v
        elif isinstance(v, int):
            out[k] = v
        else:
            out[k] = float(v)
    return out


def train(
    *,
    recipe: Recipe,
    run_dir: Path,
    resume: bool = False,
    on_event: OnEvent | None = None,
    device: str | None = None,
    task: Task | None = None,
) -> dict:
    """Train ``recipe`` into ``run_dir`` (already prepared; with ``resume`` it holds
    a previous run of this recipe). Returns the summary dict (also written to
    summary.json). Raises RunFailed (diverged), KeyboardInterrupt (after saving
    a checkpoint), UsageError (bad data/model keys found by the builders).
    ``task``: an already built task for ``recipe`` (else it is built here)."""
    emit = on_event or (lambda kind, payload: None)
    t_start = time.perf_counter()
    if task is None:
        task = build_task(recipe, device)
    tr = recipe["train"]
    seed = recipe["seed"]
    cfg = config_from_recipe(recipe["optimizer"])
    opt = make_optimizer(cfg, model=task.model, loss_fn=task.loss_fn, forward=task.forward)
    spe = task.n_batches("train", tr["batch_size"], tr["drop_last"])
    if spe == 0:
        raise recipe.error("train.batch_size", f"larger than the training split ({task.size('train')} samples) with drop_last")
    total = tr["steps"] if tr["steps"] is not None else tr["epochs"] * spe
    sched = recipe["schedule"]
    if sched["warmup_steps"] > total:
        raise recipe.error("schedule.warmup_steps", f"must be <= the run's {total} steps, got {sched['warmup_steps']}")

    params = task.params()
    if cfg.name in CURVATURE:
        # torch.func gives an unused trainable parameter a zero per-sample gradient without a
        # word; say so (naming it) before the first step rather than train it with zeros.
        first = next(iter(task.batches("train", 1)))
        check_all_params_used(task.model, params, first.inputs, task.forward)
    ostate = opt.init(params)
    st = TrainState()
    if resume:
        ckpts = rundir.list_checkpoints(run_dir)
        if not ckpts:
            raise UsageError(f"{run_dir}: no checkpoint to resume from")
        _, ck = ckpts[-1]
        params = rundir.load_params(params, ck)
        loaded = rundir.load_optimizer_state(ck, device=task.device)
        # Keys with no tensors (torch.optim state before its first step) are absent on disk.
        ostate = {k: loaded.get(k, v) for k, v in ostate.items()}
        ts = rundir.read_trainer_state(ck)
        st = TrainState(step=int(ts["step"]), best_metric=ts.get("best_metric"), best_step=ts.get("best_step"),
                        bad_steps=int(ts.get("bad_steps", 0)), elapsed_s=float(ts.get("elapsed_s", 0.0)),
                        recent_losses=list(ts.get("recent_losses", [])))
        rundir.remove_stale_temps(run_dir)
    else:
        rundir.atomic_write_text(run_dir / rundir.RECIPE_FILE, recipe.to_yaml())

    writer = rundir.MetricsWriter(run_dir, truncate_after_step=st.step if resume else None)
    metric, mode = task.metric_name, task.metric_mode
    elapsed0 = st.elapsed_s
    t_loop = time.perf_counter()

    def now() -> float:
        return elapsed0 + (time.perf_counter() - t_loop)

    def save(ckpt: Path, metrics: dict) -> None:
        st.elapsed_s = now()
        rundir.write_checkpoint(
            ckpt, params=params, optimizer_state=ostate, trainer_state=st.as_json(seed, spe),
            meta={"step": st.step, "epoch": st.step / spe, "metrics": metrics, "optimizer": cfg.name},
        )
        emit("checkpoint", {"path": str(ckpt), "step": st.step})

    def validate() -> dict:
        ev = task.evaluate(params, "val")
        rec = {"step": st.step, "epoch": st.step / spe, "split": "val", **ev,
               "lr": lr_at(max(0, st.step - 1), total, cfg.lr, sched["kind"], sched["warmup_steps"], sched["min_lr_ratio"]),
               "time": now()}
        writer.write(rec)
        emit("eval", rec)
        value = ev.get(metric)
        if value is not None and math.isfinite(value) and _better(value, st.best_metric, mode):
            st.best_metric, st.best_step = value, st.step
            save(run_dir / rundir.BEST_DIR, {"val": ev})
        return ev

    status = "running"
    emit("start", {"total_steps": total, "start_step": st.step, "steps_per_epoch": spe, "run_dir": str(run_dir),
                   "metric": metric, "optimizer": cfg.name, "device": str(task.device)})
    try:
        if st.step == 0:
            validate()
            save(rundir.checkpoint_dir(run_dir, 0), {})
        last_step_time = 0.0
        while st.step < total:
            epoch, skip = divmod(st.step, spe)
            for batch in task.batches("train", tr["batch_size"], epoch_generator(seed, epoch),
                                      drop_last=tr["drop_last"], skip=skip):
                t0 = time.perf_counter()
                lr = lr_at(st.step, total, cfg.lr, sched["kind"], sched["warmup_steps"], sched["min_lr_ratio"])
                new_params, new_state, m = opt.update(params, ostate, batch, key=step_key(seed, st.step), lr=lr)
                # One host read per step: is the loss and the update finite?
                ok = bool(torch.isfinite(m["loss"]) & torch.isfinite(m["update_norm"]))
                # One statement with no calls in it, so Ctrl-C cannot land between
                # counting the step and applying it (the checkpoint must match).
                params, ostate, st.step = (new_params, new_state, st.step + 1) if ok else (params, ostate, st.step + 1)
                if ok:
                    st.bad_steps = 0
                    st.recent_losses = (st.recent_losses + [float(m["loss"])])[-spe:]
                else:
                    st.bad_steps += 1
                    rec = {"step": st.step, "epoch": st.step / spe, "split": "train", "event": "bad_step",
                           "loss": float(m["loss"]), "update_norm": float(m["update_norm"]), "lr": lr,
                           "time": now(), "skipped": True, "consecutive_bad_steps": st.bad_steps}
                    writer.write(rec)
                    emit("bad_step", rec)
                    if st.bad_steps >= tr["max_bad_steps"]:
                        raise RunFailed(
                            f"{st.bad_steps} consecutive steps with NaN/Inf loss or update (last at step {st.step}); "
                            f"stopped; the last good checkpoint is in {run_dir}"
                        )
                last_step_time = time.perf_counter() - t0
                if ok and (st.step % tr["log_every"] == 0 or st.step == total):
                    rec = {"step": st.step, "epoch": st.step / spe, "split": "train", **_floats(m), "lr": lr,
                           "time": now(), "step_time_s": last_step_time}
                    writer.write(rec)
                if ok:
                    emit("step", {"step": st.step, "epoch": st.step / spe, "loss": float(m["loss"]), "lr": lr,
                                  "step_time_s": last_step_time, "total": total})
                if st.step % tr["eval_every"] == 0 or st.step == total:
                    validate()
                if st.step % tr["checkpoint_every"] == 0 or st.step == total:
                    save(rundir.checkpoint_dir(run_dir, st.step), {})
                if st.step >= total:
                    break
        status = "completed"
    except KeyboardInterrupt:
        status = "interrupted"
        save(rundir.checkpoint_dir(run_dir, st.step), {})
        _finish(task, recipe, run_dir, writer, st, status, total, cfg, metric, now(), t_start, emit)
        raise Interrupted(
            f"interrupted at step {st.step}; checkpoint saved; continue with: ief train --resume {run_dir}"
        ) from None
    except RunFailed:
        status = "failed"
        _finish(task, recipe, run_dir, writer, st, status, total, cfg, metric, now(), t_start, emit)
        raise
    return _finish(task, recipe, run_dir, writer, st, status, total, cfg, metric, now(), t_start, emit)


def _finish(task, recipe, run_dir, writer, st, status, total, cfg, metric, wall, t_start, emit) -> dict:
    """Test at the best-validation checkpoint (the paper's protocol), write summary.json."""
    test = None
    best = run_dir / rundir.BEST_DIR
    if status == "completed" and rundir.is_checkpoint(best):
        test = task.evaluate(rundir.load_params(task.params(), best), "test")
        rec = {"step": st.best_step, "epoch": None, "split": "test", **test, "lr": None, "time": wall,
               "checkpoint": "best"}
        writer.write(rec)
        emit("eval", rec)
    writer.close()
    done = st.step
    summary = {
        "recipe": recipe["name"],
        "status": status,
        "optimizer": cfg.name,
        "lr": cfg.lr,
        "damping": cfg.damping if cfg.name in CURVATURE else None,
        "metric": metric,
        "metric_mode": task.metric_mode,
        "final_train_loss": (sum(st.recent_losses) / len(st.recent_losses)) if st.recent_losses else None,
        "best_val_metric": st.best_metric,
        "best_val_step": st.best_step,
        "test_metric": test.get(metric) if test else None,
        "test_loss": test.get("loss") if test else None,
        "test": test,
        "total_steps": done,
        "planned_steps": total,
        "wall_time_s": wall,
        "steps_per_s": (done / wall) if wall > 0 else None,
        "device": str(task.device),
        "run_dir": str(run_dir),
    }
    rundir.atomic_write_json(run_dir / rundir.SUMMARY_FILE, summary)
    emit("end", summary)
    return summary


def train_from_cli(
    *,
    recipe: str | None,
    sets: list[str] | tuple[str, ...] = (),
    out: str | Path | None = None,
    overwrite: bool = False,
    resume: str | Path | None = None,
    on_event: OnEvent | None = None,
) -> dict:
    """What `ief train` does: resolve the recipe (or the run to resume), check
    everything, prepare the run directory, train. Returns the summary."""
    from iefcli.train.recipe import load_recipe_file

    if resume is not None:
        if recipe is not None:
            raise UsageError("give either a RECIPE or --resume RUN_DIR, not both")
        if sets:
            raise UsageError("--set cannot be combined with --resume (the run's saved recipe.yaml is used)")
        if out is not None:
            raise UsageError("--out cannot be combined with --resume (the run continues in RUN_DIR)")
        run_dir = Path(resume)
        r = rundir.load_recipe(run_dir)
        if not rundir.list_checkpoints(run_dir):
            raise UsageError(f"{run_dir}: no checkpoint to resume from")
        return train(recipe=r, run_dir=run_dir, resume=True, on_event=on_event)
    if recipe is None:
        raise UsageError("missing RECIPE (a YAML file or a built-in name; see `ief recipes`)")
    r = load_recipe_file(recipe, sets)
    run_dir = run_dir_for(r, out)
    if rundir.is_nonempty_dir(run_dir) and not overwrite:
        raise UsageError(f"{run_dir}: run directory exists and is not empty (use --overwrite, or --resume {run_dir})")
    # Build the task before touching the directory: data/model key errors
    # must not cost an existing run.
    task = build_task(r)
    prepare_run_dir(run_dir, overwrite)
    return train(recipe=r, run_dir=run_dir, resume=False, on_event=on_event, task=task)

"""The training loop: the shell around the pure optimiser step.

:func:`train` reads top to bottom: plan the run (optimiser, steps, every check
that needs the data and the model) -> the starting state (fresh, or the last
checkpoint) -> for each step: lr from the schedule, one pure ``opt.update``,
one host read (loss and update norm: is the step finite?), log, validate
(best/ on improvement), checkpoint -> test at the best checkpoint -> summary.

The lagged read (:data:`LAGGED_READ`; by default on every device but the CPU):
step k is kept or rejected on the device (:func:`_select`: ``torch.where`` of
the new and old params/state), step k+1 is queued, and only then is step k read
and accounted (:class:`Pending` steps in the state; ``settle``). Steps whose
values are needed at once (a train line, validation, a checkpoint, the last
step, Ctrl-C) are read first, so every file written is the same as with the
synchronous read.

Determinism (what makes --resume exact): epoch e's batch order is
``randperm`` from a generator seeded with ``seed * 1_000_003 + e``; step t's
random key (SF's label draws) is ``seed * 1_000_003 + 7_919 + t``; the lr is a
function of t. A checkpoint therefore only needs (step, params, optimiser
state, best-so-far): the batches and keys after it are recomputed exactly.

Ctrl-C: the state moves by ONE assignment at a time (``st = st.queued(...)``
when a step is taken, ``st.settled(...)`` when it is read), so a KeyboardInterrupt
leaves a whole state, never a mix; the loop reads the steps still pending, saves a
checkpoint and raises :class:`iefcli.errors.Interrupted`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from iefcli.core.jacobian import check_all_params_used
from iefcli.core.params import Params
from iefcli.errors import Interrupted, RunFailed, UsageError
from iefcli.optim import CURVATURE, config_from_recipe, make_optimizer
from iefcli.optim.base import OptimConfig, Optimizer, update_step
from iefcli.train import rundir
from iefcli.train.recipe import Recipe
from iefcli.train.schedule import lr_at
from iefcli.train.jsonout import stamp
from iefcli.train.tblog import open_metrics_writer
from iefcli.train.user_kinds import record_import_paths
from iefcli.train.task import Batch, Task, build_task

SEED_STRIDE = 1_000_003
KEY_OFFSET = 7_919

# Event callback: on_event(kind, payload) with kind in
# start | step | eval | checkpoint | checkpoint_skipped | bad_step | end.
OnEvent = Callable[[str, dict], None]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * SEED_STRIDE + epoch)


def step_key(seed: int, step: int) -> int:
    return (seed * SEED_STRIDE + KEY_OFFSET + step) % (2**63 - 1)


# ----------------------------------------------------------------------------- the run's plan and state


@dataclass(frozen=True)
class Plan:
    """What does not change while the run goes: built and checked before anything is written."""

    recipe: Recipe
    task: Task
    cfg: OptimConfig
    opt: Optimizer
    steps_per_epoch: int
    total: int

    @property
    def seed(self) -> int:
        return self.recipe["seed"]

    def lr(self, step: int) -> float:
        """The lr of 0-based ``step``."""
        s = self.recipe["schedule"]
        return lr_at(step, self.total, self.cfg.lr, s["kind"], s["warmup_steps"], s["min_lr_ratio"])

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch

    def batches_from(self, step: int) -> Iterator[Batch]:
        """The training batches of steps ``step``, ``step + 1``, ... up to the run's total."""
        tr = self.recipe["train"]
        while step < self.total:
            epoch, skip = divmod(step, self.steps_per_epoch)
            for batch in self.task.batches("train", tr["batch_size"], epoch_generator(self.seed, epoch),
                                           drop_last=tr["drop_last"], skip=skip):
                yield batch
                step += 1
                if step >= self.total:
                    return


def plan_run(recipe: Recipe, task: Task) -> Plan:
    """The optimiser and the step count, and every check that needs the data and the model."""
    tr = recipe["train"]
    cfg = config_from_recipe(recipe["optimizer"])
    opt = make_optimizer(cfg, model=task.model, loss_fn=task.loss_fn, forward=task.forward)
    spe = task.n_batches("train", tr["batch_size"], tr["drop_last"])
    if spe == 0:
        raise recipe.error("train.batch_size", f"larger than the training split ({task.size('train')} samples) with drop_last")
    total = tr["steps"] if tr["steps"] is not None else tr["epochs"] * spe
    if recipe["schedule"]["warmup_steps"] > total:
        raise recipe.error("schedule.warmup_steps",
                           f"must be <= the run's {total} steps, got {recipe['schedule']['warmup_steps']}")
    if cfg.name in CURVATURE:
        # torch.func gives an unused trainable parameter a zero per-sample gradient without a
        # word; say so (naming it) before the first step rather than train it with zeros.
        first = next(iter(task.batches("train", 1)))
        check_all_params_used(task.model, task.params(), first.inputs, task.forward)
    plan = Plan(recipe=recipe, task=task, cfg=cfg, opt=opt, steps_per_epoch=spe, total=total)
    if tr.get("accumulate", 1) > 1 or os.environ.get("WORLD_SIZE", "1") != "1":
        from iefcli.dist.train import setup_plan  # ranks (torchrun) and micro-batches: the global batch

        setup_plan(plan)
    return plan


@dataclass(frozen=True)
class Pending:
    """A step taken whose host values (its loss and update norm: was it finite?) are not read yet."""

    step: int  # the run's step count after it
    lr: float
    metrics: dict[str, Any]  # 0-d tensors: loss, update_norm (and a logging step's diagnostics)
    logs: bool  # it writes a train line
    t0: float  # time.perf_counter() when it started
    new: tuple[Params, dict] | None = None  # read synchronously: its params and state, kept if finite
    host: dict | None = None  # the old values of state tensors kept on the host (see _select), if any


@dataclass(frozen=True)
class TrainState:
    """Everything the loop carries from one step to the next; a checkpoint saves all of it.

    ``lr`` is the lr of the last step taken (what a validation line reports).
    """

    params: Params
    opt_state: dict
    step: int = 0
    lr: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    bad_steps: int = 0
    elapsed_s: float = 0.0
    recent_losses: tuple[float, ...] = field(default_factory=tuple)
    pending: tuple[Pending, ...] = ()  # steps taken whose loss / update norm are not read yet (oldest first)

    def _with(self, **changes: Any) -> TrainState:
        """``dataclasses.replace`` without its per-call field walk (twice per step in the loop)."""
        new = object.__new__(TrainState)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new

    def queued(self, params: Params, opt_state: dict, p: Pending) -> TrainState:
        """Step ``p`` taken, its host values not read yet: the step counts; ``params`` / ``opt_state``
        are already the right ones (lagged read: ``where(ok, new, old)`` on the device), or the old
        ones while ``p.new`` waits for the read (the synchronous read)."""
        return self._with(params=params, opt_state=opt_state, step=p.step, lr=p.lr, pending=(*self.pending, p))

    def settled(self, good: bool, loss: float, window: int) -> TrainState:
        """The oldest pending step read: a good one resets the bad-step count and joins the recent
        losses (and, read synchronously, brings its params and state); a bad one counts."""
        p, rest = self.pending[0], self.pending[1:]
        if not good:
            return self._with(pending=rest, bad_steps=self.bad_steps + 1)
        params, opt_state = self.params, self.opt_state
        if p.new is not None:
            assert not rest, "a step read synchronously is the newest pending one"
            params, opt_state = p.new
        return self._with(params=params, opt_state=opt_state, pending=rest, bad_steps=0,
                          recent_losses=(*self.recent_losses, loss)[-window:])

    def trainer_json(self, seed: int, steps_per_epoch: int) -> dict:
        epoch, batch = divmod(self.step, steps_per_epoch)
        return {
            "step": self.step, "epoch": epoch, "batch_in_epoch": batch, "steps_per_epoch": steps_per_epoch,
            "data_order": {"generator_seed": seed * SEED_STRIDE + epoch, "rule": "randperm(n_train) per epoch"},
            "rng": {"step_key": step_key(seed, self.step), "rule": "seed*1000003 + 7919 + step"},
            "best_metric": self.best_metric, "best_step": self.best_step, "bad_steps": self.bad_steps,
            "elapsed_s": self.elapsed_s, "recent_losses": list(self.recent_losses),
        }


def initial_state(plan: Plan) -> TrainState:
    params = plan.task.params()
    return TrainState(params=params, opt_state=plan.opt.init(params), lr=plan.lr(0))


def resumed_state(plan: Plan, run_dir: Path) -> TrainState:
    """The state saved in the run's last step checkpoint."""
    ckpts = rundir.list_checkpoints(run_dir)
    if not ckpts:
        raise UsageError(f"{run_dir}: no checkpoint to resume from")
    _, ck = ckpts[-1]
    params = rundir.load_params(plan.task.params(), ck)
    rundir.check_finite_params(params, ck / rundir.PARAMS_FILE)
    fresh = plan.opt.init(params)
    loaded = rundir.load_optimizer_state(ck, device=plan.task.device)
    rundir.check_optimizer_state(fresh, loaded, ck / rundir.OPTIMIZER_FILE, params)
    # Keys with no tensors (torch.optim state before its first step) are absent on disk.
    opt_state = {k: loaded.get(k, v) for k, v in fresh.items()}
    ts = rundir.read_trainer_state(ck)
    rundir.check_trainer_state(ck, ts, plan.total)
    step = int(ts["step"])
    return TrainState(params=params, opt_state=opt_state, step=step, lr=plan.lr(max(0, step - 1)),
                      best_metric=ts.get("best_metric"), best_step=ts.get("best_step"),
                      bad_steps=int(ts.get("bad_steps", 0)), elapsed_s=float(ts.get("elapsed_s", 0.0)),
                      recent_losses=tuple(ts.get("recent_losses", [])))


def _host_values(metrics: dict[str, Any]) -> dict[str, Any]:
    """0-d device tensors -> Python numbers in ONE host read (ints and bools keep their type)."""
    tensors = {k: v for k, v in metrics.items() if isinstance(v, Tensor)}
    read = torch.stack([v.detach().to(torch.float64) for v in tensors.values()]).tolist() if tensors else []
    host = {k: bool(x) if t.dtype == torch.bool else x if t.is_floating_point() else int(x)
            for (k, t), x in zip(tensors.items(), read)}
    return {k: host[k] if k in host else v if isinstance(v, (bool, int)) else float(v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------- the lagged read

LAGGED_READ: bool | None = None
"""Read a step's loss and update norm to the host one step LATE (after the next step is queued):
None (auto) on every device but the CPU, True / False to force it either way. On the CPU the read is a
memory read and the per-step ``torch.where`` over the parameters would only cost a pass over them."""


def lagged_read(device: torch.device | str) -> bool:
    """Whether a run on ``device`` reads its steps' host values one step late (:data:`LAGGED_READ`)."""
    if LAGGED_READ is not None:
        return bool(LAGGED_READ)
    return torch.device(device).type != "cpu"


def _finite(m: dict[str, Any], device: torch.device) -> Tensor:
    """The step's verdict as a 0-d bool tensor on ``device``, without a host read."""
    ok = torch.isfinite(torch.as_tensor(m["loss"])) & torch.isfinite(torch.as_tensor(m["update_norm"]))
    return ok if ok.device == device else ok.to(device)


def on_host(t: Tensor, ok: Tensor) -> bool:
    """A state tensor kept on the CPU next to a run on an accelerator (torch.optim's and K-FAC's step
    counters: the optimiser reads them on the host). The lagged read cannot ``where`` it on the device."""
    return t.device.type == "cpu" and ok.device.type != "cpu"


def _select(ok: Tensor, new: Any, old: Any, host: dict | None = None) -> Any:
    """``torch.where(ok, new, old)`` tensor by tensor over matching nested dicts, on the device (no host
    read); :data:`_NO` when the two do not match (keys, shapes, dtypes, a tensor on another device,
    unequal non-tensors: torch.optim's state before its first step): then only the host can choose.

    A tensor :func:`on_host` (given ``host``, a dict) takes the NEW value, as if the step were finite;
    its old value goes into ``host`` under the same keys: if the step turns out bad, the loop puts it
    back (:func:`_put_back`) and takes the next step again."""
    if isinstance(new, Tensor):
        if not isinstance(old, Tensor) or old.shape != new.shape or old.dtype != new.dtype or old.device != new.device:
            return _NO
        if host is not None and on_host(new, ok):
            host[_OLD] = old
            return new
        if new.device != ok.device:
            return _NO
        return new if new is old else torch.where(ok, new, old)
    if isinstance(new, dict):
        if not isinstance(old, dict) or new.keys() != old.keys():
            return _NO
        out = {}
        for k, v in new.items():
            sub = {} if host is not None else None
            out[k] = _select(ok, v, old[k], sub)
            if out[k] is _NO:
                return _NO
            if sub:
                host[k] = sub
        return out
    if isinstance(new, (tuple, list)):
        if type(old) is not type(new) or len(old) != len(new):
            return _NO
        out = []
        for i, (a, b) in enumerate(zip(new, old)):
            sub = {} if host is not None else None
            out.append(_select(ok, a, b, sub))
            if out[-1] is _NO:
                return _NO
            if sub:
                host[i] = sub
        return type(new)(out)
    return new if type(new) is type(old) and isinstance(new, (int, float, str, bool, type(None))) and new == old \
        else _NO


def _put_back(tree: Any, host: dict) -> Any:
    """``tree`` with the old values :func:`_select` kept in ``host`` put back in their places."""
    if _OLD in host:
        return host[_OLD]
    if isinstance(tree, dict):
        return {k: _put_back(v, host[k]) if k in host else v for k, v in tree.items()}
    return type(tree)(_put_back(v, host[i]) if i in host else v for i, v in enumerate(tree))


_OLD = object()
_NO = object()


def _better(a: float, b: float | None, mode: str) -> bool:
    return b is None or (a > b if mode == "max" else a < b)


# ----------------------------------------------------------------------------- the loop


class Recorder:
    """Where the loop's results go: metrics.jsonl, checkpoints, best/, summary.json, the
    events (``on_event``) and the run's clock (elapsed time carries over a resume)."""

    def __init__(self, plan: Plan, run_dir: Path, state: TrainState, *, resume: bool, on_event: OnEvent | None):
        self.plan, self.run_dir = plan, run_dir
        self.emit = on_event or (lambda kind, payload: None)
        if resume:
            rundir.remove_stale_temps(run_dir)
        else:
            rundir.atomic_write_text(run_dir / rundir.RECIPE_FILE, plan.recipe.to_yaml())
            record_import_paths(run_dir, plan.recipe)  # a model/data kind by import path: where its code lives
        self.writer = open_metrics_writer(run_dir, truncate_after_step=state.step if resume else None,
                                          mode=plan.recipe["output"].get("tensorboard", "auto"))
        self._elapsed0, self._t0 = state.elapsed_s, time.perf_counter()
        self._val_loss: tuple[int, float] | None = None  # (step, val loss) of the last validation
        ckpts = rundir.list_checkpoints(run_dir) if resume else []
        self.last_checkpoint: Path | None = ckpts[-1][1] if ckpts else None

    def now(self) -> float:
        return self._elapsed0 + (time.perf_counter() - self._t0)

    def record(self, rec: dict, event: str | None = None) -> None:
        """One metrics.jsonl line (and the event of that name)."""
        self.writer.write(rec)
        if event is not None:
            self.emit(event, rec)

    def save(self, state: TrainState, ckpt: Path, metrics: dict | None = None) -> None:
        plan = self.plan
        rundir.write_checkpoint(
            ckpt, params=state.params, optimizer_state=state.opt_state,
            trainer_state=dataclasses.replace(state, elapsed_s=self.now()).trainer_json(plan.seed, plan.steps_per_epoch),
            meta={"step": state.step, "epoch": plan.epoch(state.step), "metrics": metrics or {}, "optimizer": plan.cfg.name},
        )
        self.emit("checkpoint", {"path": str(ckpt), "step": state.step})

    def validate(self, state: TrainState) -> TrainState:
        """Log the val metrics; a finite improvement becomes best/ (written before the state counts it)."""
        task = self.plan.task
        ev = task.evaluate(state.params, "val")
        self.record({"step": state.step, "epoch": self.plan.epoch(state.step), "split": "val", **ev, "lr": state.lr,
                     "time": self.now()}, "eval")
        self._val_loss = (state.step, ev["loss"])
        value = ev.get(task.metric_name)
        if not (math.isfinite(ev["loss"]) and value is not None and math.isfinite(value)
                and _better(value, state.best_metric, task.metric_mode)):
            return state  # a diverged model (non-finite loss) is never the best one
        best = dataclasses.replace(state, best_metric=value, best_step=state.step)
        self.save(best, self.run_dir / rundir.BEST_DIR, {"val": ev})
        return best

    def checkpoint(self, state: TrainState) -> bool:
        """checkpoints/step-N, only of parameters with a finite loss: a diverged step
        (finite but blown-up parameters) never reaches a checkpoint. The loss is the
        validation loss when this step was validated, else that of the first training batch."""
        if self._val_loss is not None and self._val_loss[0] == state.step:
            loss = self._val_loss[1]
        else:
            batch = next(self.plan.task.batches("train", self.plan.recipe["train"]["batch_size"]))
            loss = float(self.plan.task.loss_at(state.params, batch))  # one host read per checkpoint
        if not math.isfinite(loss):
            self.record({"step": state.step, "epoch": self.plan.epoch(state.step), "split": "train",
                         "event": "checkpoint_skipped", "loss": loss, "lr": state.lr, "time": self.now(),
                         "skipped": True}, "checkpoint_skipped")
            return False
        ckpt = rundir.checkpoint_dir(self.run_dir, state.step)
        self.save(state, ckpt)
        self.last_checkpoint = ckpt
        return True

    def finish(self, st: TrainState, status: str) -> dict:
        """Test at the best-validation checkpoint (the paper's protocol), write summary.json."""
        plan, task, run_dir = self.plan, self.plan.task, self.run_dir
        metric, cfg, wall = task.metric_name, plan.cfg, self.now()
        test = None
        best = run_dir / rundir.BEST_DIR
        if status == "completed" and rundir.is_checkpoint(best):
            test = task.evaluate(rundir.load_params(task.params(), best), "test")
            self.record({"step": st.best_step, "epoch": None, "split": "test", **test, "lr": None, "time": wall,
                         "checkpoint": "best"}, "eval")
        self.writer.close()
        summary = stamp({
            "recipe": plan.recipe["name"],
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
            "total_steps": st.step,
            "planned_steps": plan.total,
            "wall_time_s": wall,
            "steps_per_s": (st.step / wall) if wall > 0 else None,
            "device": str(task.device),
            "run_dir": str(run_dir),
        })
        rundir.atomic_write_json(run_dir / rundir.SUMMARY_FILE, summary)
        self.emit("end", summary)
        return summary


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold SIGINT (a second Ctrl-C) while the interrupted run saves; it is ignored, not queued
    (the run is stopping anyway). Only the main thread can set signal handlers; elsewhere a no-op."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def train(
    *,
    recipe: Recipe,
    run_dir: Path,
    resume: bool = False,
    on_event: OnEvent | None = None,
    device: str | None = None,
    task: Task | None = None,
    plan: Plan | None = None,
) -> dict:
    """Train ``recipe`` into ``run_dir`` (already prepared; with ``resume`` it holds
    a previous run of this recipe). Returns the summary dict (also written to
    summary.json). Raises RunFailed (diverged), Interrupted (Ctrl-C, after saving
    a checkpoint), UsageError (bad data/model keys found by the builders).
    ``task`` / ``plan``: already built for ``recipe`` (else built here)."""
    if plan is None:
        plan = plan_run(recipe, task if task is not None else build_task(recipe, device))
    tr, total = recipe["train"], plan.total
    st = resumed_state(plan, run_dir) if resume else initial_state(plan)
    log = _recorder_class()(plan, run_dir, st, resume=resume, on_event=on_event)
    log.emit("start", {"total_steps": total, "start_step": st.step, "steps_per_epoch": plan.steps_per_epoch,
                       "run_dir": str(run_dir), "metric": plan.task.metric_name, "optimizer": plan.cfg.name,
                       "device": str(plan.task.device)})
    lag = lagged_read(plan.task.device)
    pdev = next(iter(st.params.values())).device if st.params else plan.task.device  # where ok lives
    before = st  # the state the newest step was taken from
    last_read = -math.inf  # perf_counter() of the last host read of a step

    def read_oldest(st: TrainState) -> tuple[TrainState, tuple]:
        """The host read of the oldest pending step (ONE read: its loss and update norm, or on a
        logging step every metric) and the state that counts it."""
        nonlocal last_read
        p = st.pending[0]
        if p.logs:
            host = _host_values(p.metrics)
            loss, update_norm = host["loss"], host["update_norm"]
        else:
            host = None
            loss, update_norm = torch.stack([p.metrics["loss"].to(torch.float64),
                                             p.metrics["update_norm"].to(torch.float64)]).tolist()
        now = time.perf_counter()
        # the step's time: from its start, or from the previous read when that came later (the
        # lagged read: the host queued this step before reading the previous one), to its own read
        step_time, last_read = now - max(p.t0, last_read), now
        good = math.isfinite(loss) and math.isfinite(update_norm)
        return st.settled(good, loss, window=plan.steps_per_epoch), (p, good, loss, update_norm, host, step_time)

    def account(st: TrainState, read: tuple) -> None:
        """A read step's lines and events; RunFailed after max_bad_steps bad steps in a row."""
        p, good, loss, update_norm, host, step_time = read
        if good:
            if p.logs:  # a log line reads every diagnostic (read with the loss: one host read)
                log.record({"step": p.step, "epoch": plan.epoch(p.step), "split": "train", **host,
                            "lr": p.lr, "time": log.now(), "step_time_s": step_time})
            log.emit("step", {"step": p.step, "epoch": plan.epoch(p.step), "loss": loss, "lr": p.lr,
                              "step_time_s": step_time, "total": total})
            return
        log.record({"step": p.step, "epoch": plan.epoch(p.step), "split": "train", "event": "bad_step",
                    "loss": loss, "update_norm": update_norm, "lr": p.lr, "time": log.now(), "skipped": True,
                    "consecutive_bad_steps": st.bad_steps}, "bad_step")
        if st.bad_steps >= tr["max_bad_steps"]:
            err = RunFailed(f"{st.bad_steps} consecutive steps with NaN/Inf loss or update "
                            f"(last at step {p.step}); stopped; the last good checkpoint is "
                            f"{log.last_checkpoint}")
            # the state as of that step (under the lagged read the next step is already queued: dropped)
            err.state = dataclasses.replace(st, step=p.step, lr=p.lr, pending=())
            raise err

    def settle(keep: int = 0) -> bool:
        """Read and account the pending steps of ``st``, all but the newest ``keep`` (one state
        assignment per step read: a Ctrl-C leaves each read step counted once). True when a bad step
        had kept state values on the host (:func:`_select`): the newer step, taken on them as if that
        step were finite, is dropped and the state is the bad step's, with the old values put back;
        the loop takes the newer step's batch again."""
        nonlocal st
        while len(st.pending) > keep:
            st, read = read_oldest(st)
            account(st, read)
            p, good = read[0], read[1]
            if not good and p.host is not None:
                if not st.pending:  # p is the newest step: only its host-kept values to put back
                    params, opt_state = _put_back((st.params, st.opt_state), p.host)
                    st = dataclasses.replace(st, params=params, opt_state=opt_state)
                    continue
                assert before.pending[-1] is p and before.step == p.step, "the newer step started from p's state"
                params, opt_state = _put_back((before.params, before.opt_state), p.host)
                st = dataclasses.replace(before, params=params, opt_state=opt_state, pending=(),
                                         bad_steps=st.bad_steps)
                return True
        return False

    try:
        if st.step == 0 and not resume:  # a resumed step-0 checkpoint already has its step-0 lines
            st = log.validate(st)
            log.checkpoint(st)
        batches, again = plan.batches_from(st.step), None
        while True:
            batch, again = (again, None) if again is not None else (next(batches, None), None)
            if batch is None:
                break
            t0 = time.perf_counter()
            before = st
            lr = plan.lr(st.step)
            # the diagnostics (grad norm, cosine, imbalance, ...) only for a step that writes a log line
            logs = (st.step + 1) % tr["log_every"] == 0 or st.step + 1 == total
            new_params, new_opt_state, m = update_step(plan.opt, st.params, st.opt_state, batch,
                                                       key=step_key(plan.seed, st.step), lr=lr, diagnostics=logs)
            chosen, host = _NO, {}
            if lag:  # keep the new params/state only if the step is finite, decided on the device
                ok = _finite(m, pdev)
                chosen = _select(ok, (new_params, new_opt_state), (st.params, st.opt_state), host)
            if chosen is _NO:  # the synchronous read: the host chooses once it has read this step
                st = st.queued(st.params, st.opt_state, Pending(step=st.step + 1, lr=lr, metrics=m, logs=logs, t0=t0,
                                                                new=(new_params, new_opt_state)))
            else:
                st = st.queued(*chosen, Pending(step=st.step + 1, lr=lr, metrics=m, logs=logs, t0=t0,
                                                host=host or None))
            # Read the previous step now that this one is queued; this one too when its values are
            # needed at once (a log line, validation, a checkpoint, the last step).
            sees = logs or st.step % tr["eval_every"] == 0 or st.step % tr["checkpoint_every"] == 0
            if settle(keep=0 if sees or chosen is _NO else 1):
                again = batch  # rolled back to the state before this step: take it again
                continue
            before = st  # (what the next step starts from; the older state is not needed any more)
            if st.step % tr["eval_every"] == 0 or st.step == total:
                st = log.validate(st)
            if st.step % tr["checkpoint_every"] == 0 or st.step == total:
                log.checkpoint(st)
        settle()
    except KeyboardInterrupt:
        with _sigint_deferred():  # a second Ctrl-C waits until the checkpoint and summary.json are written
            try:
                settle()  # the steps taken and not read yet (one may end the run: RunFailed)
            except RunFailed as e:
                e.summary = log.finish(e.state, "failed")
                raise e from None
            saved = log.checkpoint(st)
            log.finish(st, "interrupted")
        raise Interrupted(f"interrupted at step {st.step}; " + ("checkpoint saved" if saved else
                          f"its loss is not finite: the last good checkpoint is {log.last_checkpoint}"),
                          run_dir=run_dir, step=st.step) from None
    except RunFailed as e:
        e.summary = log.finish(getattr(e, "state", st), "failed")  # for the --json error object
        raise
    return log.finish(st, "completed")


def _recorder_class() -> type:
    """Recorder; under torchrun only rank 0 writes (the others: iefcli.dist.train.SilentRecorder)."""
    if os.environ.get("WORLD_SIZE", "1") == "1":
        return Recorder
    from iefcli.dist.train import recorder_class

    return recorder_class()


"""`ief train` over ranks (torchrun) and micro-batches (``train.accumulate``).

Every rank builds the same task and iterates the SAME global batches (the same seeded
order, the same step keys); :class:`iefcli.dist.grads.DistModelFn` makes each rank compute
only its shard, split into ``train.accumulate`` micro-batches, and gives every rank the
global batch's direction, so the parameters stay identical on all ranks without a
broadcast. Evaluation is replicated (each rank evaluates the same split: identical
numbers). Only rank 0 writes the run directory (metrics, checkpoints, best/, summary);
the other ranks run :class:`SilentRecorder`. ``--resume`` reads the last checkpoint on
every rank.
"""

from __future__ import annotations

from pathlib import Path

from iefcli.dist.comm import Comm, init_from_env, world_from_env
from iefcli.train.loop import Recorder

__all__ = ["setup_plan", "SilentRecorder", "recorder_class", "rank_device"]


def rank_device(recipe) -> str | None:
    """The device of this rank: cuda:LOCAL_RANK under torchrun on a CUDA machine, else the recipe's."""
    import torch

    _, world, local = world_from_env()
    if world > 1 and recipe["device"] in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return None


def setup_plan(plan) -> Comm | None:
    """Make ``plan``'s optimiser work on the global batch over ranks and micro-batches.
    A no-op (None) for one process without accumulation."""
    from iefcli.dist.grads import DistModelFn

    recipe, tr = plan.recipe, plan.recipe["train"]
    acc = int(tr.get("accumulate", 1))
    _, world, _ = world_from_env()
    if world <= 1 and acc <= 1:
        return None
    comm = init_from_env(str(plan.task.device))
    if plan.cfg.name == "ngd":
        raise recipe.error("optimizer.name", "ngd is not available with train.accumulate > 1 or under torchrun "
                           "(its solve needs products through the whole batch's model); use ef, ief or sf")
    need = comm.world * acc
    if tr["batch_size"] < need:
        raise recipe.error("train.batch_size", f"must be >= ranks x train.accumulate = {comm.world} x {acc} = {need}"
                           f", got {tr['batch_size']}")
    last = plan.task.size("train") % tr["batch_size"]
    if not tr["drop_last"] and 0 < last < comm.world:
        raise recipe.error("train.drop_last", f"the last batch of each epoch has {last} samples, fewer than the "
                           f"{comm.world} ranks; set train.drop_last: true")
    opt = plan.opt
    fn = opt.fn
    opt.fn = DistModelFn(fn.model, fn.loss_fn, fn.forward, comm=comm, accumulate=acc,
                         keep_jacobians=plan.cfg.name == "sf")
    return comm


def recorder_class():
    """The loop's Recorder on rank 0 (and in one process), :class:`SilentRecorder` elsewhere."""
    from iefcli.dist.comm import is_main

    return Recorder if is_main() else SilentRecorder


class SilentRecorder(Recorder):
    """A non-zero rank's Recorder: the same validation (so its state matches rank 0's) and no files."""

    def __init__(self, plan, run_dir: Path, state, *, resume: bool, on_event=None):
        import time

        self.plan, self.run_dir = plan, run_dir
        self.emit = lambda kind, payload: None
        self._elapsed0, self._t0 = state.elapsed_s, time.perf_counter()
        self._val_loss = None
        self.last_checkpoint = None

    def record(self, rec: dict, event: str | None = None) -> None:
        pass

    def save(self, state, ckpt: Path, metrics: dict | None = None) -> None:
        pass

    def checkpoint(self, state) -> bool:
        return True

    def finish(self, st, status: str) -> dict:
        return {"status": status, "total_steps": st.step, "rank": world_from_env()[0], "run_dir": str(self.run_dir)}


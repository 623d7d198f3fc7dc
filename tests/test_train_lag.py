"""The training loop's lagged read (``iefcli.train.loop.LAGGED_READ``): a step's loss and update norm
are read to the host one step late, after the next step is queued, and the step is kept or rejected
on the device (``torch.where``). Forced on here (on the CPU it is off by default), every run must
write the same metrics lines, checkpoints (tensors bitwise), best/ and summary as the synchronous
read: with bad steps, RunFailed, Ctrl-C and --resume; and the loop reads each step once, after
queuing the next one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import iefcli.train.loop as loop
from iefcli.errors import Interrupted, RunFailed
from iefcli.optim.base import _takes_diagnostics
from iefcli.train import rundir
from iefcli.train.launch import resume_run, train_recipe

WALL = {"time", "step_time_s", "elapsed_s", "wall_time_s", "steps_per_s", "run_dir"}

# 13 steps: train lines at 3, 6, 9, 12, 13; validation at 0, 4, 8, 12, 13; checkpoints at 0, 5, 10, 13.
# Steps 1, 2, 7, 11 are read one step late (nothing needs them at once).
TINY = {
    "name": "tiny", "seed": 1, "device": "cpu",
    "model": {"kind": "mlp", "sizes": [16]}, "data": {"kind": "digits"},
    "optimizer": {"name": "ief", "lr": 50.0, "damping": 1e-7},
    "schedule": {"kind": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1},  # a different lr every step
    "train": {"steps": 13, "batch_size": 32, "eval_every": 4, "log_every": 3, "checkpoint_every": 5,
              "max_bad_steps": 3},
}
OPTIMIZERS = {
    "sgd": {"name": "sgd", "lr": 0.5, "momentum": 0.9},
    "adamw": {"name": "adamw", "lr": 0.003},
    "adafactor": {"name": "adafactor", "lr": 0.03},
    "ief": {"name": "ief", "lr": 50.0, "damping": 1e-7},
    "ief-momentum": {"name": "ief", "lr": 20.0, "damping": 1e-7, "momentum": 0.5, "weight_decay": 1e-3},
    "sf": {"name": "sf", "lr": 2.0, "damping": 1.0},
    "kfac": {"name": "kfac", "lr": 0.05, "damping": 1e-3, "inv_interval": 3},
}


def _recipe(tmp_path: Path, optimizer: dict, **train) -> Path:
    r = dict(TINY, optimizer=optimizer, train=dict(TINY["train"], **train))
    p = tmp_path / f"{optimizer['name']}-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def _strip(d, drop=WALL):
    if isinstance(d, dict):
        return {k: _strip(v, drop) for k, v in d.items() if k not in drop}
    if isinstance(d, (list, tuple)):
        return [_strip(v, drop) for v in d]
    return "nan" if isinstance(d, float) and math.isnan(d) else d  # NaN == NaN for the comparisons


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        _tensors_equal(a[k], b[k]) if isinstance(a[k], dict) else
        (a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k])) for k in a)


def _assert_same_run(a: Path, b: Path) -> None:
    """Everything two runs wrote, wall-clock fields aside: metrics lines, every checkpoint and best/
    (params and optimiser state bitwise, trainer state, meta) and summary.json."""
    assert _strip(list(rundir.read_metrics(a))) == _strip(list(rundir.read_metrics(b)))
    ca, cb = rundir.list_checkpoints(a), rundir.list_checkpoints(b)
    assert [s for s, _ in ca] == [s for s, _ in cb]
    dirs = [(x, y) for (_, x), (_, y) in zip(ca, cb)]
    if rundir.is_checkpoint(a / rundir.BEST_DIR) or rundir.is_checkpoint(b / rundir.BEST_DIR):
        dirs.append((a / rundir.BEST_DIR, b / rundir.BEST_DIR))
    for x, y in dirs:
        assert _tensors_equal(rundir.load_checkpoint_params(x), rundir.load_checkpoint_params(y)), x
        assert _tensors_equal(rundir.load_optimizer_state(x), rundir.load_optimizer_state(y)), x
        assert _strip(rundir.read_trainer_state(x)) == _strip(rundir.read_trainer_state(y)), x
        assert rundir.checkpoint_meta(x) == rundir.checkpoint_meta(y), x
    sa, sb = rundir.read_summary(a), rundir.read_summary(b)
    assert sa is not None and _strip(sa) == _strip(sb)
    if a in EVENTS and b in EVENTS:
        assert EVENTS[a] == EVENTS[b]


class _Selections:
    """Counts the steps the loop decided on the device (``_select`` gave a choice) and on the host."""

    def __init__(self, monkeypatch):
        self.device = self.host = 0
        real = loop._select

        def spy(ok, new, old, host=None):
            out = real(ok, new, old, host)
            if isinstance(new, tuple):  # the top-level call of a step
                if out is loop._NO:
                    self.host += 1
                else:
                    self.device += 1
            return out

        monkeypatch.setattr(loop, "_select", spy)


EVENTS: dict[Path, list] = {}


def _run(monkeypatch, recipe: Path, out: Path, lagged: bool):
    """Train; the run's events (progress bar, checkpoints, ...) go to EVENTS[out], paths as RUN."""
    monkeypatch.setattr(loop, "LAGGED_READ", lagged)
    events = EVENTS[out] = []

    def on_event(kind, payload):
        events.append((kind, _strip(json.loads(json.dumps(payload).replace(str(out), "RUN")))))

    return train_recipe(recipe, out=out, on_event=on_event)


# ----------------------------------------------------------------------------- the same run


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_lagged_read_writes_the_same_run(tmp_path, monkeypatch, opt):
    p = _recipe(tmp_path, OPTIMIZERS[opt])
    _run(monkeypatch, p, tmp_path / "sync", False)
    sel = _Selections(monkeypatch)
    _run(monkeypatch, p, tmp_path / "lag", True)
    _assert_same_run(tmp_path / "sync", tmp_path / "lag")
    # every step but torch.optim's first (its state has no tensors yet: the host chooses) on the device
    assert (sel.device, sel.host) == ((12, 1) if opt in ("sgd", "adamw", "adafactor") else (13, 0))


def test_auto_is_off_on_the_cpu_and_on_elsewhere(monkeypatch):
    monkeypatch.setattr(loop, "LAGGED_READ", None)
    assert not loop.lagged_read("cpu") and not loop.lagged_read(torch.device("cpu"))
    assert loop.lagged_read("cuda:0") and loop.lagged_read("mps")
    monkeypatch.setattr(loop, "LAGGED_READ", True)
    assert loop.lagged_read("cpu")
    monkeypatch.setattr(loop, "LAGGED_READ", False)
    assert not loop.lagged_read("cuda")


def test_select_is_where_and_refuses_what_only_the_host_can_choose():
    ok, bad = torch.tensor(True), torch.tensor(False)
    shared = torch.ones(2)
    new = {"w": torch.tensor([1.0, float("nan")]), "s": {"m": torch.tensor([3.0])}, "n": 2, "same": shared}
    old = {"w": torch.tensor([5.0, 6.0]), "s": {"m": torch.tensor([7.0])}, "n": 2, "same": shared}
    a = loop._select(ok, new, old)
    assert torch.equal(a["w"][:1], new["w"][:1]) and math.isnan(a["w"][1]) and torch.equal(a["s"]["m"], new["s"]["m"])
    b = loop._select(bad, new, old)
    assert torch.equal(b["w"], old["w"]) and torch.equal(b["s"]["m"], old["s"]["m"]) and b["n"] == 2
    assert a["same"] is shared and b["same"] is shared
    assert _tensors_equal(loop._select(bad, (new["s"], new["s"]), (old["s"], old["s"]))[1], old["s"])
    no = loop._NO
    assert loop._select(ok, {"m": torch.zeros(1)}, {}) is no  # torch.optim before its first step
    assert loop._select(ok, {"a": {"m": torch.zeros(1)}}, {"a": {}}) is no
    assert loop._select(ok, torch.zeros(2), torch.zeros(3)) is no
    assert loop._select(ok, torch.zeros(2), torch.zeros(2, dtype=torch.float64)) is no
    assert loop._select(ok, torch.zeros(2, device="meta"), torch.zeros(2, device="meta")) is no  # not ok's device
    assert loop._select(ok, {"n": 3}, {"n": 2}) is no and loop._select(ok, {"n": True}, {"n": 1}) is no
    assert loop._select(ok, [torch.zeros(1)], (torch.zeros(1),)) is no


# ----------------------------------------------------------------------------- bad steps, RunFailed, Ctrl-C


class _Poison:
    """The optimiser's update, with chosen steps (counted from 1: ``bad=(3,)`` is the step from 2 to 3)
    turned bad: NaN loss (or an infinite update norm) AND NaN parameters and state, so that a bad step
    kept by mistake shows in every checkpoint; ``interrupt_at``: that step raises KeyboardInterrupt;
    ``grow_at``: from that step on the state has one more tensor.
    Steps are told by their random key (a step taken again after a rollback is the same step)."""

    def __init__(self, monkeypatch, *, bad=(), inf_norm=(), interrupt_at=None, grow_at=None):
        self.calls = 0
        real = loop.make_optimizer
        me = self

        def factory(cfg, **kw):
            opt = real(cfg, **kw)
            inner = opt.update
            kws = _takes_diagnostics(inner)

            def update(params, state, batch, *, key, lr, diagnostics=True):
                me.calls += 1
                step = key - loop.step_key(TINY["seed"], 0) + 1
                if step == interrupt_at:
                    raise KeyboardInterrupt
                extra = {"diagnostics": diagnostics} if kws else {}
                new, st, m = inner(params, state, batch, key=key, lr=lr, **extra)
                if grow_at is not None and step >= grow_at:  # the state gains a key: the host must choose
                    st = {**st, "grown": torch.tensor([float(step >= grow_at + 2)])}
                if step in bad or step in inf_norm:
                    nan = float("nan")
                    new = {k: torch.full_like(v, nan) for k, v in new.items()}
                    st = _map(st, lambda t: torch.full_like(t, nan) if t.is_floating_point() else t)
                    if step in bad:
                        m = dict(m, loss=torch.full_like(m["loss"], nan))
                    else:
                        m = dict(m, update_norm=torch.full_like(m["update_norm"], float("inf")))
                return new, st, m

            opt.update = update
            return opt

        monkeypatch.setattr(loop, "make_optimizer", factory)


def _map(d, f):
    return {k: _map(v, f) for k, v in d.items()} if isinstance(d, dict) else f(d) if isinstance(d, torch.Tensor) else d


def _both(tmp_path, monkeypatch, p, *, expect=None, host_kept=False, **poison):
    """The run synchronously and lagged, under the same poison: the two run dirs, errors, update calls.
    ``host_kept``: the lagged run treats every 0-d state tensor (torch.optim's and K-FAC's step
    counters) as kept on the host, as next to parameters on an accelerator (the rollback path)."""
    outs, errs, calls = [], [], []
    for lagged in (False, True):
        monkeypatch.undo()
        poisoned = _Poison(monkeypatch, **poison)
        if host_kept:
            monkeypatch.setattr(loop, "on_host", lambda t, ok: t.dim() == 0)
        out = tmp_path / ("lag" if lagged else "sync")
        err = None
        try:
            _run(monkeypatch, p, out, lagged)
        except (RunFailed, Interrupted) as e:
            err = e
        assert (type(err) if err else None) is expect, err
        outs.append(out)
        errs.append(err)
        calls.append(poisoned.calls)
    return outs, errs, calls


@pytest.mark.parametrize("opt", ["ief-momentum", "adamw", "sgd"])
def test_bad_steps_are_rejected_the_same(tmp_path, monkeypatch, opt):
    """Bad steps on the first two steps (torch.optim: the host chooses while its state is empty), on
    read-late steps (2, 7), a validated one (4), logged ones (6, 12: an infinite update norm) and a
    checkpointed one (10): the same lines, checkpoints and summary, nothing non-finite kept."""
    p = _recipe(tmp_path, OPTIMIZERS[opt])
    (a, b), _, _ = _both(tmp_path, monkeypatch, p, bad=(1, 2, 4, 7, 10), inf_norm=(6, 12))
    _assert_same_run(a, b)
    bad = [(r["step"], r["consecutive_bad_steps"]) for r in rundir.read_metrics(b) if r.get("event") == "bad_step"]
    assert bad == [(1, 1), (2, 2), (4, 1), (6, 1), (7, 2), (10, 1), (12, 1)]
    for _, ck in rundir.list_checkpoints(b):
        assert all(torch.isfinite(v).all() for v in rundir.load_checkpoint_params(ck).values()), ck
    assert rundir.read_summary(b)["status"] == "completed"


def test_run_failed_one_step_late_has_the_same_summary_and_checkpoints(tmp_path, monkeypatch):
    """Steps 5, 6, 7 bad (max_bad_steps 3): step 7 is read only after step 8 is queued; the run still
    fails at step 7 with the same message, summary, lines and last good checkpoint (step 0: step 5's
    checkpoint holds the unchanged params of step 4), and step 8 is never counted."""
    p = _recipe(tmp_path, OPTIMIZERS["ief-momentum"])
    (a, b), (ea, eb), _ = _both(tmp_path, monkeypatch, p, expect=RunFailed, bad=(5, 6, 7))
    assert str(ea).replace(str(a), "RUN") == str(eb).replace(str(b), "RUN")
    assert "(last at step 7)" in str(eb) and str(rundir.checkpoint_dir(b, 5)) in str(eb)
    assert _strip(ea.summary) == _strip(eb.summary) and eb.summary["status"] == "failed"
    assert eb.summary["total_steps"] == 7
    _assert_same_run(a, b)
    assert max(r["step"] for r in rundir.read_metrics(b)) == 7


def test_run_failed_on_a_logged_step_and_every_step_bad(tmp_path, monkeypatch):
    p = _recipe(tmp_path, OPTIMIZERS["ief"])
    (a, b), (ea, eb), _ = _both(tmp_path, monkeypatch, p, expect=RunFailed, bad=tuple(range(1, 14)))
    assert "3 consecutive steps" in str(eb) and "(last at step 3)" in str(eb)
    _assert_same_run(a, b)
    assert [s for s, _ in rundir.list_checkpoints(b)] == [0]


@pytest.mark.parametrize("opt", ["ief-momentum", "adamw"])
def test_interrupt_then_resume_is_the_same(tmp_path, monkeypatch, opt):
    """Ctrl-C in update call 8 (step 7, read late, still pending; step 7 itself bad): the same
    checkpoint and summary; both resumed runs end the same as an uninterrupted one."""
    p = _recipe(tmp_path, OPTIMIZERS[opt])
    (a, b), (ea, eb), _ = _both(tmp_path, monkeypatch, p, expect=Interrupted, bad=(7,), interrupt_at=8)
    assert ea.step == eb.step == 7
    _assert_same_run(a, b)
    assert [s for s, _ in rundir.list_checkpoints(b)] == [0, 5, 7]
    assert rundir.read_summary(b)["status"] == "interrupted"
    monkeypatch.undo()
    for out, lagged in ((a, False), (b, True)):
        monkeypatch.setattr(loop, "LAGGED_READ", lagged)
        events = EVENTS[out] = []
        resume_run(out, on_event=lambda kind, payload: events.append((kind, _strip(payload, WALL | {"path"}))))
    _assert_same_run(a, b)
    assert rundir.read_summary(b)["status"] == "completed"


def test_interrupt_while_the_failing_step_is_pending_fails_the_run(tmp_path, monkeypatch):
    """Steps 5, 6, 7 bad and Ctrl-C in call 8: the synchronous read stopped at step 7 (RunFailed)
    before call 8; the lagged one learns of step 7 only in the Ctrl-C handler: RunFailed too,
    same summary, no checkpoint of step 7."""
    p = _recipe(tmp_path, OPTIMIZERS["ief"])
    (a, b), (ea, eb), _ = _both(tmp_path, monkeypatch, p, expect=RunFailed, bad=(5, 6, 7), interrupt_at=8)
    assert _strip(ea.summary) == _strip(eb.summary)
    _assert_same_run(a, b)
    assert [s for s, _ in rundir.list_checkpoints(b)] == [0, 5]


# ----------------------------------------------------------------------------- the host reads


class _Reads:
    """A timeline of the loop's host reads (``tolist`` / ``item`` / ``bool`` / ``float`` / ``int`` of a
    tensor) and of the update calls; reads inside an update (the optimiser's own, on the CPU: the
    overflow checks) are not the loop's and are left out."""

    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        self.losses: list[float] = []
        self.inside = False
        me = self
        for name in ("tolist", "item", "__bool__", "__float__", "__int__", "__index__"):
            real = getattr(torch.Tensor, name)

            def wrapped(t, *a, _real=real, _name=name, **kw):
                out = _real(t, *a, **kw)
                if not me.inside:
                    me.events.append(("read", _name, out))
                return out

            monkeypatch.setattr(torch.Tensor, name, wrapped)
        real_step = loop.update_step

        def update_step(*a, **kw):
            me.inside = True
            try:
                out = real_step(*a, **kw)
                me.losses.append(float(out[2]["loss"]))
            finally:
                me.inside = False
            me.events.append(("update", len(me.losses)))
            return out

        monkeypatch.setattr(loop, "update_step", update_step)

    def between_updates(self) -> list[list[tuple]]:
        """The reads after each update call, up to the next one (the last: to the end of the run)."""
        out: list[list[tuple]] = []
        for e in self.events:
            if e[0] == "update":
                out.append([])
            elif out:
                out[-1].append(e)
        return out


@pytest.mark.parametrize("opt", ["ief", "sgd", "adamw-host"])
def test_each_step_is_read_once_after_the_next_is_queued(tmp_path, monkeypatch, opt):
    # 10 steps, the first and only train line, validation and checkpoint at step 10
    p = _recipe(tmp_path, OPTIMIZERS[opt.split("-")[0]], steps=10, log_every=10, eval_every=10, checkpoint_every=10)
    monkeypatch.setattr(loop, "LAGGED_READ", True)
    if opt == "adamw-host":  # its step counters as on an accelerator (kept on the host)
        monkeypatch.setattr(loop, "on_host", lambda t, ok: t.dim() == 0)
    reads = _Reads(monkeypatch)
    train_recipe(p, out=tmp_path / "lag")
    after = reads.between_updates()
    assert len(after) == 10 == len(reads.losses)
    # after update k+1, ONE read: step k's (loss, update norm); sgd reads step 1 at once (torch.optim's
    # state starts empty: the host chooses), so nothing is left to read after update 2
    first = 1
    if opt != "ief":
        assert len(after[0]) == 1 and after[0][0][2][0] == reads.losses[0] and after[1] == []
        first = 2
    else:
        assert after[0] == []
    for k in range(first, 9):
        assert len(after[k]) == 1, (k, after[k])
        _, name, values = after[k][0]
        assert name == "tolist" and values[0] == reads.losses[k - 1], (k, values, reads.losses)
    # after the last update: step 9, then step 10 with every diagnostic (one read), then eval/checkpoint
    assert after[9][0][2][0] == reads.losses[8]
    assert after[9][1][1] == "tolist" and reads.losses[9] in after[9][1][2]
    train_lines = [r for r in rundir.read_metrics(tmp_path / "lag") if r["split"] == "train"]
    assert [r["step"] for r in train_lines] == [10] and train_lines[0]["loss"] == reads.losses[9]


def test_the_synchronous_read_reads_each_step_before_the_next(tmp_path, monkeypatch):
    """The same timeline on the CPU's default path: step k is read before update k+1 (the test above
    tells the two apart)."""
    p = _recipe(tmp_path, OPTIMIZERS["ief"], steps=10, log_every=10, eval_every=10, checkpoint_every=10)
    monkeypatch.setattr(loop, "LAGGED_READ", None)
    reads = _Reads(monkeypatch)
    train_recipe(p, out=tmp_path / "sync")
    after = reads.between_updates()
    for k in range(9):
        assert len(after[k]) == 1 and after[k][0][2][0] == reads.losses[k], (k, after[k])


# ----------------------------------------------------------------------------- accumulation / ranks


def test_micro_batches_with_the_lagged_read(tmp_path, monkeypatch):
    """train.accumulate (the distributed step's DistModelFn, one process): the same run lagged."""
    p = _recipe(tmp_path, OPTIMIZERS["ief-momentum"], accumulate=2)
    _run(monkeypatch, p, tmp_path / "sync", False)
    _run(monkeypatch, p, tmp_path / "lag", True)
    _assert_same_run(tmp_path / "sync", tmp_path / "lag")


RANK_WORKER = '''
import sys
from pathlib import Path
import torch
import iefcli.train.loop as loop
from iefcli.train.launch import train_recipe
recipe, out = sys.argv[1], Path(sys.argv[2])
real = loop.make_optimizer
def factory(cfg, **kw):  # update call 3 (step 3) bad on every rank: NaN loss and parameters
    opt = real(cfg, **kw)
    inner, calls = opt.update, [0]
    def update(params, state, batch, *, key, lr, diagnostics=True):
        calls[0] += 1
        new, st, m = inner(params, state, batch, key=key, lr=lr, diagnostics=diagnostics)
        if calls[0] == 3:
            new = {k: torch.full_like(v, float("nan")) for k, v in new.items()}
            m = dict(m, loss=torch.full_like(m["loss"], float("nan")))
        return new, st, m
    opt.update = update
    return opt
loop.make_optimizer = factory
for lagged in (False, True):
    loop.LAGGED_READ = lagged
    train_recipe(recipe, out=out / ("lag" if lagged else "sync"))
'''


def test_two_ranks_with_the_lagged_read(tmp_path):
    """torchrun, 2 gloo ranks (each rank decides on its own device, the collectives stay in step):
    the lagged run, with a bad step, writes what the synchronous one writes."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    p = _recipe(tmp_path, OPTIMIZERS["ief-momentum"], steps=8)
    (tmp_path / "worker.py").write_text(RANK_WORKER)
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp_path / "worker.py"), str(p), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _assert_same_run(tmp_path / "sync", tmp_path / "lag")
    assert [r["step"] for r in rundir.read_metrics(tmp_path / "lag") if r.get("event") == "bad_step"] == [3]


# ----------------------------------------------------------------------------- state kept on the host


@pytest.mark.parametrize("opt,rollbacks", [("adamw", 1), ("adafactor", 1), ("kfac", 3)])
def test_host_kept_state_values_are_put_back_and_the_next_step_taken_again(tmp_path, monkeypatch, opt, rollbacks):
    """On an accelerator torch.optim's and K-FAC's step counters stay on the CPU: the lagged read keeps
    their new values as if the step were finite, and when it reads a bad step it puts the old ones
    back; a step already taken on them is dropped and taken again. Here every 0-d state tensor plays
    that part. Bad steps as above; a bad step read late (7; K-FAC also 1, 2) costs one update call."""
    p = _recipe(tmp_path, OPTIMIZERS[opt])
    (a, b), _, calls = _both(tmp_path, monkeypatch, p, host_kept=True, bad=(1, 2, 4, 7, 10), inf_norm=(6, 12))
    _assert_same_run(a, b)
    assert calls[1] - calls[0] == rollbacks, calls
    bad = [r["step"] for r in rundir.read_metrics(b) if r.get("event") == "bad_step"]
    assert bad == [1, 2, 4, 6, 7, 10, 12]


@pytest.mark.parametrize("opt", ["adamw", "kfac"])
def test_host_kept_state_values_with_run_failed_and_ctrl_c(tmp_path, monkeypatch, opt):
    p = _recipe(tmp_path, OPTIMIZERS[opt])
    (a, b), (ea, eb), _ = _both(tmp_path, monkeypatch, p, host_kept=True, expect=RunFailed, bad=(5, 6, 7))
    assert _strip(ea.summary) == _strip(eb.summary)
    _assert_same_run(a, b)
    # Ctrl-C in step 8, step 7 bad and unread: the checkpoint of step 7 has the old counters
    (a, b), _, _ = _both(tmp_path / "c", monkeypatch, p, host_kept=True, expect=Interrupted, bad=(7,),
                         interrupt_at=8)
    _assert_same_run(a, b)
    monkeypatch.undo()
    for out, lagged in ((a, False), (b, True)):
        monkeypatch.setattr(loop, "LAGGED_READ", lagged)
        monkeypatch.setattr(loop, "on_host", lambda t, ok: t.dim() == 0)
        resume_run(out)
    _assert_same_run(a, b)


@pytest.mark.parametrize("bad", [(), (7,), (7, 8)], ids=["none", "before", "before-and-at"])
def test_a_step_the_host_must_decide_after_a_step_read_late(tmp_path, monkeypatch, bad):
    """The state gains a tensor at step 8 (as K-FAC's when a layer moves to its fallback): step 8 is
    read at once, on top of step 7 still pending (bad: with host-kept counters, step 8 is taken
    again); steps 9.. are read late again."""
    p = _recipe(tmp_path, OPTIMIZERS["adamw"])
    (a, b), _, calls = _both(tmp_path, monkeypatch, p, host_kept=True, bad=bad, grow_at=8)
    _assert_same_run(a, b)
    assert calls[1] - calls[0] == (1 if 7 in bad else 0)
    assert "grown" in rundir.load_optimizer_state(rundir.checkpoint_dir(b, 10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the lagged read's own device)")
@pytest.mark.parametrize("opt", ["sgd", "adamw", "ief-momentum", "kfac"])
def test_on_cuda_the_lagged_read_is_the_default_and_writes_the_same_run(tmp_path, monkeypatch, opt):
    """On a GPU, auto = lagged; adamw's and K-FAC's step counters really stay on the CPU there (the
    put-back / take-again path), with bad steps read late (7) and at once (4, 10)."""
    monkeypatch.setattr(loop, "LAGGED_READ", None)
    assert loop.lagged_read("cuda")
    r = dict(TINY, device="cuda", optimizer=OPTIMIZERS[opt])
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    (a, b), _, calls = _both(tmp_path, monkeypatch, p, bad=(4, 7, 10))
    _assert_same_run(a, b)
    assert calls[1] - calls[0] == (1 if opt in ("adamw", "kfac") else 0)

"""iefcli.dist: the global batch over ranks (torchrun, gloo, 2 CPU processes) and micro-batches.

Exactness is checked against the single-process run on the same global batch: parameters
after a few quickstart-sized steps (float64: 1e-10 relative; float32: 1e-5), directions of
accumulated micro-batches against one batch, a resumed 2-rank run against an uninterrupted
one. A failing rank must stop the job with exit 1 in bounded time.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from iefcli.core.jacobian import batch_grads
from iefcli.core.losses import CrossEntropy
from iefcli.core.methods import compute_direction
from iefcli.core.params import trainable_params
from iefcli.dist.comm import Comm
from iefcli.dist.grads import DistModelFn, global_batch_grads
from iefcli.dist.rows import piece_bounds

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
SETS = ["train.steps=4", "train.batch_size=32", "train.eval_every=2", "train.checkpoint_every=2",
        "train.log_every=1", "device=cpu"]
CASES = [  # (name, optimizer, dtype, extra sets)
    ("ief64", "ief", "float64", []),
    ("ef64", "ef", "float64", []),
    ("sf64", "sf", "float64", []),
    ("ief32", "ief", "float32", []),
    ("sf32", "sf", "float32", []),
    ("sgd32", "sgd", "float32", ["optimizer.momentum=0.9"]),
    ("ief64acc", "ief", "float64", ["train.accumulate=2"]),  # 2 ranks x 2 micro-batches
]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def _sets(opt: str, dtype: str, extra: list[str]) -> list[str]:
    own = [] if opt == "ief" else ["optimizer.lr=null", "optimizer.damping=null"]  # the optimiser's defaults
    return [*SETS, f"optimizer.name={opt}", f"dtype={dtype}", *own, *extra]


def _params(run: Path, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step-{step}" / "params.safetensors"))


def _rel(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    den = sum(float(a[k].double().pow(2).sum()) for k in a)
    return (num / den) ** 0.5


# ----------------------------------------------------------------------------- in process: micro-batches


def _mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.LayerNorm(9), nn.Linear(9, 4)).to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("jacobian", ["fast", "vmap"])
@pytest.mark.parametrize("method", ["ief", "ef", "sf", "sgd"])
def test_four_micro_batches_of_8_equal_one_batch_of_32(dtype, tol, jacobian, method):
    model = _mlp(dtype)
    p = trainable_params(model)
    x = torch.randn(32, 6, dtype=dtype)
    y = torch.randint(0, 4, (32,))
    lf = CrossEntropy()
    one = batch_grads(model, p, x, y, lf, jacobian=jacobian)
    acc = global_batch_grads(model, p, x, y, lf, comm=Comm.local(), accumulate=4, keep_jacobians=True,
                             jacobian=jacobian)
    assert [len(range(a, b)) for a, b in piece_bounds(32, 4)] == [8, 8, 8, 8]
    d1, _ = compute_direction(method, one, 1e-4, generator=torch.Generator().manual_seed(5))
    d2, _ = compute_direction(method, acc, 1e-4, generator=torch.Generator().manual_seed(5))
    assert float((d1 - d2).norm() / d1.norm()) < tol
    assert torch.allclose(acc.rows.gram(), one.rows.gram(), rtol=1e-12, atol=1e-300)
    v = torch.randn(one.layout.size, dtype=dtype)
    assert torch.allclose(acc.rows.dot(v), one.rows.dot(v), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("jacobian", ["fast", "vmap"])
def test_sf_with_several_draws_per_sample_over_micro_batches(jacobian):
    """K = 3 label draws per sample: the k-major row order must survive the concatenation."""
    from iefcli.core.methods import MethodOptions

    model = _mlp(torch.float64)
    p = trainable_params(model)
    x, y = torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 4, (30,))
    opts = MethodOptions(mc_samples=3)
    one = batch_grads(model, p, x, y, CrossEntropy(), jacobian=jacobian)
    acc = global_batch_grads(model, p, x, y, CrossEntropy(), comm=Comm.local(), accumulate=4, keep_jacobians=True,
                             jacobian=jacobian)
    d1, _ = compute_direction("sf", one, 1e-3, generator=torch.Generator().manual_seed(2), options=opts)
    d2, _ = compute_direction("sf", acc, 1e-3, generator=torch.Generator().manual_seed(2), options=opts)
    assert float((d1 - d2).norm() / d1.norm()) < 1e-10


class _TinySeq(nn.Module):
    """Embedding (with a padding id) -> LayerNorm -> Linear over T positions -> token logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 5, padding_idx=0)
        self.norm = nn.LayerNorm(5)
        self.mix = nn.Linear(5, 7)
        self.out = nn.Linear(7, 11)

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.norm(self.emb(ids)))))


@pytest.mark.parametrize("method", ["ief", "ef", "sf"])
def test_micro_batches_of_a_token_model(method):
    """Sequence blocks (T > 1: ghost / materialise), the embedding's sparse block and a dict of inputs."""
    from iefcli.core.losses import TokenCrossEntropy

    model = _TinySeq().double()
    p = trainable_params(model)
    ids = torch.randint(0, 11, (12, 6))
    y = torch.randint(0, 11, (12, 6))
    y[:, -1] = -100
    fwd = lambda m, params, inputs: torch.func.functional_call(m, params, (inputs["ids"],))  # noqa: E731
    lf = TokenCrossEntropy()
    one = batch_grads(model, p, {"ids": ids}, y, lf, forward=fwd)
    acc = global_batch_grads(model, p, {"ids": ids}, y, lf, comm=Comm.local(), accumulate=3, keep_jacobians=True,
                             forward=fwd)
    assert {s.split(":")[0] for s in one.rows.strategies.values()} == {"embedding", "layernorm", "linear"}
    d1, _ = compute_direction(method, one, 1e-4, generator=torch.Generator().manual_seed(4))
    d2, _ = compute_direction(method, acc, 1e-4, generator=torch.Generator().manual_seed(4))
    assert float((d1 - d2).norm() / d1.norm()) < 1e-10


def test_uneven_micro_batches_and_sgd_gradient():
    model = _mlp(torch.float64)
    p = trainable_params(model)
    x, y = torch.randn(13, 6, dtype=torch.float64), torch.randint(0, 4, (13,))
    fn = DistModelFn(model, CrossEntropy(), accumulate=4)
    loss, g = fn.mean_loss_and_grad(p, x, y)
    from iefcli.optim.base import ModelFn

    loss1, g1 = ModelFn(model, CrossEntropy()).mean_loss_and_grad(p, x, y)
    assert abs(float(loss - loss1)) < 1e-14
    for k in g:
        assert torch.allclose(g[k], g1[k], rtol=1e-12, atol=1e-15)
    bg = fn.batch_grads(model, p, x, y, CrossEntropy())
    one = batch_grads(model, p, x, y, CrossEntropy())
    d1, _ = compute_direction("ief", one, 1e-6)
    d2, _ = compute_direction("ief", bg, 1e-6)
    assert float((d1 - d2).norm() / d1.norm()) < 1e-10


def test_accumulate_recipe_key_trains_like_one_batch(tmp_path):
    from iefcli.train.launch import train_recipe

    sets = _sets("ief", "float64", [])
    train_recipe("quickstart", sets=sets, out=tmp_path / "one")
    train_recipe("quickstart", sets=[*sets, "train.accumulate=4"], out=tmp_path / "acc")
    assert _rel(_params(tmp_path / "one", 4), _params(tmp_path / "acc", 4)) < 1e-10


def test_accumulate_refuses_ngd_and_too_small_batches(tmp_path):
    from iefcli.errors import UsageError
    from iefcli.train.launch import train_recipe

    with pytest.raises(UsageError, match="train.batch_size: must be >= ranks x train.accumulate"):
        train_recipe("quickstart", sets=[*SETS, "train.accumulate=64"], out=tmp_path / "a")
    with pytest.raises(UsageError, match="optimizer.name: ngd is not available"):
        train_recipe("quickstart", sets=[*SETS, "train.accumulate=2", "optimizer.name=ngd"], out=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- torchrun, 2 ranks

WORKER = textwrap.dedent('''
    import json, shutil, sys
    from pathlib import Path
    import torch.distributed as dist
    from iefcli.train.launch import train_recipe, resume_run
    out = Path(sys.argv[1]); cases = json.loads(sys.argv[2])
    for name, sets in cases:
        train_recipe("quickstart", sets=sets, out=out / name)
    # resume: rank 0 removes the last checkpoint of ief64 (as if stopped after step 2), all ranks resume
    if dist.get_rank() == 0:
        shutil.copytree(out / "ief64", out / "resumed")
        shutil.rmtree(out / "resumed" / "checkpoints" / "step-4")
        (out / "resumed" / "summary.json").unlink()
    dist.barrier()
    resume_run(out / "resumed")
    c = dist.get_rank()
    print(json.dumps({"rank": c, "ok": True}))
''')


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    import json

    out = tmp_path_factory.mktemp("dist")
    (out / "worker.py").write_text(WORKER)
    cases = [(name, _sets(opt, dtype, extra)) for name, opt, dtype, extra in CASES]
    t0 = time.perf_counter()
    proc = subprocess.run([*TORCHRUN, str(out / "worker.py"), str(out), json.dumps(cases)], env=_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, time.perf_counter() - t0


@pytest.mark.parametrize("name,opt,dtype,extra", CASES)
def test_two_ranks_equal_one_process(two_rank_runs, tmp_path, name, opt, dtype, extra):
    from iefcli.train.launch import train_recipe

    out, _ = two_rank_runs
    train_recipe("quickstart", sets=_sets(opt, dtype, extra), out=tmp_path / "one")
    tol = 1e-10 if dtype == "float64" else 1e-5
    for step in (2, 4):
        rel = _rel(_params(tmp_path / "one", step), _params(out / name, step))
        assert rel < tol, (name, step, rel)
    assert _rel(_params(tmp_path / "one", 0), _params(out / name, 0)) == 0.0
    # only rank 0 wrote: one metrics line per event, the same losses as one process
    from iefcli.train import rundir

    one = [r for r in rundir.read_metrics(tmp_path / "one") if r["split"] == "train"]
    two = [r for r in rundir.read_metrics(out / name) if r["split"] == "train"]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= tol * abs(a["loss"]) + 1e-12


def test_resume_under_torchrun_is_exact(two_rank_runs):
    out, _ = two_rank_runs
    assert _rel(_params(out / "ief64", 4), _params(out / "resumed", 4)) == 0.0
    assert (out / "resumed" / "summary.json").exists()


def test_a_two_rank_run_resumes_exactly_in_one_process(two_rank_runs, tmp_path):
    import shutil

    from iefcli.train.launch import resume_run

    out, _ = two_rank_runs
    shutil.copytree(out / "sf64", tmp_path / "run")  # sf: the label draws must continue identically too
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-4")
    resume_run(tmp_path / "run")
    assert _rel(_params(out / "sf64", 4), _params(tmp_path / "run", 4)) < 1e-10


FAILING_RANK = textwrap.dedent('''
    # sitecustomize (imported at start-up by every rank): rank 1 fails at its 3rd global batch
    import os, time
    if os.environ.get("RANK") == "1":
        import iefcli.dist.grads as g
        real, calls = g.global_batch_grads, [0]
        def failing(*a, **k):
            calls[0] += 1
            if calls[0] == 3:
                if os.environ["IEF_TEST_HOW"] == "raise":
                    raise RuntimeError("simulated failure on rank 1")
                time.sleep(300)  # a rank that stops answering: the others time out
            return real(*a, **k)
        g.global_batch_grads = failing
''')


def _wrapped(tmp_path, sets: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "iefcli", "train", "quickstart", "--nproc", "2", "-q", "--out", str(tmp_path / "run"),
           *[a for s in sets for a in ("--set", s)]]
    env = {**_env(), "TMPDIR": str(tmp_path), **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    return proc, time.perf_counter() - t0


@pytest.mark.parametrize("how", ["raise", "hang"])
def test_a_failing_rank_stops_the_job_with_one_error(tmp_path, how):
    """`ief train --nproc 2`: exactly one line on stderr (the failing rank's own error and where the
    ranks' logs are), exit 1, no traceback and none of torchrun's failure summary."""
    (tmp_path / "sitecustomize.py").write_text(FAILING_RANK)
    env = {"IEF_DIST_TIMEOUT_S": "5", "IEF_TEST_HOW": how}
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + _env()["PYTHONPATH"]
    proc, took = _wrapped(tmp_path, [*SETS, "train.steps=20"], env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    logs = sorted(tmp_path.glob("ief-nproc-*"))
    assert len(logs) == 1 and f"(every rank's log: {logs[0]}); the job was stopped" in lines[0]
    if how == "raise":  # the root cause, from rank 1's traceback; rank 0 only saw rank 1 vanish
        assert lines[0].startswith("ief: error: rank 1 of 2 failed: RuntimeError: simulated failure on rank 1 ")
        assert "Traceback" in (logs[0] / "rank-1.log").read_text()
    else:  # rank 0 timed out waiting for rank 1 (which the agent then stopped)
        assert lines[0].startswith("ief: error: rank 0 of 2 failed: rank 0: all_gather failed: another rank "
                                   "crashed or did not answer"), lines[0]
    assert took < 90


def test_a_usage_error_under_nproc_is_one_line_and_exit_2(tmp_path):
    proc, _ = _wrapped(tmp_path, [*SETS, "train.accumulate=64"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    # every rank refuses the recipe; the agent may stop one of them while it exits: either is named
    assert len(lines) == 1 and re.match(r"ief: error: rank [01] of 2 failed: ", lines[0]), lines
    assert "quickstart.yaml: train.batch_size: must be >= ranks x train.accumulate = 2 x 64" in lines[0]


def test_nproc_success_prints_rank_0_only_and_removes_the_logs(tmp_path):
    proc, _ = _wrapped(tmp_path, [*SETS, "train.steps=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and " 2 steps in " in lines[0] and "run dir" in lines[0], lines  # the summary, once
    assert not list(tmp_path.glob("ief-nproc-*"))
    assert (tmp_path / "run" / "summary.json").exists()


def test_root_error_prefers_the_rank_that_failed_first(tmp_path):
    from iefcli.dist.launch import root_error

    (tmp_path / "rank-0.log").write_text("ief: error: rank 0: all_gather failed: another rank crashed or did not "
                                         "answer within IEF_DIST_TIMEOUT_S (x)\n")
    (tmp_path / "rank-2.log").write_text("[rank2]: Traceback (most recent call last):\n[rank2]:   File x\n"
                                         "[rank2]: ValueError: bad shard\n")
    assert root_error([(0, 1), (1, -15), (2, 1)], tmp_path) == (2, 1, "ValueError: bad shard")
    assert root_error([(0, 1), (2, -15)], tmp_path) == (2, -15, "ValueError: bad shard")  # stopped while exiting
    assert root_error([(0, 1), (1, -15)], tmp_path)[2].startswith("rank 0: all_gather failed")
    assert root_error([(3, 1)], tmp_path) == (3, 1, "exit code 1 (no error output)")
    usage = "ief: error: recipe.yaml: train.batch_size: must be >= 4\n"
    (tmp_path / "rank-0.log").write_text(usage)
    (tmp_path / "rank-1.log").write_text(usage)  # rank 0 stopped by the agent while it exited: still exit 2
    assert root_error([(0, -15), (1, 2)], tmp_path) == (0, 2, usage[12:].strip())


TOKEN_WORKER = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[2])
    from test_dist import token_case
    from iefcli.dist.comm import init_from_env
    comm = init_from_env("cpu")
    out = token_case(comm)
    if comm.rank == 0:
        torch.save(out, sys.argv[1])
''')


def token_case(comm) -> dict:
    """ief / sf directions of the token model on 13 sequences (uneven shards: 7 + 6), 2 micro-batches per rank."""
    from iefcli.core.losses import TokenCrossEntropy

    model = _TinySeq().double()
    p = trainable_params(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 11, (13, 6), generator=g)
    y = torch.randint(0, 11, (13, 6), generator=g)
    fwd = lambda m, params, inputs: torch.func.functional_call(m, params, (inputs["ids"],))  # noqa: E731
    out = {}
    for method in ("ief", "sf"):
        bg = global_batch_grads(model, p, {"ids": ids}, y, TokenCrossEntropy(), comm=comm, accumulate=2,
                                keep_jacobians=True, forward=fwd)
        out[method], _ = compute_direction(method, bg, 1e-4, generator=torch.Generator().manual_seed(4))
    conv = _ConvNet().double()  # conv blocks' factors and per-sample gradients through the all_gather
    x, yc = torch.randn(13, 3, 8, 8, dtype=torch.float64, generator=g), torch.randint(0, 5, (13,), generator=g)
    bg = global_batch_grads(conv, trainable_params(conv), x, yc, CrossEntropy(), comm=comm, accumulate=2)
    out["conv"], _ = compute_direction("ief", bg, 1e-4)
    return out


def test_token_model_on_two_ranks_equals_one_process(tmp_path):
    """The gathered factors mix int64 token ids with float32/64 tensors in one all_gather."""
    (tmp_path / "worker.py").write_text(TOKEN_WORKER)
    proc = subprocess.run([*TORCHRUN, str(tmp_path / "worker.py"), str(tmp_path / "out.pt"), str(ROOT / "tests")],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(tmp_path / "out.pt")
    ref = token_case(Comm.local())
    for method in ("ief", "sf", "conv"):
        assert float((got[method] - ref[method]).norm() / ref[method].norm()) < 1e-10, method


# ----------------------------------------------------------------------------- traffic: one P-sized all_reduce


@pytest.mark.parametrize("momentum,decay,clip", [(0.9, 0.0, None), (0.9, 0.01, None), (0.0, 0.0, 1e-3)])
@pytest.mark.parametrize("method", ["ief", "ef"])
def test_step_metrics_without_g_equal_one_batch(method, momentum, decay, clip):
    """With momentum / weight decay / clipping the loop's grad_norm and cos_update_grad come from the
    Gram and R d (no P-sized g over ranks): the same numbers as the single-batch optimiser's."""
    from iefcli.optim import OptimConfig, make_optimizer
    from iefcli.train.task import Batch

    model = _mlp(torch.float64)
    p = trainable_params(model)
    g = torch.Generator().manual_seed(3)
    batches = [Batch(torch.randn(12, 6, dtype=torch.float64, generator=g), torch.randint(0, 4, (12,), generator=g))
               for _ in range(3)]
    cfg = OptimConfig(name=method, lr=0.3, damping=1e-4, momentum=momentum, weight_decay=decay, clip_update_norm=clip)
    runs = []
    for acc in (1, 3):
        opt = make_optimizer(cfg, model=model, loss_fn=CrossEntropy())
        if acc > 1:
            opt.fn = DistModelFn(model, CrossEntropy(), accumulate=acc)
        params, state, ms = dict(p), opt.init(p), []
        for i, b in enumerate(batches):
            params, state, m = opt.update(params, state, b, key=i, lr=0.3)
            ms.append({k: float(m[k]) for k in ("grad_norm", "update_norm", "cos_update_grad")})
        runs.append((params, ms))
    (p1, m1), (p3, m3) = runs
    assert _rel(p1, p3) < 1e-10
    for a, b in zip(m1, m3):
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-10 * abs(a[k]), (k, a[k], b[k])


BENCH_WORKER = textwrap.dedent('''
    import json, sys
    from iefcli.dist.bench import main
    out = {name: main(args.split()) for name, args in json.loads(sys.argv[2]).items()}
    if out["ief"]["ranks"] == 2 and __import__("torch.distributed").distributed.get_rank() == 0:
        open(sys.argv[1], "w").write(json.dumps(out))
''')


def test_one_p_sized_all_reduce_per_step_on_two_ranks(tmp_path):
    """The training step's traffic under torchrun (iefcli.dist.bench runs the optimiser's own update):
    ONE all_reduce of P numbers (DDP's gradient all-reduce) and ONE all_gather of the predicted factor
    bytes (with momentum also R d, M numbers), for ief / ef with and without momentum and micro-batches;
    sgd: one all_reduce of P + 1."""
    import json

    configs = {"ief": "--method ief", "ef": "--method ef", "ief-mom": "--method ief --momentum 0.9",
               "ief-acc": "--method ief --accumulate 2", "ief-wide": "--method ief --hidden 200 --batch 30",
               "sgd": "--method sgd"}
    configs = {k: v + " --steps 2" for k, v in configs.items()}
    (tmp_path / "worker.py").write_text(BENCH_WORKER)
    for _attempt in range(2):
        proc = subprocess.run([*TORCHRUN, str(tmp_path / "worker.py"), str(tmp_path / "out.json"),
                               json.dumps(configs)], env=_env(), capture_output=True, text=True, timeout=120)
        # Seen on a loaded 2-core machine (twice in ~15 runs, then in both attempts of one CI run): a
        # rank aborting in gloo's C++ teardown at process exit ("terminate called without an active
        # exception", SIGABRT) AFTER its work was done. iefcli.dist.comm now has finished ranks meet in
        # a barrier before the teardown; should the torch/gloo shutdown race still strike, it is
        # unrelated to the counts checked here: run it once more.
        if proc.returncode == 0 or "terminate called without an active exception" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())
    for name in ("ief", "ef", "ief-mom", "ief-acc", "ief-wide"):
        r = out[name]
        assert r["all_reduce_calls_per_step"] == 1 and r["reduced_bytes_per_step"] == 4 * r["P"], (name, r)
        # with momentum, <update, g> for the metrics is 1^T R d / M: R d gathered (n_local float64 numbers)
        extra = 8 * r["batch"] // 2 if name == "ief-mom" else 0
        assert r["all_gather_calls_per_step"] == 1 + (extra > 0), (name, r)
        assert r["gathered_bytes_per_step"] == r["predicted_fast_gather_bytes"] + extra > 0, (name, r)
    assert out["ief-wide"]["P"] != out["ief"]["P"]
    assert out["sgd"]["all_reduce_calls_per_step"] == 1 and out["sgd"]["reduced_bytes_per_step"] == 4 * (out["sgd"]["P"] + 1)
    assert out["sgd"]["gathered_bytes_per_step"] == 0


# ----------------------------------------------------------------------------- memory: what micro-batches keep


def test_attention_model_micro_batches_equal_one_batch_in_float64():
    """The memory benchmark's model (iefcli.dist.memory.AttnNet, eager softmax attention), small: 4
    micro-batches give the one-batch direction (float64, 1e-10), and what they keep of each sequence
    Linear is its per-sample gradient (d_out x d_in + d_out numbers), not its factors (T x (d_in + d_out))."""
    from iefcli.dist.memory import AttnNet, make_batch
    from iefcli.dist.rows import _DenseBlock, _MatmulBlock

    torch.manual_seed(0)
    model = AttnNet(vocab=50, d=8, heads=2, ff=16, layers=2, train_embedding=True).double()
    p = trainable_params(model)
    ids, y = make_batch(12, 16, vocab=50)
    lf = CrossEntropy()
    one = batch_grads(model, p, ids, y, lf)
    acc = global_batch_grads(model, p, ids, y, lf, comm=Comm.local(), accumulate=4)
    for method in ("ief", "ef"):
        d1, _ = compute_direction(method, one, 1e-6)
        d2, _ = compute_direction(method, acc, 1e-6)
        assert float((d1 - d2).norm() / d1.norm()) < 1e-10, method
    kept = {b.names[0]: b for b in acc.rows.local_rows.blocks}
    for name in ("layers.0.q.weight", "layers.1.f1.weight", "layers.1.f2.weight"):
        assert isinstance(kept[name], _DenseBlock), name
        w = p[name]
        assert kept[name].mats[name].shape == (12, w.numel())
    assert isinstance(kept["head.weight"], _MatmulBlock)  # T = 1: its factors are the smaller form
    assert type(kept["emb.weight"]).__name__ == "_EmbeddingBlock"


class _ConvNet(nn.Module):
    """Conv2d kept as per-sample gradients (smaller than its X and E), a Conv2d kept as factors
    (larger per-sample gradients), a Conv1d, then a Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 4, 3, padding=1)  # X 192 + E 256 numbers per sample > 4 x 27 + 4
        self.b = nn.Conv2d(4, 16, 3, padding=1)  # on 2 x 2: X 16 + E 64 < 16 x 36 + 16
        self.c = nn.Conv1d(16, 3, 3, padding=1, bias=False)
        self.out = nn.Linear(12, 5)

    def forward(self, x):
        h = torch.nn.functional.avg_pool2d(torch.tanh(self.a(x)), 4)
        h = torch.tanh(self.b(h)).flatten(2)  # (N, 16, 4)
        return self.out(torch.tanh(self.c(h)).flatten(1))


@pytest.mark.parametrize("method", ["ief", "ef", "sf"])
def test_micro_batches_of_a_conv_model(method):
    """Conv blocks (torch's native kernels) over micro-batches: factors or per-sample gradients,
    whichever is smaller, give the one-batch direction."""
    from iefcli.dist.rows import _ConvBlock, _DenseBlock

    model = _ConvNet().double()
    p = trainable_params(model)
    x, y = torch.randn(10, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (10,))
    one = batch_grads(model, p, x, y, CrossEntropy())
    acc = global_batch_grads(model, p, x, y, CrossEntropy(), comm=Comm.local(), accumulate=3, keep_jacobians=True)
    d1, _ = compute_direction(method, one, 1e-4, generator=torch.Generator().manual_seed(2))
    d2, _ = compute_direction(method, acc, 1e-4, generator=torch.Generator().manual_seed(2))
    assert float((d1 - d2).norm() / d1.norm()) < 1e-10
    kinds = {b.names[0]: type(b) for b in acc.rows.local_rows.blocks}
    assert kinds["a.weight"] is _DenseBlock and kinds["b.weight"] is _ConvBlock, kinds


@pytest.mark.parametrize("done", [True, False])
def test_a_finished_gloo_rank_meets_the_others_before_the_teardown(done, monkeypatch):
    """At exit (the atexit hook of the group iefcli created): after finished(), a bounded monitored
    barrier comes before destroy_process_group; on an error path (not finished) the teardown is at once."""
    import torch.distributed as dist

    from iefcli.dist import comm

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(dist, "monitored_barrier", lambda timeout=None: calls.append(("barrier", timeout)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a: calls.append(("destroy", None)))
    monkeypatch.setattr(comm, "_finished", False)
    comm.finished(done)
    comm._destroy()
    if done:
        assert calls == [("barrier", datetime.timedelta(seconds=comm.EXIT_BARRIER_S)), ("destroy", None)]
    else:
        assert calls == [("destroy", None)]


def test_the_cli_marks_a_clean_exit_only(monkeypatch):
    """`ief` marks the rank finished when the command exits 0, and not when it fails."""
    import sys as _sys

    from iefcli.cli import app
    from iefcli.dist import comm

    monkeypatch.setitem(_sys.modules, "iefcli.dist.comm", comm)
    for args, want in ((["recipes"], True), (["train", "no-such-recipe"], False)):
        monkeypatch.setattr(comm, "_finished", False)
        with pytest.raises(SystemExit) as e:
            app(args, prog_name="ief")
        assert (e.value.code == 0) is want and comm._finished is want, (args, e.value.code)

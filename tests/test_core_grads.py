"""Per-sample gradients (batch_grads rows, per_sample_grads, chunked and not)
against a loop of torch.autograd.grad, frozen parameters, unused parameters."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from torch import nn

import reference as ref
from cases import CASE_NAMES, make_case
from iefcli.core import batch_grads, check_all_params_used, per_sample_grads, trainable_params
from iefcli.errors import ModelError

# float64 per-sample gradients by vmap vs the autograd loop: same maths,
# different op order, so they agree to a few ulps times the depth.
TOL = 1e-10


@lru_cache(maxsize=None)
def _prepared(name: str):
    case = make_case(name, torch.float64)
    return case, ref.per_sample_grads(case)


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_batch_grads_rows_match_loop(name, chunk_size):
    case, J = _prepared(name)
    bg = batch_grads(case.model, case.params, case.inputs, case.targets, case.loss_fn, jacobian="vmap", chunk_size=chunk_size)
    rows = bg.per_sample_grads()
    assert rows.shape == (case.n, case.n_params)
    assert rows.dtype == torch.float64
    assert ref.rel_err(rows, J) < TOL
    # g is the gradient of the MEAN loss; loss is the unscaled per-sample loss.
    assert ref.rel_err(bg.g, J.mean(0)) < TOL
    assert torch.allclose(bg.loss, ref.per_sample_losses(case), rtol=1e-12, atol=1e-12)
    assert torch.allclose(bg.logits, ref.logits(case), rtol=1e-12, atol=1e-12)
    # The Rows view agrees with the matrix it holds.
    assert torch.allclose(bg.rows.gram(), J @ J.T, rtol=1e-9, atol=1e-12 * float((J @ J.T).abs().max()))
    v = torch.randn(case.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(bg.rows.dot(v), J @ v, rtol=1e-9, atol=1e-12)
    x = torch.randn(case.n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(bg.rows.combine(x), J.T @ x, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_per_sample_grads_match_loop(name, chunk_size):
    case, J = _prepared(name)
    grads = per_sample_grads(case.model, case.params, case.inputs, case.targets, case.loss_fn, chunk_size=chunk_size)
    assert list(grads) == list(case.params)
    for name_, p in case.params.items():
        assert grads[name_].shape == (case.n, *p.shape)
    flat = torch.cat([grads[k].reshape(case.n, -1) for k in case.params], dim=1)
    assert ref.rel_err(flat, J) < TOL


def test_frozen_parameters_excluded_and_buffers_used():
    case, J = _prepared("frozen_ce")
    assert set(case.params) == {"fc2.weight", "fc2.bias"}
    bg = batch_grads(case.model, case.params, case.inputs, case.targets, case.loss_fn, jacobian="vmap")
    assert bg.layout.names == ("fc2.weight", "fc2.bias")
    assert bg.layout.size == 12 * 4 + 4 == J.shape[1]
    assert ref.rel_err(bg.per_sample_grads(), J) < TOL
    # The buffer reaches the forward: doubling it changes the gradients.
    case.model.scale.mul_(2.0)
    bg2 = batch_grads(case.model, case.params, case.inputs, case.targets, case.loss_fn, jacobian="vmap")
    case.model.scale.div_(2.0)
    assert ref.rel_err(bg2.per_sample_grads(), J) > 1e-3


def test_layout_round_trip():
    case, _ = _prepared("cnn_ce")
    bg = batch_grads(case.model, case.params, case.inputs, case.targets, case.loss_fn, jacobian="vmap")
    d = bg.layout.unflatten(bg.g)
    assert list(d) == list(case.params)
    for k, p in case.params.items():
        assert d[k].shape == p.shape
    assert torch.equal(bg.layout.flatten(d), bg.g)


class _HasUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(3, 2)
        self.unused = nn.Linear(3, 2)

    def forward(self, x):
        return self.used(x)


def test_check_all_params_used_names_the_unused_parameter():
    model = _HasUnused().double()
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ModelError) as exc:
        check_all_params_used(model, trainable_params(model), x)
    msg = str(exc.value)
    assert "unused.weight" in msg and "unused.bias" in msg
    assert "used.weight" not in msg.replace("unused.weight", "")
    # Freezing the unused layer makes the check pass.
    for p in model.unused.parameters():
        p.requires_grad_(False)
    check_all_params_used(model, trainable_params(model), x)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_check_all_params_used_passes_on_cases(name):
    case, _ = _prepared(name)
    check_all_params_used(case.model, case.params, case.inputs)


def test_unknown_jacobian_path():
    case, _ = _prepared("mlp_ce")
    with pytest.raises(ValueError, match="unknown jacobian"):
        batch_grads(case.model, case.params, case.inputs, case.targets, case.loss_fn, jacobian="nope")


class _WithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def test_dropout_randomness_is_an_explicit_choice():
    gen = torch.Generator().manual_seed(61)
    model = _WithDropout().double()
    x = torch.randn(5, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (5,), generator=gen)
    from iefcli.core import CrossEntropy

    params = trainable_params(model)
    model.train()
    with pytest.raises(RuntimeError, match="randomness"):  # the default, "error", refuses dropout
        batch_grads(model, params, x, y, CrossEntropy(), jacobian="vmap")
    with torch.random.fork_rng(devices=[]):
        bg = batch_grads(model, params, x, y, CrossEntropy(), jacobian="vmap", randomness="different")
    assert torch.isfinite(bg.per_sample_grads()).all()
    # In eval mode dropout is the identity: rows equal those of the same net without it.
    model.eval()
    bg_eval = batch_grads(model, params, x, y, CrossEntropy(), jacobian="vmap")
    ce = lambda z, t: torch.nn.functional.cross_entropy(z, t, reduction="sum")  # noqa: E731
    assert ref.rel_err(bg_eval.per_sample_grads(), ref.module_rows(model, x, y, ce)) < TOL

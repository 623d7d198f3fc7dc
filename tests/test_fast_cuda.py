"""The fast path on a CUDA device (skipped without one): the same equalities as tests/test_fast.py,
with every tensor on the GPU, plus bf16 models and autocast (mixed precision).

TF32 is switched off for the comparison: with it, float32 convolutions/matmuls on
Ampere+ round inputs to 10-bit mantissas and neither path is float32-exact.
"""

from __future__ import annotations

import pytest
import torch

import reference as ref
from cases import CASE_NAMES, make_case
from iefcli import directions
from iefcli.core import batch_grads, default_forward, sampled_rows, trainable_params
from iefcli.core.fast import FastRows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _to(x, dev):
    if isinstance(x, dict):
        return {k: v.to(dev) for k, v in x.items()}
    return x.to(dev)


def _cuda_case(name, dtype):
    case = make_case(name, dtype)
    dev = torch.device("cuda")
    case.model.to(dev)
    return case.model, trainable_params(case.model), _to(case.inputs, dev), case.targets.to(dev), case.loss_fn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_directions_equal_plain_path_on_cuda(name, dtype):
    args = _cuda_case(name, dtype)
    bf = batch_grads(*args, jacobian="fast")
    bv = batch_grads(*args, jacobian="vmap")
    assert isinstance(bf.rows, FastRows)
    assert bf.rows.gram().device.type == "cuda" and bf.g.device.type == "cuda"
    tol = TOL[dtype]
    assert ref.rel_err(bf.rows.gram(), bv.rows.gram()) < tol
    for lam in (1e-8, 1e-4, 1.0):
        assert ref.rel_err(directions.ief(bf.rows, bf.s, lam), directions.ief(bv.rows, bv.s, lam)) < tol
        assert ref.rel_err(directions.ef(bf.rows, lam), directions.ef(bv.rows, lam)) < tol
        g1 = torch.Generator(device="cuda").manual_seed(7)
        g2 = torch.Generator(device="cuda").manual_seed(7)
        sf_f = directions.sf(sampled_rows(bf, 2, g1), bf.g, lam)
        sf_v = directions.sf(sampled_rows(bv, 2, g2), bv.g, lam)
        assert ref.rel_err(sf_f, sf_v) < tol * 10


@pytest.mark.parametrize("name", ["mlp_ce", "cnn_ce", "transformer_tokce"])
def test_bf16_model_and_autocast(name):
    """bf16 parameters, and a float32 model under bf16 autocast: float64 Gram close to the float32 one."""
    model, params, inputs, y, loss = _cuda_case(name, torch.float32)
    want = batch_grads(model, params, inputs, y, loss, jacobian="fast")

    def autocast_forward(m, p, x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return default_forward(m, p, x).float()

    got = batch_grads(model, params, inputs, y, loss, jacobian="fast", forward=autocast_forward)
    assert got.rows.gram().dtype == torch.float64
    assert ref.rel_err(got.rows.gram(), want.rows.gram()) < 5e-2
    assert ref.cos(directions.ief(got.rows, got.s, 1e-4), directions.ief(want.rows, want.s, 1e-4)) > 0.99

    model.to(torch.bfloat16)
    p16 = trainable_params(model)
    x16 = inputs if isinstance(inputs, dict) else inputs.to(torch.bfloat16)
    b16 = batch_grads(model, p16, x16, y, loss, jacobian="fast")
    assert b16.rows.gram().dtype == torch.float64 and b16.g.dtype == torch.bfloat16
    assert ref.rel_err(b16.rows.gram(), want.rows.gram()) < 1e-1

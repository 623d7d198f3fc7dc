"""The core on an accelerator gives the CPU's numbers, keeps results on the device and
does not wait on it inside the EF/iEF/SF solves or a sync-free CG.
Skipped without CUDA (CI is CPU-only); run on a GPU machine to check device-agnosticism
(`python -m pytest tests/test_core_device.py` there)."""

from __future__ import annotations

import pytest
import torch

import reference as ref
from cases import CASE_NAMES, make_case
from iefcli import directions
from iefcli.core import batch_grads, conjugate_gradient, ggn_vp, sampled_rows, solve_gram
from iefcli.gamma import gamma

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LAM = 1e-6


def _all(case):
    bg = batch_grads(case.model, case.params, case.inputs, case.targets, case.loss_fn, jacobian="vmap")
    dev = bg.g.device
    R = sampled_rows(bg, 2, torch.Generator(device=dev).manual_seed(0))
    out = {
        "g": bg.g,
        "ef": directions.ef(bg.rows, LAM),
        "ief": directions.ief(bg.rows, bg.s, LAM),
        "ngd": directions.ngd(bg, 1e-2),
        "sf_rows": R.matrix,
    }
    out["gamma_ief"] = gamma(bg, out["ief"])
    return bg, out


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(name, dtype):
    _, cpu = _all(make_case(name, torch.float64))
    bg, gpu = _all(make_case(name, dtype, device="cuda"))
    # float64: same maths, different kernels; float32: tolerance as in the float32 test.
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for k in ("g", "ef", "ief", "ngd", "gamma_ief"):
        assert gpu[k].device.type == "cuda", k
        assert ref.rel_err(gpu[k].cpu().reshape(-1), cpu[k].reshape(-1)) < tol, k
    assert gpu["ief"].dtype == dtype
    # SF rows come from the device generator (different stream than CPU): check shape and device only.
    assert gpu["sf_rows"].device.type == "cuda" and gpu["sf_rows"].shape == cpu["sf_rows"].shape


def test_cuda_solves_do_not_sync_with_the_host():
    """torch.cuda sync debug mode "error" raises on any device-to-host wait."""
    case = make_case("mlp_ce", torch.float64, device="cuda")
    bg = batch_grads(case.model, case.params, case.inputs, case.targets, case.loss_fn, jacobian="vmap")
    R = sampled_rows(bg, 2, torch.Generator(device="cuda").manual_seed(0))
    g, s = bg.g, bg.s
    bg.rows.gram(), R.gram()
    J = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [1.0, 1.0, 1.0]], dtype=torch.float64, device="cuda")
    rhs = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64, device="cuda")

    def mv(v):
        return ggn_vp(bg.jac, bg.loss_fn, bg.targets, v) + 1e-2 * v

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        directions.ief(bg.rows, s, LAM, return_info=True)
        directions.ef(bg.rows, LAM, return_info=True)
        directions.sf(R, g, LAM, return_info=True)
        x, info = solve_gram(J @ J.T, rhs, 0.0, dup_threshold=None)  # Cholesky fails: the where-fallback
        conjugate_gradient(mv, g, maxiter=30, check_every=None)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert bool(info.fallback) and torch.isfinite(x).all()

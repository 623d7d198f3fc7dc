"""The pure functional core: no I/O, no printing, randomness only from explicit generators."""

from iefcli.core.ggn import CGInfo, conjugate_gradient, ggn_matrix, ggn_quadratic, ggn_vp
from iefcli.core.jacobian import (
    BatchGrads,
    DenseRows,
    OutputJacobian,
    Rows,
    VmapJacobian,
    batch_grads,
    check_all_params_used,
    default_forward,
    make_jacobian,
    per_sample_grads,
    register_jacobian,
    sampled_rows,
)
from iefcli.core.losses import MSE, CrossEntropy, Loss, TokenCrossEntropy, TokenMeanCrossEntropy, get_loss
from iefcli.core.params import ParamLayout, trainable_params
from iefcli.core.solve import SolveInfo, duplicate_mask, solve_gram
from iefcli.core.stats import batch_imbalance, imbalance

# Registers the fast OutputJacobian as "fast" (make_jacobian(jacobian="auto") then picks it).
from iefcli.core import fast as _fast  # noqa: E402,F401

__all__ = [
    "BatchGrads", "DenseRows", "OutputJacobian", "Rows", "VmapJacobian", "batch_grads",
    "check_all_params_used", "default_forward", "make_jacobian", "per_sample_grads",
    "register_jacobian", "sampled_rows", "MSE", "CrossEntropy", "Loss", "TokenCrossEntropy", "TokenMeanCrossEntropy",
    "get_loss", "ParamLayout", "trainable_params", "SolveInfo", "duplicate_mask", "solve_gram",
    "batch_imbalance", "imbalance", "CGInfo", "conjugate_gradient", "ggn_matrix", "ggn_quadratic", "ggn_vp",
]

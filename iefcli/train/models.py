"""Built-in models: an MLP and a bias-free linear model (the toy)."""

from __future__ import annotations

import math

import torch
from torch import nn

from iefcli.train.recipe import Field, check_keys

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}

MLP_FIELDS = {
    "sizes": Field("int_list", [128], "hidden layer widths (input and output sizes come from the data)",
                   check=lambda v: None if all(s >= 1 for s in v) else f"must be positive integers, got {v}"),
    "activation": Field("str", "relu", "relu | tanh | gelu | sigmoid | silu", choices=tuple(ACTIVATIONS)),
    "bias": Field("bool", True, "biases in every layer"),
}


def build_mlp(section: dict, ctx) -> nn.Module:
    """Flatten -> [Linear -> act] * len(sizes) -> Linear(n_outputs)."""
    cfg = check_keys(ctx.recipe, "model", section, MLP_FIELDS)
    d_in = math.prod(ctx.data.input_shape)
    layers: list[nn.Module] = [nn.Flatten()]
    for width in (int(s) for s in cfg["sizes"]):
        layers += [nn.Linear(d_in, width, bias=cfg["bias"]), ACTIVATIONS[cfg["activation"]]()]
        d_in = width
    layers.append(nn.Linear(d_in, ctx.data.n_outputs, bias=cfg["bias"]))
    return nn.Sequential(*layers)


LINEAR_FIELDS = {
    "bias": Field("bool", False, "a bias term (the toy has none)"),
    "init": Field("float_list", None, "initial weights, row-major (null: torch's default init)", optional=True),
}


def build_linear(section: dict, ctx) -> nn.Module:
    """z = W x (+ b): the toy's 2-parameter model when n_outputs = 1 and inputs are 2-d."""
    cfg = check_keys(ctx.recipe, "model", section, LINEAR_FIELDS)
    d_in = math.prod(ctx.data.input_shape)
    lin = nn.Linear(d_in, ctx.data.n_outputs, bias=cfg["bias"])
    if cfg["init"] is not None:
        if len(cfg["init"]) != lin.weight.numel():
            raise ctx.recipe.error("model.init", f"must have {lin.weight.numel()} numbers, got {len(cfg['init'])}")
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(cfg["init"]).reshape(lin.weight.shape))
    return nn.Sequential(nn.Flatten(), lin)

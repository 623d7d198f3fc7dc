"""kfac, ekfac, iekfac: Kronecker-factored optimisers behind the pure optimiser contract.

One step (see docs/kfac.md for the maths and the meaning of damping):

1. one forward with :class:`iefcli.kfac.capture.Capture` hooks, one backward of
   the per-sample logit gradients dl_n/dz_n (true labels): the mean-loss
   gradient g, each layer's inputs a and output gradients e_true, s_n;
   with ``fisher_type="sampled"`` a second backward with dl/dz at labels drawn
   from the model (explicit generator from ``key``) gives e_fac (else e_fac = e_true);
2. on a statistics step (every ``stat_interval``): running averages
   (decay ``stat_decay``; the first step takes the batch's value) of
   A, G (from a, e_fac) and of the fallback diagonal;
3. on an inverse step (every ``inv_interval``, and on statistics steps for a layer whose
   basis came from an all-zero factor): float64 eigendecompositions
   of A and G; for ekfac/iekfac the diagonal S in the new basis is reset to
   this batch's estimate (on other statistics steps it is a running average in the kept basis):
   ekfac: S = 1/N sum_n (U_G^T J_n U_A)^2 from e_fac; iekfac: the same from
   e_true with weights 1/s_n (iEF's scaling);
4. direction per layer (paper scale, ``scale`` = 1/N for kfac/ekfac, N for iekfac):
   kfac   (scale G (x) A + lam I)^{-1} g        (``damping_split="eigen"``: exact)
          or pi-damped factors                  (``damping_split="pi"``)
   ekfac  U (scale S + lam I)^{-1} U^T g
   iekfac U (scale S_iEF + lam I)^{-1} U^T g
   fallback parameters: g / (scale D + lam), D the same method's diagonal;
5. momentum, decoupled weight decay and the shared tail as ef/ief.

State (nested dict of tensors, safetensors round trip): ``step``; per layer
A, G, UA, lamA, UG, lamG (and S); per fallback parameter D; momentum.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from torch.func import grad as func_grad
from torch.func import vmap
from torch.utils._pytree import tree_map

from iefcli.core.params import ParamLayout, Params
from iefcli.kfac import factors as kf
from iefcli.kfac.capture import Capture, LayerRule, find_layers

METHODS = ("kfac", "ekfac", "iekfac")
State = dict[str, Any]

__all__ = ["fisher_for", "KFACOptions", "KFACOptimizer", "BatchCurvature", "METHODS", "kfac_direction", "layer_grad", "options_from"]


@dataclass(frozen=True)
class KFACOptions:
    """The K-FAC family's own options (recipe keys ``optimizer.<name>`` once the schema has them).

    fisher_type:   labels of the factors A, G (and of eK-FAC's diagonal): "sampled" (true Fisher:
                   labels drawn from the model) | "empirical" (true labels) | None: the method's
                   default, sampled for kfac/ekfac and empirical for iekfac (iEF is built from
                   true-label gradients; its basis from sampled labels measured much worse, docs/kfac.md)
    seq_mode:      "expand" | "reduce" (layers with sequence/spatial inputs; docs/kfac.md)
    damping_split: "eigen" (exact Tikhonov through the eigenbases) | "pi" (pi-damping of the factors); kfac only
    stat_interval: update the running factor statistics every this many steps
    inv_interval:  recompute eigenbases (and reset eK-FAC's S) every this many steps
    stat_decay:    running-average decay of A, G, S and the fallback diagonal (0: this batch only)
    """

    fisher_type: str | None = None
    seq_mode: str = "expand"
    damping_split: str = "eigen"
    stat_interval: int = 1
    inv_interval: int = 10
    stat_decay: float = 0.95

    def __post_init__(self):
        if self.fisher_type not in (None, "sampled", "empirical"):
            raise ValueError(f"fisher_type must be sampled or empirical, got {self.fisher_type!r}")
        if self.seq_mode not in kf.SEQ_MODES:
            raise ValueError(f"seq_mode must be expand or reduce, got {self.seq_mode!r}")
        if self.damping_split not in ("eigen", "pi"):
            raise ValueError(f"damping_split must be eigen or pi, got {self.damping_split!r}")
        if self.stat_interval < 1 or self.inv_interval < 1:
            raise ValueError("stat_interval and inv_interval must be >= 1")
        if not 0 <= self.stat_decay < 1:
            raise ValueError(f"stat_decay must be in [0, 1), got {self.stat_decay}")


def fisher_for(method: str, opts: KFACOptions) -> str:
    """The labels method ``method`` builds its factors from under ``opts``."""
    if opts.fisher_type is not None:
        return opts.fisher_type
    return "empirical" if method == "iekfac" else "sampled"


def options_from(config: Any, **overrides) -> KFACOptions:
    """KFACOptions from any object with (some of) its field names as attributes
    (an OptimConfig once it grows them; a MethodOptions), defaults for the rest."""
    kw = {f.name: getattr(config, f.name) for f in fields(KFACOptions)
          if config is not None and getattr(config, f.name, None) is not None}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return KFACOptions(**kw)


# ----------------------------------------------------------------------------- per-layer views


def layer_grad(rule: LayerRule, grads: Params) -> Tensor:
    """The layer's gradient in linear form (d_out, d_in [+1])."""
    w = grads[rule.weight]
    if rule.kind == "embedding":
        return w.T
    w2 = w.reshape(w.shape[0], -1)
    return torch.cat([w2, grads[rule.bias][:, None]], dim=1) if rule.bias is not None else w2


def _split_layer(rule: LayerRule, d: Tensor, shapes: dict[str, torch.Size], dtype: torch.dtype) -> Params:
    """Inverse of :func:`layer_grad` for a direction."""
    if rule.kind == "embedding":
        return {rule.weight: d.T.to(dtype).reshape(shapes[rule.weight])}
    out = {}
    if rule.bias is not None:
        out[rule.bias] = d[:, -1].to(dtype).reshape(shapes[rule.bias])
        d = d[:, :-1]
    out[rule.weight] = d.to(dtype).reshape(shapes[rule.weight])
    return out


# ----------------------------------------------------------------------------- one batch


class Curvature:
    """What one batch gives K-FAC, however it was captured: ``n``, per-sample losses ``loss`` and
    ``s`` (N,), the mean-loss gradient ``grads`` (name -> tensor), each rule layer's ``a`` /
    ``e_true`` / ``e_fac`` (N, T, d) in linear form (empty dicts on a step without statistics),
    and the fallback parameters' per-sample gradients ``fb_true`` / ``fb_fac`` (N, *shape).
    :class:`BatchCurvature` fills it from a functional forward (the registry optimiser);
    :class:`iefcli.precond.kfac.KFACPreconditioner` from the hooks on the user's own forward."""

    rules: list[LayerRule]
    fallback: list[str]
    n: int
    s: Tensor
    loss: Tensor
    grads: Params
    a: dict[str, Tensor]
    e_true: dict[str, Tensor]
    e_fac: dict[str, Tensor]
    fb_true: Params
    fb_fac: Params

    @classmethod
    def of(cls, **fields) -> "Curvature":
        self = cls.__new__(cls)
        for k, v in fields.items():
            setattr(self, k, v)
        return self

    def factors(self, rule: LayerRule, seq_mode: str) -> tuple[Tensor, Tensor]:
        mode = "expand" if rule.kind == "embedding" else seq_mode
        return kf.kronecker_factors(self.a[rule.name], self.e_fac[rule.name], mode, diag_a=rule.kind == "embedding")

    def diag_S(self, rule: LayerRule, UA, UG, method: str) -> Tensor:
        """This batch's eK-FAC (from e_fac) or ieK-FAC (from e_true, weights 1/s_n) diagonal, mean form."""
        if method == "iekfac":
            return kf.projected_second_moment(self.a[rule.name], self.e_true[rule.name], UA, UG, _inv_s(self.s))
        return kf.projected_second_moment(self.a[rule.name], self.e_fac[rule.name], UA, UG)

    def fallback_diag(self, name: str, method: str) -> Tensor:
        """Mean form of the fallback diagonal: 1/N sum_n j_n^2 (fac labels), or with weights 1/s_n (iekfac)."""
        if method == "iekfac":
            j = self.fb_true[name]
            w = _inv_s(self.s).to(j.dtype).reshape(-1, *([1] * (j.dim() - 1)))
            return (w * j.pow(2)).mean(dim=0)
        return self.fb_fac[name].pow(2).mean(dim=0)


class BatchCurvature(Curvature):
    """Everything one batch gives K-FAC: per-sample losses, s, the mean-loss gradient,
    each layer's a / e_true / e_fac, and the fallback parameters' per-sample gradients.

    ``fac_dtype``: dtype of a and e (float32 for float32 models, float64 for float64).
    """

    def __init__(self, fn, params: Params, inputs: Any, targets: Tensor, rules: list[LayerRule],
                 fallback: list[str], *, fisher_type: str, generator: torch.Generator | None,
                 capture: bool = True):
        self.rules, self.fallback = rules, fallback
        dtype = next(iter(params.values())).dtype
        self.fac_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        cap = Capture(fn.model, rules if capture else [], dtype=self.fac_dtype)
        with torch.enable_grad(), cap:
            logits = fn.forward(fn.model, leaves, inputs)
            z = logits.detach()
            lg = fn.loss_fn.logit_grad(z, targets)
            n = z.shape[0]
            sampled = capture and fisher_type == "sampled" and (rules or fallback)
            gsum = torch.autograd.grad(logits, list(leaves.values()), grad_outputs=lg.to(logits.dtype),
                                       retain_graph=bool(sampled and rules), allow_unused=True)
            yhat = None
            if sampled:
                safe = torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
                yhat = fn.loss_fn.sample(safe, targets, 1, generator)[0]
                if rules:
                    torch.autograd.grad(logits, list(leaves.values()),
                                        grad_outputs=fn.loss_fn.logit_grad(z, yhat).to(logits.dtype),
                                        allow_unused=True)
        self.n = n
        self.loss = fn.loss_fn.per_sample(z, targets)
        self.logits = z
        self.s = lg.reshape(n, -1).pow(2).sum(dim=1)
        self.grads = {k: (torch.zeros_like(params[k]) if g is None else g / n) for k, g in zip(leaves, gsum)}
        self.bad: dict[str, str] = cap.check(n) if capture and rules else {}
        self.a: dict[str, Tensor] = {}
        self.e_true: dict[str, Tensor] = {}
        self.e_fac: dict[str, Tensor] = {}
        if capture and not self.bad:
            for r in rules:
                self.a[r.name] = cap.a(r)
                self.e_true[r.name] = cap.e(r, 0)
                self.e_fac[r.name] = cap.e(r, 1) if yhat is not None else self.e_true[r.name]
        self.fb_true: Params = {}
        self.fb_fac: Params = {}
        if capture and fallback:
            self.fb_true = _fallback_rows(fn, params, fallback, inputs, targets)
            self.fb_fac = _fallback_rows(fn, params, fallback, inputs, yhat) if yhat is not None else self.fb_true


def _inv_s(s: Tensor) -> Tensor:
    """1/s_n, and 0 where s_n = 0 (then the sample's gradient is 0 too: it carries no information)."""
    s64 = s.to(torch.float64)
    return torch.where(s64 > 0, 1.0 / torch.where(s64 > 0, s64, torch.ones_like(s64)), torch.zeros_like(s64))


def _fallback_rows(fn, params: Params, names: list[str], inputs: Any, labels: Tensor) -> Params:
    """Per-sample gradients of just the ``names`` parameters (the others held fixed), by vmap."""
    rest = {k: v.detach() for k, v in params.items() if k not in names}
    sub = {k: params[k].detach() for k in names}

    def loss_one(p: Params, x_n: Any, y_n: Tensor) -> Tensor:
        z = fn.forward(fn.model, {**rest, **p}, tree_map(lambda t: t.unsqueeze(0), x_n))
        return fn.loss_fn.per_sample(z, y_n.unsqueeze(0)).squeeze(0)

    return vmap(func_grad(loss_one), in_dims=(None, 0, 0))(sub, inputs, labels)


# ----------------------------------------------------------------------------- the direction


def _scale(method: str, n: int) -> float:
    """Paper-scale matrix = scale * (mean-form statistic): 1/N for K-FAC/eK-FAC (matrices of the
    mean loss's per-sample gradients, (1/N^2) sum_n), N for ieK-FAC (sum_n j_n j_n^T / s_n)."""
    return float(n) if method == "iekfac" else 1.0 / n


def precondition(method: str, rules: list[LayerRule], fallback: list[str], layers: dict, fb_diag: dict,
                 grads: Params, n: int, damping: float, damping_split: str) -> Params:
    """The direction dict (paper scale) from the current curvature state and the mean gradient."""
    scale = _scale(method, n)
    shapes = {k: v.shape for k, v in grads.items()}
    out: Params = {}
    for r in rules:
        st = layers[r.name]
        UA = None if r.kind == "embedding" else st["UA"]
        gr = layer_grad(r, grads)
        if method == "kfac":
            if damping_split == "pi":
                dA, dG = kf.pi_split(st["A"], st["G"], scale, damping)
                d = kf.kfac_pi_precondition(gr, UA, st["lamA"], st["UG"], st["lamG"], scale, damping, dA, dG)
            else:
                d = kf.kfac_precondition(gr, UA, st["lamA"], st["UG"], st["lamG"], scale, damping)
        else:
            d = kf.ekfac_precondition(gr, UA, st["UG"], st["S"], scale, damping)
        out.update(_split_layer(r, d, shapes, grads[r.weight].dtype))
    for name in fallback:
        den = scale * fb_diag[name].to(torch.float64) + damping
        g64 = grads[name].to(torch.float64)
        out[name] = kf._divide(g64, den).to(grads[name].dtype)
    return out


def batch_state(bc: BatchCurvature, method: str, seq_mode: str) -> tuple[dict, dict]:
    """(per-layer state, fallback diagonals) from ONE batch: the stateless eval-gamma direction."""
    layers = {}
    for r in bc.rules:
        A, G = bc.factors(r, seq_mode)
        UA, lamA = kf.eigh_factor(A)
        UG, lamG = kf.eigh_factor(G)
        st = {"A": A, "G": G, "lamA": lamA, "UG": UG, "lamG": lamG}
        if UA is not None:
            st["UA"] = UA
        if method != "kfac":
            st["S"] = bc.diag_S(r, UA, UG, method)
        layers[r.name] = st
    return layers, {name: bc.fallback_diag(name, method) for name in bc.fallback}


def kfac_direction(method: str, model, params: Params, inputs: Any, targets: Tensor, loss_fn, forward,
                   damping: float, *, generator: torch.Generator | None = None,
                   options: KFACOptions | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Stateless K-FAC-family direction for one batch (factors and S from this batch only), flat (P,),
    paper-scale damping. Returns (d, info) with 0-d tensors."""
    from iefcli.optim.base import ModelFn

    if method not in METHODS:
        raise ValueError(f"unknown K-FAC method {method!r}")
    opts = options or KFACOptions()
    rules, fb = find_layers(model, list(params))
    fn = ModelFn(model, loss_fn, forward)
    ft = fisher_for(method, opts)
    bc = BatchCurvature(fn, params, inputs, targets, rules, list(fb), fisher_type=ft, generator=generator)
    if bc.bad:
        rules, fbl = _demote(rules, fb, bc.bad)
        bc = BatchCurvature(fn, params, inputs, targets, rules, fbl, fisher_type=ft, generator=generator)
    layers, fbd = batch_state(bc, method, opts.seq_mode)
    d = precondition(method, bc.rules, bc.fallback, layers, fbd, bc.grads, bc.n, damping, opts.damping_split)
    layout = ParamLayout.of(params)
    dev = bc.logits.device
    return layout.flatten(d), {"kfac_layers": torch.tensor(len(bc.rules), device=dev),
                               "kfac_fallback_params": torch.tensor(len(bc.fallback), device=dev)}


def _fac_dtype(params: Params) -> torch.dtype:
    """Factor dtype: float64 for float64 models, else float32."""
    return torch.float64 if next(iter(params.values())).dtype == torch.float64 else torch.float32


def _demote(rules: list[LayerRule], fb: dict[str, str], bad: dict[str, str]) -> tuple[list[LayerRule], list[str]]:
    keep = [r for r in rules if r.name not in bad]
    names = list(fb)
    for r in rules:
        if r.name in bad:
            fb[r.weight] = bad[r.name]
            names.append(r.weight)
            if r.bias is not None:
                fb[r.bias] = bad[r.name]
                names.append(r.bias)
    return keep, names


def init_state(method: str, rules: list[LayerRule], fallback, params: Params) -> State:
    """The curvature state before the first step: step 0, zero factors, identity bases, zero S and D."""
    fdt = _fac_dtype(params)
    dev = next(iter(params.values())).device
    e64 = dict(dtype=torch.float64, device=dev)
    layers = {}
    for r in rules:
        w = params[r.weight]
        if r.kind == "embedding":
            d_in, d_out = w.shape
        else:
            d_out, d_in = w.shape[0], w[0].numel() + (r.bias is not None)
        st = {"G": torch.zeros(d_out, d_out, dtype=fdt, device=dev),
              "UG": torch.eye(d_out, **e64), "lamG": torch.zeros(d_out, **e64),
              "lamA": torch.zeros(d_in, **e64)}
        if r.kind == "embedding":
            st["A"] = torch.zeros(d_in, dtype=fdt, device=dev)
        else:
            st["A"] = torch.zeros(d_in, d_in, dtype=fdt, device=dev)
            st["UA"] = torch.eye(d_in, **e64)
        if method != "kfac":
            st["S"] = torch.zeros(d_out, d_in, dtype=fdt, device=dev)
        layers[r.name] = st
    return {"step": torch.zeros((), dtype=torch.int64), "layers": layers,
            "fallback": {k: torch.zeros_like(params[k], dtype=fdt) for k in fallback}}


def schedule(opts: KFACOptions, step: int) -> tuple[bool, bool]:
    """(statistics step, inverse step) for step number ``step`` (0-based)."""
    return step % opts.stat_interval == 0, step % opts.inv_interval == 0


def advance(method: str, o: KFACOptions, rules: list[LayerRule], fb_names: list[str], state: State,
            bc: Curvature, step: int, damping: float) -> tuple[dict, dict, Params]:
    """One step of the curvature state and the direction, shared by the registry optimiser and the
    drop-in preconditioner: running averages of A, G, D (and S) on a statistics step, float64
    eigendecompositions on an inverse step (and for layers with no curvature seen yet), then the
    paper-scale direction from ``bc.grads``. Returns (layers, fallback diagonals, direction dict);
    ``state`` is not modified."""
    do_stats, do_inv = schedule(o, step)
    first = step == 0
    beta = 0.0 if first else o.stat_decay
    layers = {k: dict(v) for k, v in state.get("layers", {}).items()}  # empty dicts do not survive safetensors
    fbd = dict(state.get("fallback", {}))

    def ema(old: Tensor, new: Tensor) -> Tensor:
        # An all-zero running value (a layer that had no gradient yet, e.g. LoRA's A while B = 0)
        # takes the new value instead of averaging it with zeros (no host read: a device where).
        new = new.to(old.dtype)
        if beta == 0:
            return new.clone()
        b = old.any().to(old.dtype) * beta  # beta in old's dtype (a where on a Python float rounds to float32)
        return b * old + (1 - b) * new

    if do_stats:
        for r in rules:
            A, G = bc.factors(r, o.seq_mode)
            layers[r.name]["A"] = ema(layers[r.name]["A"], A)
            layers[r.name]["G"] = ema(layers[r.name]["G"], G)
        for k in fb_names:
            fbd[k] = ema(fbd[k], bc.fallback_diag(k, method))
    # Layers to (re)decompose: all on an inverse step; on other statistics steps those whose
    # basis came from an all-zero factor (no curvature seen yet: LoRA's A at B = 0), found with
    # ONE host read, so that they do not keep a meaningless basis for inv_interval steps.
    if do_inv:
        fresh = {r.name for r in rules}
    elif do_stats and rules:
        dead = torch.stack([~(layers[r.name]["lamA"].any() & layers[r.name]["lamG"].any()) for r in rules])
        fresh = {r.name for r, flag in zip(rules, dead.tolist()) if flag}
    else:
        fresh = set()
    for r in rules:
        if r.name in fresh:
            st = layers[r.name]
            UA, st["lamA"] = kf.eigh_factor(st["A"])
            if UA is not None:
                st["UA"] = UA
            st["UG"], st["lamG"] = kf.eigh_factor(st["G"])
    if method != "kfac" and (do_stats or do_inv):
        for r in rules:
            st = layers[r.name]
            S = bc.diag_S(r, st.get("UA"), st["UG"], method)
            st["S"] = S.to(st["S"].dtype).clone() if r.name in fresh else ema(st["S"], S)
    d_dict = precondition(method, rules, fb_names, layers, fbd, bc.grads, bc.n, damping,
                          o.damping_split)
    return layers, fbd, d_dict


# ----------------------------------------------------------------------------- the optimiser


class KFACOptimizer:
    """kfac / ekfac / iekfac behind :mod:`iefcli.optim.base`'s pure contract.

    ``config``: an OptimConfig (name, lr, damping, momentum, weight_decay, clip_update_norm);
    the K-FAC options are read from it by field name when present, else from ``options``
    or :class:`KFACOptions`' defaults. Layers without a rule are listed in ``fallback``
    ({param: reason}) and announced once with ``warnings.warn`` at construction.
    """

    def __init__(self, config, fn, options: KFACOptions | None = None):
        if config.name not in METHODS:
            raise ValueError(f"not a K-FAC optimiser: {config.name}")
        self.config = config
        self.name = config.name
        self.fn = fn
        self.options = options or options_from(config)
        names = [k for k, p in fn.model.named_parameters() if p.requires_grad]
        self.rules, self.fallback = find_layers(fn.model, names)
        if self.fallback:
            warnings.warn(f"{self.name}: no K-FAC rule, diagonal fallback for: "
                          + "; ".join(f"{k} ({why})" for k, why in self.fallback.items()), stacklevel=2)

    def describe(self) -> list[str]:
        """One line per layer: its rule, or its fallback and why."""
        lines = [f"{r.name or '<root>'}: {r.kind}{' + bias' if r.bias else ''}" for r in self.rules]
        return lines + [f"{k}: diagonal fallback ({why})" for k, why in self.fallback.items()]

    def init(self, params: Params) -> State:
        state = init_state(self.name, self.rules, self.fallback, params)
        if self.config.momentum > 0:
            state["momentum"] = {k: torch.zeros_like(v) for k, v in params.items()}
        return state

    def update(self, params: Params, state: State, batch: Any, *, key: int, lr: float):
        c, o = self.config, self.options
        step = int(state["step"])
        do_stats, do_inv = schedule(o, step)
        dev = next(iter(params.values())).device
        gen = torch.Generator(device=dev).manual_seed(int(key))
        fb_names = list(self.fallback)
        bc = BatchCurvature(self.fn, params, batch.inputs, batch.targets, self.rules, fb_names,
                            fisher_type=fisher_for(self.name, o), generator=gen, capture=do_stats or do_inv)
        if bc.bad:
            # Found only by running the model (called twice, not batch-first): such layers move to the
            # diagonal fallback for good (a resumed run finds them again at its first step).
            warnings.warn(f"{self.name}: diagonal fallback for layer(s) not capturable per sample: "
                          + "; ".join(f"{k} ({v})" for k, v in bc.bad.items()), stacklevel=2)
            self.rules, fb_names = _demote(self.rules, self.fallback, bc.bad)
            state = {**state, "layers": {k: v for k, v in state.get("layers", {}).items() if k not in bc.bad},
                     "fallback": {**{k: torch.zeros_like(params[k], dtype=_fac_dtype(params)) for k in fb_names},
                                  **state.get("fallback", {})}}
            bc = BatchCurvature(self.fn, params, batch.inputs, batch.targets, self.rules, fb_names,
                                fisher_type=fisher_for(self.name, o), generator=gen.manual_seed(int(key)),
                                capture=do_stats or do_inv)
        layers, fbd, d_dict = advance(self.name, o, self.rules, fb_names, state, bc, step, c.damping)
        layout = ParamLayout.of(params)
        d = layout.flatten(d_dict)
        from iefcli.optim.base import finish_step, momentum_and_decay

        d, theta, new_state = momentum_and_decay(layout, d, params, state, c)
        new_state.update({"step": torch.tensor(step + 1, dtype=torch.int64), "layers": layers, "fallback": fbd})
        metrics = {"loss": bc.loss.mean().detach()}

        new_params, metrics = finish_step(layout, theta, theta - lr * d, layout.flatten(bc.grads), c, metrics)
        return new_params, new_state, metrics


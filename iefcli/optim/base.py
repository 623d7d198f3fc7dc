"""One contract for every optimiser: a pure pair (init, update), optax-style.

    opt = make_optimizer(name, config, model=..., loss_fn=..., forward=...)
    state = opt.init(params)
    new_params, state, metrics = opt.update(params, state, batch, key=seed, lr=lr)

- ``params``: the trainable params dict (detached tensors); never modified in
  place: ``update`` returns new tensors.
- ``state``: a nested dict of tensors (saved as safetensors by the shell).
- ``batch``: anything with ``.inputs`` and ``.targets`` (a Batch).
- ``key``: an int seed for the step's randomness (SF's label draws), turned
  into a fresh ``torch.Generator`` on the batch's device: the same key gives
  the same step, which is what makes --resume exact.
- ``lr``: the learning rate for this step (the schedule lives in the shell).
- ``metrics``: dict of 0-d tensors (loss = mean batch loss BEFORE the step,
  grad_norm, update_norm, and for ef/sf/ief/ngd the solve diagnostics and
  cos_update_grad). The shell reads them back to the host when it logs.
- ``diagnostics`` (optional keyword, only for an ``update`` that declares it;
  call through :func:`update_step`): False skips what only a log line
  reads (grad_norm, cos_update_grad, the imbalance, mean_target_prob): metrics
  then hold loss, update_norm and the solve's own info. The new params and
  state are bitwise the same either way.

Scale: the loss is the MEAN per-sample loss; curvature directions come from
the method table :func:`iefcli.core.methods.compute_direction`, so ``damping``
and ``lr`` are on the PAPER's scale (the authors' code: damping added to the
Gram of the per-sample gradients of the MEAN loss). The step is theta <- theta - lr * d, then optionally clipped to
``clip_update_norm`` in L2 over all parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from iefcli.core.jacobian import Forward, default_forward
from iefcli.core.losses import Loss
from iefcli.core.methods import MethodOptions
from iefcli.core.params import ParamLayout, Params

State = dict[str, Any]


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser options (the recipe's ``optimizer`` section, resolved)."""

    name: str
    lr: float
    damping: float = 0.0
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    beta2_decay: float = -0.8
    dup_threshold: float | None = MethodOptions.dup_threshold
    jacobian: str = "auto"
    chunk_size: int | None = None
    mc_samples: int = MethodOptions.mc_samples
    cg_tol: float | None = MethodOptions.cg_tol
    cg_maxiter: int = MethodOptions.cg_maxiter
    clip_update_norm: float | None = None
    # The K-FAC family (iefcli.kfac.KFACOptions reads these by name; docs/kfac.md).
    fisher_type: str | None = None
    seq_mode: str = "expand"
    damping_split: str = "eigen"
    stat_interval: int = 1
    inv_interval: int = 10
    stat_decay: float = 0.95

    def method_options(self) -> MethodOptions:
        """The direction options of :mod:`iefcli.core.methods` this config sets."""
        return MethodOptions(dup_threshold=self.dup_threshold, mc_samples=self.mc_samples,
                             cg_tol=self.cg_tol, cg_maxiter=self.cg_maxiter)


def update_step(opt: Any, params: Params, state: State, batch: Any, *, key: int, lr: float,
                diagnostics: bool = True) -> tuple[Params, State, dict[str, Tensor]]:
    """``opt.update``, asking for the diagnostics only when ``diagnostics`` (the training loop: on
    logging steps); an ``update`` without a ``diagnostics`` keyword (the K-FAC family, a wrapper)
    always computes them."""
    if not diagnostics and _takes_diagnostics(opt.update):
        return opt.update(params, state, batch, key=key, lr=lr, diagnostics=False)
    return opt.update(params, state, batch, key=key, lr=lr)


def _takes_diagnostics(update: Callable) -> bool:
    code = getattr(getattr(update, "__func__", update), "__code__", None)
    return code is not None and "diagnostics" in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]


class Optimizer(Protocol):
    name: str
    config: OptimConfig

    def init(self, params: Params) -> State: ...

    def update(self, params: Params, state: State, batch: Any, *, key: int, lr: float) -> tuple[Params, State, dict[str, Tensor]]: ...


@dataclass
class ModelFn:
    """The model as the step sees it: module (holds frozen params and buffers), loss and forward."""

    model: nn.Module
    loss_fn: Loss
    forward: Forward = default_forward

    def mean_loss_and_grad(self, params: Params, inputs: Any, targets: Tensor) -> tuple[Tensor, Params]:
        """(mean loss, its gradient dict): one backward by ordinary autograd, no per-sample rows and no
        torch.func transform (the same backward a plain torch loop runs). An unused parameter gets zeros.

        With the default forward the module itself is called, its own trainable Parameters reading
        ``params`` for the call (``.data`` aliases, no copy, restored after; nothing writes to them):
        what a plain loop's ``model(x)`` costs, without functional_call's per-call module walk. Any
        other forward (or a name the module does not hold) gets leaf aliases and ``forward``."""
        held = self._held(params) if self.forward is default_forward else None
        if held is not None:
            saved = [h.data for h in held]
            try:
                for h, v in zip(held, params.values()):
                    h.data = v.detach()
                with torch.enable_grad():
                    out = _call(self.model, inputs)
                    loss = self.loss_fn.per_sample(out.logits if hasattr(out, "logits") else out, targets).mean()
                    grads = torch.autograd.grad(loss, held, allow_unused=True, materialize_grads=True)
            finally:
                for h, d in zip(held, saved):
                    h.data = d
            return loss.detach(), dict(zip(params, grads))
        live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            loss = self.loss_fn.per_sample(self.forward(self.model, live, inputs), targets).mean()
            grads = torch.autograd.grad(loss, list(live.values()), allow_unused=True, materialize_grads=True)
        return loss.detach(), dict(zip(live, grads))

    def _held(self, params: Params) -> list[nn.Parameter] | None:
        """The module's own trainable Parameters for ``params``' names, in order, when each matches its
        value's shape, dtype and device (else None: the functional path)."""
        named = getattr(self, "_named", None)
        if named is None or named[0] is not self.model:
            named = (self.model, dict(self.model.named_parameters()))
            self._named = named
        held = [named[1].get(k) for k in params]
        ok = all(h is not None and h.requires_grad and h.shape == v.shape and h.dtype == v.dtype
                 and h.device == v.device for h, v in zip(held, params.values()))
        return held if ok and len({id(h) for h in held}) == len(held) else None


def _call(model: nn.Module, inputs: Any) -> Any:
    """``model`` called on ``inputs`` as :func:`iefcli.core.jacobian.default_forward` calls it."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


_CHUNK = 1 << 20  # float64 temporaries of the norms / dots: at most this many numbers at a time


def _norm64(t: Tensor) -> Tensor:
    t = t.reshape(-1)
    sq = sum(torch.linalg.vector_norm(t[i : i + _CHUNK], dtype=torch.float64).square()
             for i in range(0, t.numel(), _CHUNK))
    return torch.sqrt(sq)


def _norm(t: Tensor) -> Tensor:
    """L2 norm of a tensor as a float64 0-d tensor: accumulated in the tensor's dtype (float32: no
    float64 copy), and only when that overflows (a huge but finite step) again in float64 over chunks,
    so a finite vector never reports an infinite norm. The overflow test reads one flag to the host."""
    if t.dtype == torch.float64:
        return torch.linalg.vector_norm(t)
    n = torch.linalg.vector_norm(t, dtype=torch.float32).to(torch.float64)
    if t.device.type == "cpu" and not bool(torch.isfinite(n)):
        return _norm64(t)
    return n


def _dot(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.reshape(-1), b.reshape(-1)
    if a.dtype == torch.float64 and b.dtype == torch.float64:
        return a @ b
    d = (a.float() @ b.float()).to(torch.float64)
    if a.device.type == "cpu" and not bool(torch.isfinite(d)):
        d = sum((a[i : i + _CHUNK].to(torch.float64) @ b[i : i + _CHUNK].to(torch.float64))
                for i in range(0, a.numel(), _CHUNK))
    return d


def momentum_and_decay(layout: ParamLayout, d: Tensor, params: Params, state: State,
                       cfg: OptimConfig) -> tuple[Tensor, Tensor, State]:
    """The shared head of a preconditioned step on flat (P,) vectors: heavy-ball momentum
    (buf <- momentum * buf + d; d <- buf), then decoupled weight decay (d <- d + wd * theta).
    Returns (d, theta, the new momentum state: {} without momentum)."""
    new_state: State = {}
    if cfg.momentum > 0:
        buf = cfg.momentum * layout.flatten(state["momentum"]) + d
        new_state["momentum"] = {k: v.clone() for k, v in layout.unflatten(buf).items()}
        d = buf
    theta = layout.flatten(params)
    if cfg.weight_decay > 0:
        d = d + cfg.weight_decay * theta
    return d, theta, new_state


def finish_step(
    layout: ParamLayout,
    old_flat: Tensor,
    new_flat: Tensor,
    grad_flat: Tensor | None,
    cfg: OptimConfig,
    metrics: dict[str, Tensor],
    *,
    grad_norm: Tensor | None = None,
    step_dot_grad: Tensor | None = None,
) -> tuple[Params, dict[str, Tensor]]:
    """Shared tail on flat (P,) vectors: optional update-norm clipping, update/gradient
    norms and their cosine; returns the new params dict (each tensor its own storage).

    ``grad_norm`` and ``step_dot_grad`` (<old - new, g> of the UNCLIPPED step), when the caller has
    them cheaper than g itself (e.g. from the Gram matrix), replace ``grad_flat`` (then None). With
    none of the three (no diagnostics wanted) only update_norm is reported.
    Norms and the dot are accumulated in the vectors' dtype (no float64 copies of P-vectors; float64
    over chunks only when float32 overflows) and reported as float64 0-d tensors. All on-device; no host reads.
    """
    step = old_flat - new_flat  # the applied update lr*d (+ decay)
    norm = _norm(step)
    scale = None
    if cfg.clip_update_norm is not None:
        scale = torch.clamp(cfg.clip_update_norm / norm.clamp_min(1e-300), max=1.0)
        step = step * scale.to(step.dtype)
        new_flat = old_flat - step
        metrics["update_clipped"] = scale < 1
        norm = _norm(step)
    metrics["update_norm"] = norm
    if grad_flat is not None or grad_norm is not None:
        if grad_flat is not None:
            gnorm, dot = _norm(grad_flat), _dot(step, grad_flat)
        else:
            gnorm, dot = grad_norm, step_dot_grad if scale is None else step_dot_grad * scale
        metrics["grad_norm"] = gnorm
        metrics["cos_update_grad"] = dot / (norm * gnorm).clamp_min(1e-300)
    return {k: v.clone() for k, v in layout.unflatten(new_flat).items()}, metrics


def _parts(parts: list[Tensor]) -> Tensor:
    """A list of 0-d per-tensor results -> one float64 vector (one stack when the dtypes agree)."""
    if len({p.dtype for p in parts}) == 1:
        return torch.stack(parts).to(torch.float64)
    return torch.stack([p.to(torch.float64) for p in parts])


def step_metrics(old: list[Tensor], new: list[Tensor], grads: list[Tensor] | None,
                 metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    """grad_norm, update_norm and cos_update_grad of an unclipped step, per tensor (float64 0-d
    results): :func:`finish_step`'s metrics without its flat copies; ``grads`` None: update_norm only.
    The per-tensor norms come from one foreach kernel each and the dots in the tensors' dtype, combined
    in float64; only when one of them overflows (a huge but finite step; on CPU one host read for all)
    again in float64 over chunks, as :func:`_norm` / :func:`_dot` do."""
    step = torch._foreach_sub(old, new)
    norm = torch.linalg.vector_norm(_parts(torch._foreach_norm(step)))
    if grads is None:
        if step and step[0].device.type == "cpu" and not bool(torch.isfinite(norm)):
            norm = torch.sqrt(sum(_norm(s).square() for s in step))
        metrics["update_norm"] = norm
        return metrics
    gnorm = torch.linalg.vector_norm(_parts(torch._foreach_norm(grads)))
    dot = _parts([torch.dot(s.reshape(-1), g.reshape(-1)) for s, g in zip(step, grads)]).sum()
    if step and step[0].device.type == "cpu" and not bool(torch.isfinite(torch.stack([norm, gnorm, dot])).all()):
        norm = torch.sqrt(sum(_norm(s).square() for s in step))
        gnorm = torch.sqrt(sum(_norm(g).square() for g in grads))
        dot = torch.stack([_dot(s.reshape(-1), g.reshape(-1)) for s, g in zip(step, grads)]).sum()
    metrics["grad_norm"] = gnorm
    metrics["update_norm"] = norm
    metrics["cos_update_grad"] = dot / (norm * gnorm).clamp_min(1e-300)
    return metrics


Factory = Callable[[OptimConfig, ModelFn], Optimizer]

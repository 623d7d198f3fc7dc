"""K-FAC, eK-FAC and ieK-FAC in the user's own training loop (docs/kfac.md, docs/library.md).

    pre = Preconditioner(model, method="iekfac", damping=1e-3)   # -> a KFACPreconditioner
    loss = pre.loss(model(x), y)      # the mean loss; records the logits and labels
    loss.backward()                   # the user's ordinary backward
    pre.step()                        # p.grad <- the K-FAC-family direction (paper scale)
    opt.step()                        # any torch.optim optimiser; or KFAC(model, ...) as one object

One capture layer: the drop-in preconditioner's hooks (:class:`iefcli.core.fast.rules.Layer` on every
module with a fast rule, :class:`iefcli.core.fast.rules.Call` on the others). For a layer with a K-FAC
rule (:func:`iefcli.kfac.capture.find_layers`: stock Linear, Conv2d, Embedding) the captured input X
and output gradient dL/dZ are put in K-FAC's linear form (:func:`iefcli.kfac.capture.linear_a` /
``linear_e``; dL/dZ divided by the loss's constant c, so e = dl_n/dz). Every other trainable parameter
takes K-FAC's diagonal fallback, its per-sample gradients taken from the fast path's blocks (a
LayerNorm's dense block, a replayed module's). Labels drawn for the factors (``fisher_type="sampled"``,
the default of kfac/ekfac) are pulled back while the recording's graph is alive, from a generator
seeded with ``seed + step`` (the registry optimiser's ``key`` of that step).

The curvature state and the direction are :func:`iefcli.kfac.optim.advance`, the same function the
registry optimisers (``ief train``) run: one batch in this loop gives the registry's direction, and the
same sequence of batches its trajectory (tested in float64).
"""

from __future__ import annotations

from dataclasses import asdict
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from iefcli.errors import ModelError
from iefcli.kfac import DEFAULTS
from iefcli.kfac.capture import find_layers, linear_a, linear_e
from iefcli.kfac.optim import (METHODS, Curvature, KFACOptions, _split_layer, advance, fisher_for, init_state,
                               options_from, schedule)
from iefcli.precond.optim import IEF
from iefcli.precond.preconditioner import Preconditioner

__all__ = ["KFACPreconditioner", "KFAC", "KFAC_METHODS"]

KFAC_METHODS = METHODS


def _fac_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class KFACPreconditioner(Preconditioner):
    """:class:`Preconditioner` for ``method`` in kfac / ekfac / iekfac (``Preconditioner(model,
    method="kfac", ...)`` builds one). ``pre.step()`` writes the K-FAC-family direction into ``.grad``.

    damping:  paper scale, added to the method's matrix exactly as in the registry optimisers
              (docs/kfac.md "What damping means"); default: ``iefcli.kfac.DEFAULTS[method]``.
    options:  :class:`iefcli.kfac.KFACOptions` (or any object with its field names); keyword
              arguments ``fisher_type``, ``seq_mode``, ``damping_split``, ``stat_interval``,
              ``inv_interval``, ``stat_decay`` override it.
    seed:     sampled labels of step k come from a generator seeded with ``seed + k``.

    Attributes: ``rules`` (the layers with a K-FAC rule), ``fallback`` ({parameter: why it takes the
    diagonal fallback}; nothing is printed), ``kfac_state`` (step, per-layer factors and bases, fallback
    diagonals; saved by :meth:`state_dict`), :meth:`describe` (one line per layer).
    """

    def __init__(self, model: nn.Module, method: str = "kfac", damping: float | None = None,
                 loss: Any = "cross_entropy", *, options: Any = None, seed: int = 0, keep_last_batch: bool = False,
                 distributed: bool | None = None, **kfac_options):
        if method not in METHODS:
            raise ModelError(f"method {method!r}: not a K-FAC method ({', '.join(METHODS)})")
        damping = DEFAULTS[method]["damping"] if damping is None else damping
        if not float(damping) >= 0:
            raise ModelError(f"damping {damping!r}: {method} needs damping >= 0 (0: the pseudo-inverse)")
        try:
            self.kfac_options = options_from(options, **kfac_options)
        except (TypeError, ValueError) as err:
            raise ModelError(f"{method} options: {err}") from None
        # The hooks, the loss recording and the fallback blocks are the drop-in preconditioner's.
        super().__init__(model, method="sgd", damping=0.0, loss=loss, seed=seed, keep_last_batch=keep_last_batch,
                         distributed=distributed)
        self.method, self.damping = method, float(damping)
        self.fisher_type = fisher_for(method, self.kfac_options)
        rules, fallback = find_layers(self._root, list(self.params))
        by_name = {layer.name: layer for layer in self._layers}
        for r in [r for r in rules if r.name not in by_name]:  # K-FAC rule, but captured whole: fallback
            rules.remove(r)
            for p in (r.weight, r.bias):
                if p is not None:
                    fallback[p] = "its module is replayed by the preconditioner"
        self.rules = rules
        self.fallback: dict[str, str] = fallback
        self._rule_layers = {r.name: by_name[r.name] for r in rules}
        self._fb_layers = [layer for layer in self._layers if layer.name not in self._rule_layers]
        self._fb_names = list(fallback)
        detached = {k: p.detach() for k, p in self.params.items()}
        self.kfac_state = init_state(method, rules, fallback, detached)
        self._step_gen: torch.Generator | None = None

    def describe(self) -> list[str]:
        """One line per layer: its K-FAC rule, or its diagonal fallback and why."""
        lines = [f"{r.name or '<root>'}: {r.kind}{' + bias' if r.bias else ''}" for r in self.rules]
        return lines + [f"{k}: diagonal fallback ({why})" for k, why in self.fallback.items()]

    # ---------------------------------------------------------------- recording

    def _record(self, logits: Tensor, targets: Tensor, known_c: float | None):
        loss_fn = super()._record(logits, targets, known_c)
        do_stats, do_inv = schedule(self.kfac_options, self.steps)
        if self.fisher_type == "sampled" and (do_stats or do_inv) and (self.rules or self._fb_names):
            self._draw_for_factors(logits, targets, loss_fn)
        return loss_fn

    def _draw_for_factors(self, logits: Tensor, targets: Tensor, loss_fn) -> None:
        """Labels from the model (the step's generator), pulled back to every captured output while the
        graph is alive: the output gradients the factors (and fallback diagonals) are built from."""
        if self._step_gen is None or self._step_gen.device != logits.device:
            self._step_gen = torch.Generator(device=logits.device).manual_seed(self.seed + self.steps)
        z = self._z(logits.detach())
        safe = torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
        yhat = loss_fn.sample(safe, targets, 1, self._step_gen)[0]
        u = loss_fn.logit_grad(z, yhat)
        caps = [c for c in [*self._layers, *self._calls] if c.out is not None]
        grads = {}
        if caps:
            with torch.enable_grad():
                gs = torch.autograd.grad(logits, [c.out for c in caps], u.to(logits.dtype), retain_graph=True,
                                         allow_unused=True)
            grads = {id(c): [torch.zeros_like(c.out) if g is None else g.detach()] for c, g in zip(caps, gs)}
        for c in caps:  # the tensor hooks saw this pull-back; the user's backward sets them again
            c.grad = None
        self._gz = None
        self._sampled = (u.unsqueeze(0), grads)

    # ---------------------------------------------------------------- the step

    def _take(self) -> dict[str, Any]:
        """The recorded (micro-)batch in K-FAC's terms, then a fresh record: n, s, losses, each rule
        layer's a / e_true / e_fac, the fallback parameters' per-sample gradients (true, fac labels)."""
        self._check_recorded()
        logits, targets, loss_fn = self._logits.detach(), self._targets, self._loss_fn
        n = logits.shape[0]
        z = self._z(logits)
        lg = loss_fn.logit_grad(z, targets)
        c, loss_scale = self._scale(lg, n)
        fdt = _fac_dtype(self._dtype)
        sampled = self._sampled[1] if self._sampled is not None else None
        a, e_true, e_fac = {}, {}, {}
        for r in self.rules:
            layer = self._rule_layers[r.name]
            if layer.calls == 0:
                self._unused(layer)
                raise self._refuse(layer.name, layer.module, "not called in this forward (K-FAC needs its input)")
            self._check_layer(layer, n)
            a[r.name] = linear_a(r, layer.module, layer.x, fdt)
            grad = torch.zeros_like(layer.out) if layer.grad is None else layer.grad
            e_true[r.name] = linear_e(r, grad, fdt, 1.0 / c)
            if sampled is not None:
                e_fac[r.name] = linear_e(r, sampled[id(layer)][0], fdt)
        fb_true, fb_fac = self._fallback_rows(n, c, fdt)
        part = dict(n=n, s=lg.reshape(n, -1).pow(2).sum(dim=1), loss=loss_fn.per_sample(z, targets).detach(),
                    a=a, e_true=e_true, e_fac=e_fac if sampled is not None else e_true, fb_true=fb_true,
                    fb_fac=fb_fac if sampled is not None else fb_true, c=c, loss_scale=loss_scale)
        self._clear()
        for cap in [*self._layers, *self._calls]:
            cap.reset()  # the captured activations are not needed any more
        return part

    def _fallback_rows(self, n: int, c: float, fdt: torch.dtype) -> tuple[dict, dict]:
        """Per-sample gradients (N, *shape) of the fallback parameters, from the fast path's blocks of
        the modules holding them (true labels; and sampled labels when they were drawn)."""
        if not self._fb_names:
            return {}, {}
        shapes = dict(zip(self.layout.names, self.layout.shapes))
        kept = self._layers
        self._layers = self._fb_layers  # the parent's block builder, over the fallback modules only
        try:
            blocks, sampled_blocks = self._blocks(n, c)
        finally:
            self._layers = kept

        def rows(bs) -> dict[str, Tensor]:
            out = {}
            for b in bs:
                mat, i = b.matrix(), 0
                for name in b.names:
                    size = shapes[name].numel()
                    out[name] = mat[:, i:i + size].reshape(n, *shapes[name]).to(fdt)
                    i += size
            return {k: out[k] if k in out else torch.zeros(n, *shapes[k], dtype=fdt) for k in self._fb_names}

        return rows(blocks), (rows(sampled_blocks) if sampled_blocks else {})

    def _curvature(self, parts: list[dict]) -> Curvature:
        """One Curvature over the kept micro-batches (exactly the batch holding them all)."""
        cat = (lambda key: {k: torch.cat([p[key][k] for p in parts]) for k in parts[0][key]}) if len(parts) > 1 \
            else (lambda key: parts[0][key])
        if len(parts) > 1:
            for key in ("a", "e_true", "e_fac"):
                for k in parts[0][key]:
                    if len({p[key][k].shape[1:] for p in parts}) > 1:
                        raise ModelError(f"accumulate(): layer {k} saw inputs of different lengths in the micro-"
                                         "batches (e.g. padding to each micro-batch's longest sequence); K-FAC's "
                                         "factors over them are not those of one batch: pad every micro-batch to "
                                         "the same length")
        a, e_true, e_fac = cat("a"), cat("e_true"), cat("e_fac")
        fb_true, fb_fac = cat("fb_true"), cat("fb_fac")
        n = sum(p["n"] for p in parts)
        shapes = dict(zip(self.layout.names, self.layout.shapes))
        grads: dict[str, Tensor] = {}
        for r in self.rules:
            g = torch.einsum("nto,nti->oi", e_true[r.name], a[r.name]) / n  # the layer's mean-loss gradient
            grads.update(_split_layer(r, g, shapes, self._dtype))
        for k in self._fb_names:
            grads[k] = fb_true[k].mean(dim=0).to(self._dtype)
        return Curvature.of(rules=self.rules, fallback=self._fb_names, n=n,
                            s=torch.cat([p["s"] for p in parts]), loss=torch.cat([p["loss"] for p in parts]),
                            grads=grads, a=a, e_true=e_true, e_fac=e_fac, fb_true=fb_true, fb_fac=fb_fac)

    def _refuse_distributed(self) -> None:
        import torch.distributed as dist

        on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.distributed or (self.distributed is None and on):
            raise ModelError(f"{self.method} in the preconditioner is single-process (its factors would be "
                             "each rank's own); under torch.distributed use ief / ef, or ief train --nproc")

    def accumulate(self) -> int:
        """Keep the micro-batch just recorded (after its ``loss.backward()``); the next :meth:`step` builds
        the factors and the direction over all kept micro-batches, as one batch holding them all (with
        sampled labels: the same distribution, not the same draws). Returns the number kept."""
        self._refuse_distributed()
        self._parts.append(self._take())
        return len(self._parts)

    def step(self) -> dict[str, Tensor]:
        """Write the direction into ``.grad`` of every trainable parameter and advance the curvature
        state; return ``loss`` (the mean per-sample loss) and ``stat_step`` / ``inv_step`` (0-d tensors)."""
        self._refuse_distributed()
        if self._logits is not None or not self._parts:
            if self._logits is None:
                raise ModelError("pre.step(): no loss was recorded since the last forward: call pre.loss(logits, "
                                 "targets) (or pre.watch_loss) and loss.backward() first")
            self._parts.append(self._take())
        parts, self._parts = self._parts, []
        self._step_gen = None
        curv = self._curvature(parts)
        flat_g = self.layout.flatten(curv.grads)
        try:
            for p in parts:
                if p["loss_scale"] != 1.0:
                    self._check_unscaled(SimpleNamespace(g=flat_g, n=curv.n), p["c"] / p["loss_scale"],
                                         p["loss_scale"])
        except ModelError:
            self._parts = parts  # kept: unscale .grad and call step() again
            raise
        step = self.steps
        layers, fbd, d = advance(self.method, self.kfac_options, self.rules, self._fb_names, self.kfac_state, curv,
                                 step, self.damping)
        self.kfac_state = {"step": torch.tensor(step + 1, dtype=torch.int64), "layers": layers, "fallback": fbd}
        self._write(self.layout.flatten(d), curv)
        do_stats, do_inv = schedule(self.kfac_options, step)
        dev = curv.loss.device
        return {"loss": curv.loss.mean(), "stat_step": torch.tensor(do_stats, device=dev),
                "inv_step": torch.tensor(do_inv, device=dev)}

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The parent's (method, damping, seed, steps) plus ``kfac`` (the curvature state: nested dicts
        of tensors) and ``kfac_options``."""
        state = super().state_dict()
        state["kfac"] = _tree_clone(self.kfac_state)
        state["kfac_options"] = asdict(self.kfac_options)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method", self.method) != self.method:
            raise ModelError(f"state of a {state['method']} preconditioner cannot be loaded into {self.method}")
        super().load_state_dict(state)
        if "kfac" in state:
            dev = next(iter(self.params.values())).device
            self.kfac_state = _tree_clone(state["kfac"], dev)
        if "kfac_options" in state:
            self.kfac_options = KFACOptions(**state["kfac_options"])
            self.fisher_type = fisher_for(self.method, self.kfac_options)

    def __repr__(self) -> str:
        return (f"KFACPreconditioner(method={self.method!r}, damping={self.damping:g}, layers={len(self.rules)}, "
                f"fallback={len(self.fallback)}, params={self.layout.size})")


def _tree_clone(tree: Any, device: torch.device | None = None) -> Any:
    if isinstance(tree, dict):
        return {k: _tree_clone(v, device) for k, v in tree.items()}
    if isinstance(tree, Tensor):
        return tree.detach().clone() if device is None or tree.dim() == 0 else tree.detach().to(device, copy=True)
    return tree


class KFAC(IEF):
    """kfac / ekfac / iekfac as a ``torch.optim.Optimizer``: :class:`IEF`'s update (direction ->
    momentum -> decoupled weight decay -> p -= lr d; parameter groups, schedulers, ``state_dict``)
    over a :class:`KFACPreconditioner`, with the K-FAC family's default lr and damping
    (``iefcli.kfac.DEFAULTS``; paper scale) and its options as keywords
    (``KFAC(model, method="iekfac", inv_interval=5)``). ``IEF(model, method="kfac", ...)`` is the
    same optimiser with IEF's defaults (lr 50, damping 1e-7: pass K-FAC's own)."""

    def __init__(self, model: nn.Module, lr: float | None = None, damping: float | None = None, *,
                 method: str = "kfac", momentum: float = 0.0, weight_decay: float = 0.0, loss: Any = "cross_entropy",
                 params: Any = None, seed: int = 0, options: Any = None, **kfac_options):
        if method not in METHODS:
            raise ModelError(f"KFAC: method {method!r} is not one of {', '.join(METHODS)} (iEF: iefcli.IEF)")
        try:
            opts = options_from(options, **kfac_options)
        except (TypeError, ValueError) as err:
            raise ModelError(f"{method} options: {err}") from None
        super().__init__(model, lr=DEFAULTS[method]["lr"] if lr is None else lr,
                         damping=DEFAULTS[method]["damping"] if damping is None else damping, method=method,
                         momentum=momentum, weight_decay=weight_decay, loss=loss, params=params, options=opts,
                         seed=seed)

"""iEF (and EF, SF) in the user's own training loop: module hooks + the fast path's blocks.

    pre = Preconditioner(model, method="ief", damping=1e-7)   # paper-scale damping
    logits = model(x)
    loss = pre.loss(logits, y)     # the mean of the per-sample losses; records logits and labels
    loss.backward()                # the user's ordinary backward
    info = pre.step()              # p.grad <- the direction, for every trainable p
    opt.step()                     # any torch.optim optimiser (lr 50 for the paper's iEF runs)

What happens, per step (no second forward, no N x P tensor):
1. The model's forward (a pre-hook on the model starts a fresh record) runs the
   fast path's CAPTURE layer (:class:`iefcli.core.fast.rules.Layer`) on every
   module with a rule (Linear, Conv2d, LayerNorm, Embedding): its input X is
   kept, and a tensor hook on its output will keep dL/dZ from the backward.
   Modules holding trainable parameters WITHOUT a rule are captured whole
   (:class:`iefcli.core.fast.rules.Call`: their arguments) for the per-module
   fallback.
2. ``pre.loss(logits, y)`` (or ``pre.watch_loss`` beside the user's own loss)
   records the logits, the labels and a hook on the logits' gradient.
3. The user's ``loss.backward()`` fills the hooks: E = dL/dZ per layer, and
   dL/dz at the logits. If L = c * sum_n l_n (any constant reduction, any
   loss scale), dL/dz = c * dl_n/dz_n: c is read from the logits' gradient
   (and checked: a loss that is not of that form is refused), and E / c are
   the output gradients of the per-sample losses, i.e. the fast path's E.
4. ``pre.step()`` builds the same blocks as :class:`iefcli.core.fast.FastJacobian`
   (:func:`iefcli.core.fast.blocks.make_block`; fallback modules are replayed
   per sample by :func:`iefcli.core.fast.blocks.replay_block`), wraps them
   in a BatchGrads, asks the ONE method table
   (:func:`iefcli.core.methods.compute_direction`, paper-scale damping and
   direction) and writes the direction into ``.grad``.

SF draws its labels when the loss is recorded (the graph is still alive
then): K extra backward passes to the hooked layers, from a generator whose
state is saved, so the table's own draw at step time sees the same labels.

Refused, with one line naming the module and the remedy: batch norm in train
mode (batch statistics couple the samples), ``torch.compile(fullgraph=True)``
(the hooks have side effects), recurrent modules, tied parameters, a module
called more than once per forward or with an input whose leading dim is not
the batch, a parameter used outside its module, active dropout inside a
replayed (fallback) module, and ``ngd`` (needs forward-mode passes through the
model: use ``ief train`` or :func:`iefcli.core.batch_grads`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from iefcli.core.fast.blocks import compute_dtype, make_block, replay_block
from iefcli.core.fast.rows import FastRows
from iefcli.core.fast.rules import Call, Layer, leaf_uses, plan_layers, train_mode_batchnorm, translate_func_error
from iefcli.core.jacobian import BatchGrads
from iefcli.core.params import ParamLayout
from iefcli.errors import ModelError
from iefcli.precond.losses import resolve_loss

__all__ = ["Preconditioner", "SUPPORTED_METHODS"]

SUPPORTED_METHODS = ("ief", "ef", "sf", "sgd")
"""Methods of the table that the hooks can serve (ngd needs forward-mode passes through the model)."""

# |dL/dz - c * dl/dz| / |dL/dz| above this: the user's loss is not c * sum_n l_n (refused).
_PROPORTIONAL_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}
_LOW_PRECISION_TOL = 3e-2


def _root_module(model: nn.Module) -> nn.Module:
    """The module to hook: a torch.compile wrapper's original module (hooks on it run inside the
    compiled call, with graph breaks), after refusing fullgraph compilation."""
    ctx = getattr(model, "dynamo_ctx", None)
    if ctx is not None and (getattr(ctx, "fullgraph", False) or getattr(ctx, "error_on_graph_break", False)):
        raise ModelError("torch.compile(..., fullgraph=True) cannot run the preconditioner's hooks (they have side "
                         "effects, so dynamo must break the graph there): compile with fullgraph=False (the default)")
    inner = getattr(model, "_orig_mod", model)
    if isinstance(inner, nn.parallel.DistributedDataParallel):  # hook the wrapped model (iefcli.dist)
        inner = inner.module
    return inner


class _HookJacobian:
    """What the method table may ask of ``bg.jac`` here: ``logits``, ``layout`` and, for SF, the rows
    of the sampled-label cotangents that were computed while the graph was alive."""

    def __init__(self, logits: Tensor, layout: ParamLayout, sampled: tuple[Tensor, FastRows] | None):
        self.logits, self.layout, self._sampled = logits, layout, sampled

    def rows(self, cotangents: Tensor) -> FastRows:
        if self._sampled is not None:
            u, rows = self._sampled
            if u.shape == cotangents.shape and torch.equal(u, cotangents.to(u.dtype)):
                return rows
        raise ModelError("the preconditioner can only give rows for the labels it drew when the loss was recorded "
                         "(the graph is gone after backward); use iefcli.core.batch_grads for other cotangents")

    def vjp(self, cotangent: Tensor) -> Tensor:
        raise ModelError("this method needs products through the model (ngd); the preconditioner serves "
                         + ", ".join(SUPPORTED_METHODS))

    jvp = vjp


class Preconditioner:
    """Turns ``.grad`` into the iEF / EF / SF direction after the user's own ``loss.backward()``.

    model:     the nn.Module (or its torch.compile wrapper); its parameters with requires_grad
               at construction are the trainable ones (theta).
    method:    "ief" (default), "ef", "sf" (or "sgd": the mean gradient itself), from
               :data:`iefcli.core.methods.METHODS`.
    damping:   on the PAPER's scale (the authors' code; see docs/library.md): iEF at 1e-7 here
               is the authors' iEF at 1e-7; lr 50 is their learning rate.
    loss:      see :mod:`iefcli.precond.losses` (names, torch modules and functions, project losses).
    options:   :class:`iefcli.core.methods.MethodOptions` (dup_threshold, mc_samples, ...).
    seed:      SF's label draws (a generator of its own; saved by :meth:`state_dict`).
    keep_last_batch: keep the last step's BatchGrads in ``last_batch`` (rows, s, losses; it holds
               the captured activations until the next step, so it is off by default).
    """

    def __new__(cls, *args, **kwargs):
        """``method`` kfac / ekfac / iekfac gives an :class:`iefcli.precond.kfac.KFACPreconditioner`."""
        method = kwargs.get("method", args[1] if len(args) > 1 else None)
        if cls is Preconditioner and isinstance(method, str) and method in ("kfac", "ekfac", "iekfac"):
            from iefcli.precond.kfac import KFACPreconditioner

            return super().__new__(KFACPreconditioner)
        return super().__new__(cls)

    def __init__(self, model: nn.Module, method: str = "ief", damping: float = 1e-7, loss: Any = "cross_entropy",
                 *, options: Any = None, seed: int = 0, keep_last_batch: bool = False,
                 distributed: bool | None = None):
        from iefcli.core.methods import METHODS, MethodOptions

        if method not in METHODS:
            raise ModelError(f"method {method!r}: unknown; the preconditioner serves {', '.join(SUPPORTED_METHODS)}")
        if method not in SUPPORTED_METHODS:
            raise ModelError(f"method {method!r} needs forward-mode products through the model, which a hook on "
                             f"the user's backward cannot give; use {', '.join(SUPPORTED_METHODS)}, or ief train / "
                             "iefcli.core.batch_grads for it")
        if not float(damping) >= 0 or (METHODS[method].needs_damping and not float(damping) > 0):
            raise ModelError(f"damping {damping!r}: {method} needs damping "
                             f"{'> 0' if METHODS[method].needs_damping else '>= 0'}")
        self.method, self.damping = method, float(damping)
        self.options = options if options is not None else MethodOptions()
        self.loss_spec = resolve_loss(loss)
        self.model = model
        root = _root_module(model)
        self._root = root
        self.params: dict[str, nn.Parameter] = {n: p for n, p in root.named_parameters() if p.requires_grad}
        if not self.params:
            raise ModelError("the model has no trainable parameters (requires_grad=True)")
        self.layout = ParamLayout.of(self.params)
        self._dtype = next(iter(self.params.values())).dtype
        self.seed = int(seed)
        self._gen: torch.Generator | None = None
        self._gen_state: Tensor | None = None  # set by load_state_dict before the generator exists
        self.steps = 0
        self.keep_last_batch = keep_last_batch
        self.last_batch: BatchGrads | None = None
        self.distributed = distributed  # None: when torch.distributed is initialised with > 1 process
        self._parts: list = []  # micro-batches kept by accumulate()
        self.comm = None  # iefcli.dist.comm.Comm, on the first step

        layers, reasons = plan_layers(root, self.params)
        modules = dict(root.named_modules(remove_duplicate=False))
        by_module: dict[str, dict[str, str]] = {}
        for pname, reason in reasons.items():
            mod_name, _, attr = pname.rpartition(".")
            if "shared with another module" in reason or _aliased(root, self.params[pname]):
                raise ModelError(f"parameter {pname} is shared by several modules (tied weights): its per-sample "
                                 "gradient cannot be split per module; untie it, freeze it, or use "
                                 "iefcli.core.batch_grads(jacobian='vmap')")
            by_module.setdefault(mod_name, {})[attr] = pname
        calls = []
        for mod_name, roles in by_module.items():
            module = modules[mod_name]
            if isinstance(module, nn.RNNBase):
                raise ModelError(f"module {mod_name or type(root).__name__} ({type(module).__name__}) has no fast rule "
                                 "and cannot be replayed per sample: freeze it, or use iefcli.core.batch_grads")
            calls.append(Call(mod_name, module, roles))
        for layer in layers:
            layer.capture_grad = True
        self._layers: list[Layer] = layers
        self._calls: list[Call] = calls
        self.param_paths = {p: layer.kind for layer in layers for p in layer.roles.values()}
        self.param_paths.update({p: "replay" for c in calls for p in c.roles.values()})
        self.fallback_reasons = dict(reasons)
        self._handles = [root.register_forward_pre_hook(self._begin, with_kwargs=True)]
        for cap in [*layers, *calls]:
            self._handles.append(cap.module.register_forward_hook(cap.hook, with_kwargs=True))
        self._watch_key: str | None = None
        self._clear()

    # ---------------------------------------------------------------- recording

    def _clear(self) -> None:
        self._recording = False
        self._logits: Tensor | None = None
        self._targets: Tensor | None = None
        self._gz: Tensor | None = None
        self._uses: dict[int, int] = {}
        self._known_c: float | None = None
        self._sampled: tuple[Tensor, list[list[Tensor]]] | None = None
        self._sf_state: Tensor | None = None

    def _set_enabled(self, on: bool) -> None:
        for cap in [*self._layers, *self._calls]:
            cap.enabled = on

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the model: a forward with gradients starts a fresh record."""
        if getattr(self, "_replaying", False):
            return
        if not torch.is_grad_enabled():
            self._set_enabled(False)
            return
        where = train_mode_batchnorm(self._root)
        if where is not None:
            raise ModelError(f"batch norm {where} is in train mode: its batch statistics couple the samples, so "
                             "per-sample gradients (and iEF) are not defined; put it in eval mode or use GroupNorm/LayerNorm")
        self._clear()
        for cap in [*self._layers, *self._calls]:
            cap.reset()
        self._set_enabled(True)
        self._recording = True

    def _keep_gz(self, grad: Tensor) -> None:
        self._gz = grad.detach()

    def watch_outputs(self, labels_key: str = "labels") -> None:
        """Record the logits and labels from every forward by itself (Hugging Face style: the model is
        called with ``labels=`` and returns an output with ``.logits``, and computes its own loss)."""
        self._watch_key = labels_key
        self._handles.append(self._root.register_forward_hook(self._watch_hook, with_kwargs=True))

    def _watch_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._recording or getattr(self, "_replaying", False):
            return
        targets = kwargs.get(self._watch_key)
        if targets is None:
            return  # a forward without labels (e.g. generation): nothing to precondition
        logits = output.logits if hasattr(output, "logits") else output
        self.watch_loss(logits, targets)

    def watch_loss(self, logits: Tensor, targets: Tensor) -> None:
        """Record ``logits`` (in the graph) and ``targets`` for the next step; the user computes
        and backpropagates their own loss, which must be c * sum_n l_n for a constant c."""
        self._record(logits, targets, known_c=None)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Record like :meth:`watch_loss` and return the mean of the per-sample losses, (1/N) sum_n l_n
        (for token CE: l_n sums sample n's tokens), computed in float32 or above."""
        n = logits.shape[0]
        loss_fn = self._record(logits, targets, known_c=1.0 / n)
        z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        return loss_fn.per_sample(z, targets).mean()

    def _record(self, logits: Tensor, targets: Tensor, known_c: float | None):
        if not self._recording:
            raise ModelError("no forward of the model was recorded before the loss: call the model with gradients "
                             "enabled (not under torch.no_grad), and not compiled with fullgraph=True")
        if not isinstance(logits, Tensor) or not logits.requires_grad:
            raise ModelError("the logits do not require grad: compute them with gradients enabled")
        loss_fn = self.loss_spec.for_logits(logits.dim(), targets.dim())
        self._logits, self._targets, self._known_c, self._loss_fn = logits, targets, known_c, loss_fn
        logits.register_hook(self._keep_gz)
        self._uses = leaf_uses(logits, self.params)
        if self.method == "sf":
            self._draw_sampled(logits, targets, loss_fn)
        return loss_fn

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device).manual_seed(self.seed)
            if self._gen_state is not None:
                self._gen.set_state(self._gen_state)
                self._gen_state = None
        return self._gen

    def _draw_sampled(self, logits: Tensor, targets: Tensor, loss_fn) -> None:
        """SF: draw the labels now (the table redraws the same ones at step time from the saved
        state) and pull their cotangents back to every captured output while the graph is alive."""
        gen = self._generator(logits.device)
        self._sf_state = gen.get_state()
        k = self.options.mc_samples
        z = self._z(logits.detach())
        safe = torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
        yhat = loss_fn.sample(safe, targets, k, gen)
        zz = safe.unsqueeze(0).expand(k, *safe.shape)
        u = torch.stack([loss_fn.logit_grad(zz[i], yhat[i]) for i in range(k)]) / math.sqrt(k)
        caps = [c for c in [*self._layers, *self._calls] if c.out is not None]
        grads: list[list[Tensor]] = [[] for _ in caps]
        if caps:
            with torch.enable_grad():
                for i in range(k):
                    gs = torch.autograd.grad(logits, [c.out for c in caps], u[i].to(logits.dtype),
                                             retain_graph=True, allow_unused=True)
                    for j, g in enumerate(gs):
                        grads[j].append(torch.zeros_like(caps[j].out) if g is None else g.detach())
        self._sampled = (u, {id(c): gs for c, gs in zip(caps, grads)})

    def _z(self, z: Tensor) -> Tensor:
        """Logits in the dtype the closed-form loss maths runs in (float32 for bf16/fp16 logits)."""
        return z if z.dtype in (torch.float32, torch.float64) else z.float()

    # ---------------------------------------------------------------- the step

    def _refuse(self, name: str, module: nn.Module, reason: str) -> ModelError:
        return ModelError(f"module {name or type(module).__name__} ({type(module).__name__}): {reason}; the "
                          "preconditioner needs each trainable module called once per forward on batch-first "
                          "inputs: freeze it, or use iefcli.core.batch_grads for this model")

    def _scale(self, lg: Tensor, n: int) -> tuple[float, float]:
        """(c, loss_scale): the user's loss is c * sum_n l_n (c includes any loss scale)."""
        gz = self._gz.to(torch.float64)
        lg64 = lg.to(torch.float64)
        den = float((lg64 * lg64).sum())
        if den == 0.0:
            return (self._known_c or 1.0 / n), 1.0
        c_fit = float((gz * lg64).sum()) / den
        resid = float(torch.linalg.vector_norm(gz - c_fit * lg64)) / max(float(torch.linalg.vector_norm(gz)), 1e-300)
        tol = _PROPORTIONAL_TOL.get(self._logits.dtype, _LOW_PRECISION_TOL)
        if self._gz.dtype != lg.dtype and self._gz.dtype not in (torch.float32, torch.float64):
            tol = _LOW_PRECISION_TOL
        if not resid <= tol:
            raise ModelError(f"the loss that was backpropagated is not a constant multiple of the sum of per-sample "
                             f"{self._loss_fn.name} losses (relative mismatch {resid:.2g} at the logits: label "
                             "smoothing, class weights, a per-sample mean of token losses, shifted labels?); "
                             "use pre.loss(logits, targets), or pass the matching loss=")
        if self._known_c is not None:
            bases = [self._known_c]
        else:
            bases = [1.0 / n, 1.0]
            if self._targets is not None and self._loss_fn.name == "token_cross_entropy":
                valid = int((self._targets != self._loss_fn.ignore_index).sum())
                bases.insert(0, 1.0 / max(valid, 1))
            if self._loss_fn.name == "mse":
                bases.insert(0, 2.0 / self._logits.numel())
        snap = max(tol, 1e-6) * 10
        for base in bases:
            r = c_fit / base
            if r > 0:
                k = round(math.log2(r))
                if abs(r / 2.0 ** k - 1.0) < snap:
                    return base * 2.0 ** k, 2.0 ** k
        return c_fit, 1.0

    def _write(self, d: Tensor, bg) -> None:
        """p.grad <- the direction's part for every trainable p (in p's dtype); count the step."""
        for name, part in self.layout.unflatten(d).items():
            p = self.params[name]
            part = part.to(p.dtype)
            if p.grad is None:
                p.grad = part.clone()
            else:
                p.grad.copy_(part)
        self.steps += 1
        self.last_batch = bg if self.keep_last_batch else None

    def step(self) -> dict[str, Tensor]:
        """Write the direction into ``.grad`` of every trainable parameter; return the diagnostics
        (0-d tensors: the table's solve diagnostics and ``loss``, the mean per-sample loss)."""
        from iefcli.core.methods import compute_direction

        if self._parts and self._logits is None:  # every micro-batch already kept by accumulate()
            return self._step_global(self._comm(self._parts[0][2].device))
        self._check_recorded("pre.step(): ")
        comm = self._comm(self._logits.device)
        if self._parts or comm.distributed:
            return self._step_global(comm)
        logits, targets, loss_fn = self._logits.detach(), self._targets, self._loss_fn
        n = logits.shape[0]
        z = self._z(logits)
        lg = loss_fn.logit_grad(z, targets)
        c, loss_scale = self._scale(lg, n)
        blocks, sampled_blocks = self._blocks(n, c)
        rows = FastRows(blocks, None, None, self.layout, n, self._dtype, logits.device)
        sampled = None
        if self._sampled is not None:
            u = self._sampled[0]
            sampled = (u, FastRows(sampled_blocks, None, None, self.layout, u.shape[0] * n, self._dtype,
                                   logits.device))
        bg = BatchGrads(loss=loss_fn.per_sample(z, targets), logits=z, logit_grads=lg,
                        s=lg.reshape(n, -1).pow(2).sum(dim=1), rows=rows,
                        jac=_HookJacobian(z, self.layout, sampled), targets=targets, loss_fn=loss_fn)
        gen = None
        if self._sf_state is not None:
            gen = torch.Generator(device=logits.device)
            gen.set_state(self._sf_state)
        if loss_scale != 1.0:
            self._check_unscaled(bg, c / loss_scale, loss_scale)
        d, info = compute_direction(self.method, bg, self.damping, generator=gen, options=self.options)
        self._write(d, bg)
        self._clear()
        for cap in [*self._layers, *self._calls]:
            cap.reset()  # the captured activations are not needed any more
        return {"loss": bg.loss.mean().detach(), **info}

    # ---------------------------------------------------------------- micro-batches and ranks (iefcli.dist)

    def accumulate(self) -> int:
        """Keep the micro-batch just recorded (call it after that micro-batch's ``loss.backward()``)
        for the next :meth:`step`, which then solves over ALL kept micro-batches (and, under
        torch.distributed, all ranks' batches) at once: exactly the step of one batch holding
        them all. Only the fast path's factors are kept (layer inputs and output gradients),
        never P-sized rows. Returns the number of micro-batches kept."""
        if self.method == "sf":
            raise ModelError("accumulate(): sf draws its labels per recorded batch, so micro-batches would not "
                             "equal one batch; use ief or ef (or iefcli's ief train with train.accumulate for sf)")
        self._check_recorded()
        self._parts.append(self._take_part())
        return len(self._parts)

    def _comm(self, device: torch.device):
        from iefcli.dist.comm import Comm

        if self.comm is None:
            import torch.distributed as dist

            on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            if self.distributed and not on:
                raise ModelError("distributed=True but torch.distributed is not initialised with more than one "
                                 "process (run under torchrun and call init_process_group first)")
            use = on if self.distributed is None else bool(self.distributed)
            self.comm = Comm(dist.get_rank(), dist.get_world_size(), device=device) if use else Comm.local()
        return self.comm

    def _check_recorded(self, where: str = "") -> None:
        """One line when no loss was recorded, or the backward did not reach the logits (``where``:
        the calling method, e.g. "pre.step(): ")."""
        if self._logits is None:
            raise ModelError(f"{where}no loss was recorded since the last forward: call pre.loss(logits, targets) "
                             "(or pre.watch_loss) and loss.backward() first")
        if self._gz is None:
            raise ModelError(f"{where}the backward did not reach the logits: call loss.backward() on a loss "
                             "computed from the recorded logits first")

    def _take_part(self):
        """The recorded micro-batch as (Piece, per-sample tensors), then a fresh record."""
        from iefcli.dist.rows import Piece, compact_block, compactable

        logits, targets, loss_fn = self._logits.detach(), self._targets, self._loss_fn
        n = logits.shape[0]
        z = self._z(logits)
        lg = loss_fn.logit_grad(z, targets)
        c, _ = self._scale(lg, n)
        blocks, _ = self._blocks(n, c)
        # sequence layers whose per-sample gradients are smaller than X and E are kept as those (exact)
        blocks = [compact_block(b) if compactable(b) else b for b in blocks]
        rows = FastRows(blocks, None, None, self.layout, n, self._dtype, logits.device)
        part = (Piece(rows, n), loss_fn.per_sample(z, targets).detach(), z, lg, targets, loss_fn)
        self._clear()
        for cap in [*self._layers, *self._calls]:
            cap.reset()
        return part

    def _step_global(self, comm) -> dict[str, Tensor]:
        """The step over the kept micro-batches and every rank's batch (iefcli.dist.rows.ShardedRows)."""
        from iefcli.core.methods import compute_direction
        from iefcli.dist.rows import shard_rows

        if self.method == "sf":
            raise ModelError("sf in the preconditioner across ranks or micro-batches is not supported (its label "
                             "draws are per recorded batch); use ief or ef, or iefcli's ief train for sf")
        if self._logits is not None:
            self._check_recorded()
            self._parts.append(self._take_part())
        parts, self._parts = self._parts, []
        cat = lambda i: torch.cat([p[i] for p in parts]).unsqueeze(0)  # noqa: E731
        extra, pieces, loss_fn = [cat(1), cat(2), cat(3), cat(4)], [p[0] for p in parts], parts[0][5]
        del parts  # each micro-batch's factors go as shard_rows copies them
        rows, (loss, z, lg, y) = shard_rows(pieces, 1, comm, extra=extra)
        loss, z, lg, y = loss[0], z[0], lg[0], y[0]
        n = loss.shape[0]
        bg = BatchGrads(loss=loss, logits=z, logit_grads=lg, s=lg.reshape(n, -1).pow(2).sum(dim=1), rows=rows,
                        jac=_HookJacobian(z, self.layout, None), targets=y, loss_fn=loss_fn)
        d, info = compute_direction(self.method, bg, self.damping, options=self.options)
        self._write(d, bg)
        return {"loss": bg.loss.mean().detach(), **info}

    def _check_layer(self, layer: Layer, n: int) -> None:
        """Refuse (one line) a rule layer whose parameters are used outside it, or whose
        captured input does not have the batch as its leading dim."""
        reasons = layer.validate(self._uses, self.params)
        if layer.x is not None and (layer.x.dim() == 0 or layer.x.shape[0] != n):
            reasons = {p: r or "its input's leading dim is not the batch" for p, r in reasons.items()}
        bad = next((r for r in reasons.values() if r), "")
        if bad:
            raise self._refuse(layer.name, layer.module, bad)

    def _blocks(self, n: int, c: float):
        """The blocks of the recorded batch: rule layers from their captured X and E / c, replayed
        modules from their arguments; and, for SF, the same from the sampled-label output gradients."""
        shapes = dict(zip(self.layout.names, self.layout.shapes))
        cdt = compute_dtype(self._dtype)
        blocks, sampled_blocks = [], []
        for layer in self._layers:
            if layer.calls == 0:
                self._unused(layer)
                continue
            self._check_layer(layer, n)
            e = torch.zeros_like(layer.out) if layer.grad is None else layer.grad
            blocks.append(make_block(layer, [e.to(cdt) / c], shapes, cdt))
            if self._sampled is not None:
                sampled_blocks.append(make_block(layer, self._sampled[1][id(layer)], shapes, cdt))
        for call in self._calls:
            if call.calls == 0:
                self._unused(call)
                continue
            why = self._replay_problem(call, n)
            if why:
                raise self._refuse(call.name, call.module, why)
            e = torch.zeros_like(call.out) if call.grad is None else call.grad
            self._replaying = True
            try:
                self._set_enabled(False)
                blocks.append(replay_block(call, [e.to(cdt) / c], shapes))
                if self._sampled is not None:
                    sampled_blocks.append(replay_block(call, self._sampled[1][id(call)], shapes))
            except RuntimeError as err:
                where = f"module {call.name or type(call.module).__name__} ({type(call.module).__name__}, no fast rule)"
                one_line = translate_func_error(err, where)
                if one_line is None:
                    raise
                raise one_line from None
            finally:
                self._replaying = False
        return blocks, sampled_blocks

    def _unused(self, cap) -> None:
        """A captured module that did not run: fine if its parameters are not in the graph (zero rows);
        if they are, its hooks did not run (e.g. a compiled region that skipped them): refuse."""
        used = [p for p in cap.roles.values() if self._uses.get(id(self.params[p]), 0) > 0]
        if used:
            raise ModelError(f"module {cap.name} was used in the forward but its hooks did not run (a compiled "
                             "region that skips module hooks?): the direction would be wrong for "
                             + ", ".join(used) + "; compile without fullgraph, or call the module eagerly")

    def _replay_problem(self, call: Call, n: int) -> str:
        if call.calls != 1:
            return f"no fast rule, and called {call.calls} times in one forward (the replay fallback needs one call)"
        if call.reason:
            return f"no fast rule, and {call.reason}"
        for p in call.roles.values():
            uses = self._uses.get(id(self.params[p]), 0)
            if uses > 1:
                return f"no fast rule, and parameter {p} is used by {uses} operations"
        for name, m in call.module.named_modules():
            if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                return ("no fast rule, and active dropout inside (replayed per sample it would draw new masks); "
                        "put that dropout in eval mode")
        from torch.utils._pytree import tree_leaves

        if not any(isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n for t in tree_leaves((call.args, call.kwargs))):
            return "no fast rule, and no input has the batch as its leading dim"
        return ""

    def _check_unscaled(self, bg: BatchGrads, c: float, loss_scale: float) -> None:
        """A loss scale (GradScaler) was seen on the logits' gradient: the user must have unscaled .grad
        before this step, or ``scaler.step`` would divide the direction by the scale afterwards."""
        grads = [p.grad for p in self.params.values()]
        if any(g is None for g in grads):
            return
        have = math.sqrt(sum(float(g.to(torch.float64).pow(2).sum()) for g in grads))
        want = c * bg.n * float(torch.linalg.vector_norm(bg.g.to(torch.float64)))  # the unscaled user gradient
        if want > 0 and abs(have / want - loss_scale) < abs(have / want - 1.0):
            raise ModelError(f"the gradients are still multiplied by the loss scale ({loss_scale:g}): call "
                             "scaler.unscale_(optimizer) before pre.step(), or scaler.step would divide the "
                             "direction by the scale")

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        state = self._gen.get_state() if self._gen is not None else self._gen_state
        return {"method": self.method, "damping": self.damping, "seed": self.seed, "steps": self.steps,
                "generator": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.damping = float(state.get("damping", self.damping))
        self.steps = int(state.get("steps", 0))
        self.seed = int(state.get("seed", self.seed))
        if state.get("generator") is not None:
            self._gen_state = state["generator"].clone()
            self._gen = None

    def remove(self) -> None:
        """Remove every hook from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "Preconditioner":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Preconditioner(method={self.method!r}, damping={self.damping:g}, params={self.layout.size})"


def _aliased(root: nn.Module, param: nn.Parameter) -> bool:
    return sum(1 for _, p in root.named_parameters(remove_duplicate=False) if p is param) > 1

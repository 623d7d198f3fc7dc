"""iEF in a Hugging Face ``Trainer``: a TrainerCallback around :class:`iefcli.precond.Preconditioner`.

    trainer = Trainer(model=model, args=TrainingArguments(..., optim="sgd", learning_rate=50,
                      lr_scheduler_type="constant", max_grad_norm=0), train_dataset=ds,
                      callbacks=[IEFCallback(damping=1e-7)])

How it plugs in (transformers' Trainer, checked against its source): each
step runs ``training_step`` (the model's forward with ``labels=`` and its own
loss, then backward), then clips the gradients to ``max_grad_norm``, then
calls ``on_pre_optimizer_step`` and ``optimizer.step()``. The callback records
the logits and labels of every training forward (the preconditioner's
``watch_outputs``), and in ``on_pre_optimizer_step`` replaces ``.grad`` by the
iEF direction, AFTER the Trainer's clipping. So ``max_grad_norm`` is not
silently lost: when it is > 0 the callback clips the DIRECTION to it (as
``clip_grad_norm_`` after ``pre.step()`` would) and logs ``ief/clip_coef``;
set ``max_grad_norm=0`` for the paper's unclipped iEF. The model's own loss
may be any constant multiple of the sum of per-sample losses (mean over
samples, or the token mean over the batch): see :mod:`iefcli.precond.losses`.
Gradient accumulation over several micro-batches is refused (the Gram is over
one batch). The solve diagnostics (``ief/solve_residual``, ``ief/rows_kept``,
...) are averaged over the steps since the last log and added to the
Trainer's log entry (``trainer.state.log_history``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from iefcli.errors import ModelError
from iefcli.precond.preconditioner import Preconditioner

__all__ = ["IEFCallback"]


class IEFCallback(TrainerCallback):
    """``Trainer(..., callbacks=[IEFCallback(method="ief", damping=1e-7)])``.

    method, damping (paper scale), loss, options, seed: as :class:`iefcli.precond.Preconditioner`;
    labels_key: the forward's keyword that holds the labels.
    """

    def __init__(self, method: str = "ief", damping: float = 1e-7, *, loss: Any = "cross_entropy",
                 labels_key: str = "labels", options: Any = None, seed: int = 0):
        self.method, self.damping, self.loss, self.labels_key = method, damping, loss, labels_key
        self.options, self.seed = options, seed
        self.preconditioner: Preconditioner | None = None
        self._pending: dict[str, list[torch.Tensor]] = {}
        self.history: list[dict[str, float]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.gradient_accumulation_steps != 1:
            raise ModelError(f"gradient_accumulation_steps={args.gradient_accumulation_steps}: the iEF Gram is over "
                             "one batch; use gradient_accumulation_steps=1 with the batch size you want")
        if self.preconditioner is None:
            self.preconditioner = Preconditioner(model, method=self.method, damping=self.damping, loss=self.loss,
                                                 options=self.options, seed=self.seed)
            self.preconditioner.watch_outputs(self.labels_key)
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        pre = self.preconditioner
        info = pre.step()
        if args.max_grad_norm and args.max_grad_norm > 0:
            params = [p for p in pre.params.values() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            info["clip_coef"] = torch.clamp(args.max_grad_norm / (norm + 1e-6), max=1.0)
            info["direction_norm"] = norm
        for k, v in info.items():
            self._pending.setdefault(k, []).append(v.detach().to(torch.float64).reshape(()))
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending:
            return control
        means = {f"ief/{k}": float(torch.stack(v).mean()) for k, v in self._pending.items()}
        self._pending = {}
        self.history.append({"step": state.global_step, **means})
        if logs is not None:
            logs.update(means)
        if state.log_history:
            state.log_history[-1].update(means)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.preconditioner is not None:
            self.preconditioner.remove()
            self.preconditioner = None
        return control

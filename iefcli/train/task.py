"""Task building, shared by train, eval-gamma, bench and hf: recipe -> model, loss, data, evaluator.

``build_task(recipe, device) -> Task``. The model is built on the CPU under a
seeded RNG (fork_rng, so the caller's global RNG is untouched), then moved to
``device`` and the recipe's dtype; ``model.init_from`` (a checkpoint dir, or
a run dir -> its best/) then overwrites the parameters it names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from iefcli.core.jacobian import Forward, default_forward
from iefcli.core.losses import Loss, get_loss
from iefcli.core.params import Params, trainable_params
from iefcli.errors import UsageError
from iefcli.train.data import DataInfo, DataSplits, Split
from iefcli.train.metrics import compute_metrics
from iefcli.train.recipe import Recipe
from iefcli.train.registry import DATA_KINDS, MODEL_KINDS, BuildContext, load_builder

DTYPES = {"float32": torch.float32, "float64": torch.float64}


# A batch is a small split: the same (inputs, targets) pair, on the task's device.
Batch = Split


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu; 'cuda' without a GPU is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("device: cuda requested but no CUDA device is available (use device: auto or cpu)")
    return torch.device(name)


def _to(x: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move a tensor tree to device; floating tensors take the task dtype."""
    return tree_map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype), x)


def _take(x: Any, idx: Tensor | slice) -> Any:
    return tree_map(lambda t: t[idx], x)


@dataclass
class Task:
    """A model, its loss and data, ready for the training loop and evaluators.

    ``metric_name`` is the primary validation metric (best checkpoint) and
    ``metric_mode`` max | min says which way is better.
    """

    recipe: Recipe
    model: nn.Module
    loss_fn: Loss
    forward: Forward
    data: DataSplits
    device: torch.device
    dtype: torch.dtype
    splits: dict[str, Split] = field(default_factory=dict)

    @property
    def info(self) -> DataInfo:
        return self.data.info

    @property
    def metric_name(self) -> str:
        return self.info.metric

    @property
    def metric_mode(self) -> str:
        return self.info.mode

    def params(self) -> Params:
        """The trainable parameters (detached), by name."""
        return trainable_params(self.model)

    def size(self, split: str) -> int:
        return len(self.splits[split])

    def n_batches(self, split: str, batch_size: int, drop_last: bool = False) -> int:
        n = self.size(split)
        return n // batch_size if drop_last else -(-n // batch_size)

    def batches(
        self,
        split: str,
        batch_size: int,
        generator: torch.Generator | None = None,
        *,
        drop_last: bool = False,
        skip: int = 0,
    ) -> Iterator[Batch]:
        """Batches of one split on the device: shuffled by ``generator`` (a CPU
        generator; None = in order), the first ``skip`` batches left out (resume)."""
        s = self.splits[split]
        n = len(s)
        order = torch.randperm(n, generator=generator) if generator is not None else None
        nb = self.n_batches(split, batch_size, drop_last)
        for b in range(skip, nb):
            lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
            idx = order[lo:hi].to(self.device) if order is not None else slice(lo, hi)
            yield Batch(_take(s.inputs, idx), s.targets[idx])

    @torch.no_grad()
    def loss_at(self, params: Params, batch: Batch) -> Tensor:
        """The mean loss of ``params`` on one batch (0-d, on the device; eval mode, no RNG drawn)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.loss_fn.per_sample(self.forward(self.model, params, batch.inputs), batch.targets).mean()
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def evaluate(self, params: Params | None = None, split: str = "val", batch_size: int | None = None) -> dict[str, float]:
        """Mean per-sample loss and the task metrics of ``params`` (default: the
        model's own) on a split. Keys: loss, then the metric names."""
        if params is None:
            params = self.params()
        bs = batch_size or self.recipe["train"]["eval_batch_size"]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        preds, targets = [], []
        predict = self.info.predict or (lambda z: z.argmax(dim=-1))
        want_metrics = bool(self.info.metrics) or self.info.metric_fn is not None
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in self.batches(split, bs):
                z = self.forward(self.model, params, batch.inputs)
                total += self.loss_fn.per_sample(z, batch.targets).to(torch.float64).sum()
                if want_metrics:
                    preds.append(predict(z).cpu())
                    targets.append(batch.targets.cpu())
        finally:
            self.model.train(was_training)
        out = {"loss": float(total) / max(1, self.size(split))}
        if want_metrics and preds:
            p, t = torch.cat(preds), torch.cat(targets)
            out.update(self.info.metric_fn(p, t) if self.info.metric_fn else compute_metrics(self.info.metrics, p, t))
        return out


def build_task(recipe: Recipe, device: torch.device | str | None = None) -> Task:
    """Build data, model and loss from a validated recipe (see the registry for builders).

    ``device`` None -> the recipe's ``device`` (auto: CUDA when present).
    """
    dev = resolve_device(recipe["device"]) if device is None else torch.device(device)
    dtype = DTYPES[recipe["dtype"]]
    seed = recipe["seed"]
    ctx = BuildContext(recipe=recipe, device=dev, dtype=dtype, seed=seed)

    data_sec = dict(recipe["data"])
    data: DataSplits = load_builder(DATA_KINDS, data_sec["kind"])(data_sec, ctx)
    ctx.data = data.info

    model_sec = dict(recipe["model"])
    init_from = model_sec.pop("init_from", None)
    if init_from is not None and not isinstance(init_from, str):
        raise recipe.error("model.init_from", f"must be a path (checkpoint or run directory), got {init_from!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built = load_builder(MODEL_KINDS, model_sec["kind"])(model_sec, ctx)
    model, forward = built if isinstance(built, tuple) else (built, default_forward)
    model = model.to(device=dev, dtype=dtype)
    if init_from is not None:
        _load_init(recipe, model, init_from)

    loss_kind = recipe["loss"]["kind"]
    if loss_kind == "auto":
        loss_kind = data.info.loss
    loss_fn = get_loss(loss_kind, ignore_index=recipe["loss"]["ignore_index"]) if loss_kind == "token_cross_entropy" else get_loss(loss_kind)

    splits = {name: Split(_to(s.inputs, dev, dtype), _to(s.targets, dev, dtype)) for name, s in
              (("train", data.train), ("val", data.val), ("test", data.test))}
    if len(splits["train"]) == 0:
        raise recipe.error("data", "the training split is empty")
    task = Task(recipe=recipe, model=model, loss_fn=loss_fn, forward=forward, data=data, device=dev, dtype=dtype,
                splits=splits)
    _check_loss_fits(task)
    return task


def _check_loss_fits(task: Task) -> None:
    """The loss must fit the model's outputs and the data's targets (checked on one
    sample, and the labels of every split for the classification losses), so a
    mismatch is a usage error naming ``loss.kind`` before anything runs, not a
    traceback mid-run.

    cross_entropy: logits (N, C), integer labels (N,) in [0, C);
    token_cross_entropy: logits (N, T, V), integer labels (N, T) in [0, V) or ignore_index;
    mse: floating targets of the outputs' shape.
    """
    loss = task.loss_fn
    batch = next(task.batches("train", 1))
    was_training = task.model.training
    task.model.eval()
    try:
        with torch.no_grad():
            z = task.forward(task.model, task.params(), batch.inputs)
    finally:
        task.model.train(was_training)
    y = batch.targets
    kind = loss.name
    need = {"cross_entropy": (2, 1), "token_cross_entropy": (3, 2)}.get(kind)
    if need is not None:
        ok = z.dim() == need[0] and y.dim() == need[1] and not y.is_floating_point() and z.shape[:-1] == y.shape
        if ok:
            ignore = getattr(loss, "ignore_index", None)
            for name, s in task.splits.items():
                t = s.targets
                bad = (t < 0) | (t >= z.shape[-1])
                if ignore is not None:
                    bad &= t != ignore
                if bool(bad.any()):
                    value = t[bad].flatten()[0].item()
                    raise task.recipe.error("loss.kind", f"{kind}: the {name} data has label {value}, "
                                                         f"outside 0..{z.shape[-1] - 1} (the model's {z.shape[-1]} outputs)")
            return
    elif z.shape == y.shape and y.is_floating_point():
        return
    what = {"cross_entropy": "logits (N, C) and integer labels (N,)",
            "token_cross_entropy": "logits (N, T, V) and integer token labels (N, T)",
            "mse": "floating targets of the outputs' shape"}.get(kind, "matching outputs and targets")
    raise task.recipe.error(
        "loss.kind", f"{kind} needs {what}; this model gives {tuple(z.shape)} outputs per batch of 1 and the data "
                     f"has {'floating' if y.is_floating_point() else 'integer'} targets of shape {tuple(y.shape)}")


def _load_init(recipe: Recipe, model: nn.Module, init_from: str) -> None:
    """Copy saved parameters into the fresh model by name (a partial load: the
    model may have more parameters than the checkpoint; see rundir.load_params)."""
    from iefcli.train.rundir import load_params

    own = dict(model.named_parameters())
    saved = load_params(own, recipe.resolve_path(init_from), where=f"{recipe.source}: model.init_from",
                        allow_missing=True)
    with torch.no_grad():
        for k, v in saved.items():
            own[k].copy_(v)

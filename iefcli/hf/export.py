"""`ief export RUN --out DIR`: a trained run in the formats other tools load.

What is written depends on the run's model:

- a peft model (``model.kind: hf`` with ``peft.method: lora`` or ``prompt``):
  peft's own adapter format, ``adapter_config.json`` + ``adapter_model.safetensors``
  (``PeftModel.save_pretrained``), loadable with
  ``PeftModel.from_pretrained(base_model, DIR)``; the trained classification
  head travels inside the adapter (peft's ``modules_to_save``). The base model
  is the run's ``model.source`` (named in ``base_model_name_or_path``) or, for
  a model built from a config, the same config (``base_config.json``). (peft
  creates a prompt encoder in torch's default dtype: load a float64 prompt run
  under ``torch.set_default_dtype(torch.float64)`` or it is rounded to float32.)
- a full transformers model (``peft.method: none``): ``save_pretrained``
  (``config.json`` + ``model.safetensors``), loadable with ``AutoModel*.from_pretrained(DIR)``.
- any other model (``mlp``, ``linear``, a model by import path):
  ``model.safetensors`` holding the full ``state_dict`` by name, plus the
  run's ``recipe.yaml`` (which rebuilds the module).

An hf run's tokenizer is saved beside the model (``AutoTokenizer.from_pretrained(DIR)``).
Every export also writes ``export.json`` (what was exported, from which
checkpoint, the iefcli and schema versions). The directory is assembled under a
temporary name and moved into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from iefcli.errors import UsageError

EXPORT_FILE = "export.json"


def pick_checkpoint(run_dir: Path, checkpoint: str = "best") -> tuple[Path, int | None]:
    """``best`` | ``last`` | a step number -> (checkpoint dir, step)."""
    from iefcli.train import rundir

    if checkpoint == "best":
        ck = rundir.resolve_checkpoint(run_dir)
    elif checkpoint == "last":
        ckpts = rundir.list_checkpoints(run_dir)
        if not ckpts:
            raise UsageError(f"{run_dir}: run directory has no checkpoint yet")
        ck = ckpts[-1][1]
    else:
        try:
            step = int(checkpoint)
        except ValueError:
            raise UsageError(f"--checkpoint {checkpoint}: expected best, last or a step number") from None
        ck = rundir.checkpoint_dir(run_dir, step)
        if not rundir.is_checkpoint(ck):
            have = ", ".join(str(s) for s, _ in rundir.list_checkpoints(run_dir)) or "none"
            raise UsageError(f"--checkpoint {checkpoint}: {run_dir} has no step-{step} checkpoint (steps: {have})")
    try:
        step = int(rundir.checkpoint_meta(ck)["step"])
    except UsageError:
        step = None
    return ck, step


def load_trained_model(run_dir: Path | str, checkpoint: str = "best", device: str = "cpu") -> tuple[Any, Path, int | None]:
    """(task, checkpoint dir, step): the run's model rebuilt from its recipe with the checkpoint's parameters."""
    from iefcli.train import rundir
    from iefcli.train.task import build_task

    run_dir = Path(run_dir)
    recipe = rundir.load_recipe(run_dir)
    ck, step = pick_checkpoint(run_dir, checkpoint)
    task = build_task(recipe, device)
    saved = rundir.load_checkpoint_params(ck, device=device)
    own = dict(task.model.named_parameters())
    missing = [k for k in saved if k not in own]
    if missing:
        raise UsageError(f"{ck / rundir.PARAMS_FILE}: parameter {missing[0]!r} is not in the model the recipe builds")
    with torch.no_grad():
        for k, v in saved.items():
            if own[k].shape != v.shape:
                raise UsageError(f"{ck / rundir.PARAMS_FILE}: {k} has shape {tuple(v.shape)}, "
                                 f"the model expects {tuple(own[k].shape)}")
            own[k].copy_(v.to(own[k].dtype))
    task.model.eval()
    return task, ck, step


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _is_transformers(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _save_tokenizer(task: Any, tmp: Path) -> None:
    """An hf run's tokenizer goes with the export (``AutoTokenizer.from_pretrained(DIR)``)."""
    spec = task.recipe["model"]
    if spec.get("kind") != "hf":
        return
    name = spec.get("tokenizer", spec.get("source"))
    if name is None:
        return
    from iefcli.hf.models import load_tokenizer

    load_tokenizer(str(name), "model.tokenizer").save_pretrained(str(tmp))


def write_export(task: Any, tmp: Path) -> str:
    """Write the model of ``task`` into the empty directory ``tmp``; returns the format name."""
    from iefcli.train.rundir import atomic_write_json, atomic_write_text, save_tensors_atomic

    model = task.model
    _save_tokenizer(task, tmp)
    if _is_peft(model):
        model.save_pretrained(str(tmp), safe_serialization=True)
        base = model.get_base_model()
        cfg = getattr(model.peft_config.get("default"), "base_model_name_or_path", None)
        if not cfg:  # built from a config: ship the config so the same base can be rebuilt
            atomic_write_text(tmp / "base_config.json", base.config.to_json_string())
        return "peft-adapter"
    if _is_transformers(model):
        model.save_pretrained(str(tmp), safe_serialization=True)
        return "transformers"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_tensors_atomic(tmp / "model.safetensors", state, metadata={"format": "pt"})
    atomic_write_text(tmp / "recipe.yaml", task.recipe.to_yaml())
    atomic_write_json(tmp / "param_shapes.json", {k: list(v.shape) for k, v in state.items()})
    return "torch-state-dict"


def export_run(*, run_dir: Path | str, out: Path | str, checkpoint: str = "best", overwrite: bool = False) -> dict:
    """Export a run's checkpoint to ``out`` (see the module docstring). Returns the manifest."""
    from iefcli.train.jsonout import stamp
    from iefcli.train.rundir import atomic_write_json, is_nonempty_dir, replace_dir

    run_dir, out = Path(run_dir), Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if is_nonempty_dir(out):
        if not overwrite:
            raise UsageError(f"--out {out}: directory exists and is not empty (use --overwrite)")
        if not (out / EXPORT_FILE).is_file():
            raise UsageError(f"--out {out}: not an export directory (no {EXPORT_FILE}); refusing to overwrite it")
    task, ck, step = load_trained_model(run_dir, checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        fmt = write_export(task, tmp)
        manifest = stamp({
            "format": fmt, "run_dir": str(run_dir), "checkpoint": str(ck), "step": step,
            "recipe": task.recipe["name"], "model_kind": task.recipe["model"]["kind"],
            "dtype": task.recipe["dtype"], "files": sorted(p.name for p in tmp.iterdir()) + [EXPORT_FILE],
        })
        atomic_write_json(tmp / EXPORT_FILE, manifest)
        replace_dir(tmp, out, out.parent / f".{out.name}.old")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**manifest, "out": str(out)}

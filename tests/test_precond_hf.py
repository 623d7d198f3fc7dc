"""The Hugging Face Trainer callback (iefcli.hf.trainer.IEFCallback): 3 Trainer steps equal 3 steps of
the functional core on the same batches (recorded from the Trainer's own forwards), and max_grad_norm
clips the iEF direction (not silently dropped), with the solve diagnostics in the Trainer's log."""

from __future__ import annotations

import copy

import pytest
import torch

import reference as ref
from hf_tiny import BERT

pytest.importorskip("transformers", reason="transformers not installed")
pytest.importorskip("peft", reason="peft not installed")

from transformers import Trainer, TrainingArguments  # noqa: E402

from iefcli.core import CrossEntropy, batch_grads, trainable_params  # noqa: E402
from iefcli.core.methods import compute_direction  # noqa: E402
from iefcli.errors import ModelError  # noqa: E402
from iefcli.hf.models import build_model  # noqa: E402
from iefcli.hf.trainer import IEFCallback  # noqa: E402

LR, DAMPING, N = 2.0, 1e-7, 4


def _built():
    return build_model({"arch": "classifier", "config": dict(BERT), "num_labels": 2,
                        "peft": {"method": "lora", "r": 2, "alpha": 4, "target_modules": ["query", "value"]}},
                       dtype=torch.float64, seed=3)


def _dataset(n=12):
    gen = torch.Generator().manual_seed(5)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 9, (1,), generator=gen))
        mask = (torch.arange(8) < length).long()
        ids = torch.randint(5, BERT["vocab_size"], (8,), generator=gen) * mask
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": int(torch.randint(0, 2, (1,), generator=gen))})
    return rows


def _train(tmp_path, max_grad_norm, steps=3, **args):
    built = _built()
    model = built.model
    start = copy.deepcopy(trainable_params(model))
    seen = []
    handle = model.register_forward_pre_hook(
        lambda m, a, kw: seen.append({k: v.clone() for k, v in kw.items()}) if torch.is_grad_enabled() else None,
        with_kwargs=True)
    cb = IEFCallback(damping=DAMPING)
    targs = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=N, max_steps=steps,
                              learning_rate=LR, optim="sgd", lr_scheduler_type="constant", max_grad_norm=max_grad_norm,
                              report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
                              dataloader_num_workers=0, disable_tqdm=True, **args)
    trainer = Trainer(model=model, args=targs, train_dataset=_dataset(), callbacks=[cb])
    trainer.train()
    handle.remove()
    return built, start, seen, trainer, cb


def _core(built, start, batches, clip=None):
    params = {k: v.clone() for k, v in start.items()}
    model = built.model.eval()
    for kw in batches:
        inputs = {k: v for k, v in kw.items() if k != "labels"}
        bg = batch_grads(model, params, inputs, kw["labels"], CrossEntropy(), forward=built.forward)
        d, _ = compute_direction("ief", bg, DAMPING)
        if clip is not None:
            d = d * torch.clamp(clip / (torch.linalg.vector_norm(d) + 1e-6), max=1.0)
        theta = bg.layout.flatten(params)
        params = {k: v.clone() for k, v in bg.layout.unflatten(theta - LR * d).items()}
    return params


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_trainer_three_steps_equal_core_steps(tmp_path, max_grad_norm):
    built, start, seen, trainer, cb = _train(tmp_path, max_grad_norm)
    assert len(seen) == 3 and all(kw["labels"].shape == (N,) for kw in seen)
    got = trainable_params(built.model)
    # the core from the same start on the same (recorded) batches, with the model in its final state only
    # for frozen weights and buffers (unchanged by training)
    want = _core(built, start, seen, clip=max_grad_norm or None)
    assert any("lora_" in k for k in got)
    for k in want:
        assert ref.rel_err(got[k], want[k]) < 1e-9, k
    logged = [e for e in trainer.state.log_history if "ief/solve_residual" in e]
    assert len(logged) == 3 and all(e["ief/rows_kept"] == N for e in logged)
    if max_grad_norm:
        assert all(e["ief/clip_coef"] < 1.0 for e in logged)  # the direction WAS clipped


def test_gradient_accumulation_refused(tmp_path):
    with pytest.raises(ModelError, match="gradient_accumulation_steps=2"):
        _train(tmp_path, 0.0, steps=1, gradient_accumulation_steps=2)

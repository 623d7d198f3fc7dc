"""Per-sample gradients through Hugging Face + peft models vs a loop of ordinary backward passes.

Tiny config-built models (random init, no downloads), float64. The batch is
RIGHT-PADDED with an attention mask (different lengths per sample), which is
what breaks vmap in transformers' masking utilities; the reference runs each
sample ALONE, trimmed to its true length (so no mask at all), through the
ordinary module and torch.autograd.grad. Agreement therefore checks the vmap
patch, the masking and the per-sample rows at once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="optional extra [hf] (transformers) not installed")
pytest.importorskip("peft", reason="optional extra [hf] (peft) not installed")

from iefcli.core import batch_grads  # noqa: E402
from iefcli.core.losses import CrossEntropy, TokenCrossEntropy  # noqa: E402
from iefcli.core.params import trainable_params  # noqa: E402
from iefcli.hf.models import build_model  # noqa: E402
from iefcli.hf.vmap_compat import active_dropout, install_mask_patch  # noqa: E402

TOL = 1e-10  # float64: vmap vs loop differ only by summation order

BERT = {"model_type": "bert", "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 24, "max_position_embeddings": 40}
T5 = {"model_type": "t5", "vocab_size": 40, "d_model": 16, "d_kv": 8, "d_ff": 24, "num_layers": 1,
      "num_decoder_layers": 1, "num_heads": 2, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
VIT = {"model_type": "vit", "image_size": 8, "patch_size": 4, "num_channels": 1, "hidden_size": 16,
       "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 24}

LENGTHS = [7, 5, 3, 6]  # true lengths; padded to 7


def _padded_text(gen: torch.Generator, lengths=LENGTHS, vocab=40):
    n, t = len(lengths), max(lengths)
    ids = torch.randint(2, vocab, (n, t), generator=gen)
    mask = torch.zeros(n, t, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    ids = ids.masked_fill(mask == 0, 0)  # pad id 0
    return ids, mask


def _reference_rows(model, one_sample_loss, n):
    """J (N, P) by one ordinary forward + autograd.grad per sample."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    rows = []
    for i in range(n):
        grads = torch.autograd.grad(one_sample_loss(i), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _check(bg, ref_rows, ref_losses):
    torch.testing.assert_close(bg.loss, ref_losses, rtol=TOL, atol=TOL)
    j = bg.per_sample_grads()
    assert j.shape == ref_rows.shape
    assert ref_rows.abs().max() > 1e-6, "reference gradients are all ~0: the test would prove nothing"
    torch.testing.assert_close(j, ref_rows, rtol=1e-8, atol=TOL)
    torch.testing.assert_close(bg.g, ref_rows.mean(0), rtol=1e-8, atol=TOL)


def _encoder_case(peft: dict):
    built = build_model({"arch": "classifier", "config": BERT, "num_labels": 3, "peft": peft, "seed": 1},
                        dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    ids, mask = _padded_text(gen)
    y = torch.tensor([0, 2, 1, 2])
    return built, ids, mask, y


@pytest.mark.parametrize(
    "peft",
    [
        {"method": "lora", "r": 2, "alpha": 4, "target_modules": ["query", "value"], "bias": "lora_only"},
        {"method": "prompt", "num_virtual_tokens": 3},
    ],
    ids=["bert-lora", "bert-prompt"],
)
def test_encoder_classifier_per_sample_grads_match_loop(peft):
    built, ids, mask, y = _encoder_case(peft)
    model = built.model
    # Make LoRA B non-zero so gradients w.r.t. A are non-trivial too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    params = trainable_params(model)
    bg = batch_grads(model, params, {"input_ids": ids, "attention_mask": mask}, y, CrossEntropy(),
                     jacobian="vmap", forward=built.forward)
    assert bg.logits.shape == (4, 3)

    def one(i):
        k = LENGTHS[i]
        z = model(input_ids=ids[i : i + 1, :k]).logits  # alone, trimmed: no padding, no mask
        return F.cross_entropy(z, y[i : i + 1], reduction="sum")

    ref = _reference_rows(model, one, len(LENGTHS))
    with torch.no_grad():
        ref_losses = torch.stack([one(i) for i in range(len(LENGTHS))])
    _check(bg, ref, ref_losses)


def _seq2seq_batch(gen):
    ids, mask = _padded_text(gen)
    # Targets: label words of 1 or 2 tokens then EOS (id 1), padded with -100.
    labels = torch.tensor([[5, 1, -100], [7, 8, 1], [5, 1, -100], [9, 1, -100]])
    start = torch.zeros(4, 1, dtype=torch.long)  # decoder_start_token_id = 0
    dec_in = torch.cat([start, labels[:, :-1]], dim=1).masked_fill(torch.cat([start, labels[:, :-1]], 1) == -100, 0)
    return ids, mask, labels, dec_in


@pytest.mark.parametrize(
    "peft",
    [{"method": "prompt", "num_virtual_tokens": 3}, {"method": "lora", "r": 2, "alpha": 2}],
    ids=["t5-prompt", "t5-lora"],
)
def test_seq2seq_token_loss_per_sample_grads_match_loop(peft):
    built = build_model({"arch": "seq2seq", "config": T5, "peft": peft, "seed": 2}, dtype=torch.float64)
    model = built.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    ids, mask, labels, dec_in = _seq2seq_batch(torch.Generator().manual_seed(5))
    params = trainable_params(model)
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec_in}
    bg = batch_grads(model, params, inputs, labels, TokenCrossEntropy(), jacobian="vmap", forward=built.forward)
    assert bg.logits.shape == (4, 3, 40)

    def one(i):
        k = LENGTHS[i]
        valid = labels[i] != -100
        tl = int(valid.sum())
        z = model(input_ids=ids[i : i + 1, :k], decoder_input_ids=dec_in[i : i + 1, :tl]).logits[0]
        return F.cross_entropy(z, labels[i, :tl], reduction="sum")  # token CE summed over the sample's tokens

    ref = _reference_rows(model, one, 4)
    with torch.no_grad():
        ref_losses = torch.stack([one(i) for i in range(4)])
    _check(bg, ref, ref_losses)


def test_vit_lora_per_sample_grads_match_loop():
    built = build_model({"arch": "image-classifier", "config": VIT, "num_labels": 4,
                         "peft": {"method": "lora", "r": 2, "alpha": 2}, "seed": 3}, dtype=torch.float64)
    model = built.model
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.tensor([3, 0, 1, 1])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=gen)
    bg = batch_grads(model, trainable_params(model), x, y, CrossEntropy(), jacobian="vmap", forward=built.forward)

    def one(i):
        return F.cross_entropy(model(x[i : i + 1]).logits, y[i : i + 1], reduction="sum")

    ref = _reference_rows(model, one, 4)
    with torch.no_grad():
        ref_losses = torch.stack([one(i) for i in range(4)])
    _check(bg, ref, ref_losses)


@pytest.mark.parametrize(
    "arch,config,peft,allowed",
    [
        ("classifier", BERT, {"method": "lora", "r": 2}, ("lora_A", "lora_B", "modules_to_save")),
        ("classifier", BERT, {"method": "prompt", "num_virtual_tokens": 2}, ("prompt_encoder", "modules_to_save")),
        ("seq2seq", T5, {"method": "prompt", "num_virtual_tokens": 2}, ("prompt_encoder",)),
        ("seq2seq", T5, {"method": "lora", "r": 2}, ("lora_A", "lora_B")),
        ("image-classifier", VIT, {"method": "lora", "r": 2}, ("lora_A", "lora_B", "modules_to_save")),
    ],
)
def test_only_peft_params_and_head_are_trainable(arch, config, peft, allowed):
    spec = {"arch": arch, "config": config, "peft": peft}
    if arch != "seq2seq":
        spec["num_labels"] = 3
    model = build_model(spec).model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names, "nothing is trainable"
    assert all(any(a in n for a in allowed) for n in names), names
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    assert n_train < n_all / 3
    if arch != "seq2seq":  # the new head is trained (peft modules_to_save)
        assert any("modules_to_save" in n for n in names)


def test_mask_patch_keeps_ordinary_answers():
    """Outside a torch.func transform the patched helpers answer exactly as transformers'
    originals do (a full mask may be skipped, a padded one may not); under vmap the
    patched helper says "build the mask" (False) without branching on the data."""
    install_mask_patch()
    from transformers import masking_utils as mu

    full = torch.ones(2, 5, dtype=torch.bool)
    part = full.clone()
    part[1, 3:] = False
    patched = mu._ignore_bidirectional_mask_sdpa
    original = patched.__wrapped__
    assert bool(original(full, 5)) is True and bool(original(part, 5)) is False  # what transformers says
    for mask in (full, part, None):
        assert patched(mask, 5) == original(mask, 5)
    seen = []
    torch.func.vmap(lambda m: seen.append(patched(m, 5)) or m.sum())(full.unsqueeze(1))
    assert seen == [False]
    install_mask_patch()  # idempotent: not wrapped twice
    assert mu._ignore_bidirectional_mask_sdpa is patched
    assert not hasattr(patched.__wrapped__, "__wrapped__")


def test_dropout_is_off_by_default_and_reported_when_on():
    quiet = build_model({"config": BERT, "num_labels": 2, "peft": {"method": "lora", "r": 2}}).model.train()
    assert active_dropout(quiet) == []
    noisy = build_model({"config": BERT, "num_labels": 2, "dropout": 0.1,
                         "peft": {"method": "lora", "r": 2, "dropout": 0.1}}).model.train()
    names = active_dropout(noisy)
    assert any("lora_dropout" in n for n in names) and any("encoder" in n for n in names)


@pytest.mark.parametrize(
    "arch,config,peft",
    [
        ("classifier", BERT, {"method": "lora", "r": 2}),
        ("classifier", BERT, {"method": "prompt", "num_virtual_tokens": 3}),
        ("seq2seq", T5, {"method": "prompt", "num_virtual_tokens": 3}),
    ],
    ids=["bert-lora", "bert-prompt", "t5-prompt"],
)
def test_auto_jacobian_path_matches_vmap_on_peft_models(arch, config, peft):
    """Training uses jacobian='auto' (the fast path when registered): same Gram and g as vmap.

    peft computes the prompt embedding ONCE and expands it over the batch, so the
    fast path must not apply its per-sample Embedding rule there (it falls back)."""
    spec = {"arch": arch, "config": config, "peft": peft, "seed": 4}
    if arch == "classifier":
        spec["num_labels"] = 3
    built = build_model(spec, dtype=torch.float64)
    model = built.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    if arch == "classifier":
        _, ids, mask, y = _encoder_case(peft)
        inputs, loss = {"input_ids": ids, "attention_mask": mask}, CrossEntropy()
    else:
        ids, mask, y, dec_in = _seq2seq_batch(torch.Generator().manual_seed(5))
        inputs, loss = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec_in}, TokenCrossEntropy()
    params = trainable_params(model)
    ref = batch_grads(model, params, inputs, y, loss, jacobian="vmap", forward=built.forward)
    got = batch_grads(model, params, inputs, y, loss, jacobian="auto", forward=built.forward)
    torch.testing.assert_close(got.rows.gram(), ref.rows.gram(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.g, ref.g, rtol=1e-9, atol=1e-12)

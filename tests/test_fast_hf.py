"""The fast path on transformers + peft models (tiny configs, float64): LoRA, prompt tuning, full fine-tuning.

Rows (Gram, g) and the iEF / SF directions against the plain vmap path, with
a padding attention mask; and which path each parameter took.
"""

from __future__ import annotations

import pytest
import torch

import reference as ref
from hf_tiny import BERT

pytest.importorskip("transformers", reason="transformers not installed")
pytest.importorskip("peft", reason="peft not installed")

from iefcli import directions  # noqa: E402
from iefcli.core import CrossEntropy, batch_grads, sampled_rows, trainable_params  # noqa: E402
from iefcli.hf.models import build_model  # noqa: E402


def _batch():
    gen = torch.Generator().manual_seed(4)
    n, t = 4, 8
    lengths = torch.tensor([8, 5, 6, 3])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, BERT["vocab_size"], (n, t), generator=gen) * mask
    y = torch.randint(0, 2, (n,), generator=gen)
    return {"input_ids": ids, "attention_mask": mask}, y


PEFTS = {
    "lora": {"method": "lora", "r": 2, "alpha": 4, "target_modules": ["query", "value"]},
    "prompt": {"method": "prompt", "num_virtual_tokens": 3, "init": "random"},
    "none": {"method": "none"},
}


@pytest.mark.parametrize("method", list(PEFTS))
def test_bert_fast_equals_plain(method):
    built = build_model({"arch": "classifier", "config": dict(BERT), "num_labels": 2, "peft": PEFTS[method]},
                        dtype=torch.float64, seed=3)
    model = built.model.eval()
    params = trainable_params(model)
    inputs, y = _batch()
    args = (model, params, inputs, y, CrossEntropy())
    bf = batch_grads(*args, jacobian="fast", forward=built.forward)
    bv = batch_grads(*args, jacobian="vmap", forward=built.forward)
    paths = bf.jac.param_paths
    if method == "lora":
        lora = [k for k in paths if "lora_" in k]
        assert lora and all(paths[k] == "linear" for k in lora)
        assert all(v != "vmap" for v in paths.values()), bf.jac.fallback_reasons
    elif method == "prompt":
        # peft embeds the virtual tokens once and expands them over the batch: no per-sample
        # structure at that layer, so the prompt takes the vmap fallback (the head stays fast).
        prompt = [k for k in paths if "prompt_encoder" in k]
        assert prompt and all(paths[k] == "vmap" for k in prompt), paths
        assert all("shared across samples" in bf.jac.fallback_reasons[k] for k in prompt)
        assert any(v == "linear" for v in paths.values())
    else:
        assert paths["bert.embeddings.word_embeddings.weight"] == "embedding"
        assert paths["bert.embeddings.LayerNorm.weight"] == "layernorm"
        assert paths["bert.encoder.layer.0.attention.self.query.weight"] == "linear"
    assert ref.rel_err(bf.rows.gram(), bv.rows.gram()) < 1e-11
    assert ref.rel_err(bf.g, bv.g) < 1e-11
    for lam in (1e-6, 1e-2):
        assert ref.rel_err(directions.ief(bf.rows, bf.s, lam), directions.ief(bv.rows, bv.s, lam)) < 1e-9
        sf_f = directions.sf(sampled_rows(bf, 1, torch.Generator().manual_seed(0)), bf.g, lam)
        sf_v = directions.sf(sampled_rows(bv, 1, torch.Generator().manual_seed(0)), bv.g, lam)
        assert ref.rel_err(sf_f, sf_v) < 1e-8

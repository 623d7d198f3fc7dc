"""Hub IDs from the local Hugging Face cache: the env vars decide the cache, offline never downloads,
a missing model is one line; a model built from a cached hub ID has the cached weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="optional extra [hf] (transformers) not installed")
pytest.importorskip("peft", reason="optional extra [hf] (peft) not installed")

from iefcli.errors import UsageError  # noqa: E402
from iefcli.hf import hub  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_entry(cache: Path, repo: str, files: dict[str, str] | None = None, ref: str = "main") -> Path:
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(COMMIT)
    for name, text in (files or {"config.json": "{}"}).items():
        (snap / name).write_text(text)
    return snap


@pytest.fixture
def env(monkeypatch, tmp_path):
    for v in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_cache_dir_follows_the_env_vars(env, tmp_path):
    assert hub.hub_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    env.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert hub.hub_cache_dir() == tmp_path / "hfhome" / "hub"
    env.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "old"))
    assert hub.hub_cache_dir() == tmp_path / "old"
    env.setenv("HF_HUB_CACHE", str(tmp_path / "new"))
    assert hub.hub_cache_dir() == tmp_path / "new"


def test_resolve_from_cache_and_revisions(env, tmp_path):
    env.setenv("HF_HOME", str(tmp_path / "hf"))
    snap = _cache_entry(tmp_path / "hf" / "hub", "org/tiny")
    assert hub.resolve_hub_id("org/tiny", "model.source") == str(snap)
    assert hub.resolve_hub_id(f"org/tiny@{COMMIT}", "model.source") == str(snap)
    with pytest.raises(UsageError, match=r"at revision v2 \(offline\)"):
        hub.resolve_hub_id("org/tiny@v2", "model.source")


def test_not_cached_offline_is_one_line_and_never_downloads(env, tmp_path, monkeypatch):
    env.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded while offline"))
    with pytest.raises(UsageError) as e:
        hub.resolve_hub_id("org/absent", "model.source")
    msg = str(e.value)
    assert msg.startswith(f"model.source: 'org/absent' is not in the Hugging Face cache {tmp_path / 'c'} (offline)")
    assert "\n" not in msg


def test_online_downloads_into_the_cache(env, tmp_path, monkeypatch):
    env.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    env.setenv("HF_HUB_OFFLINE", "0")
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **k: calls.append((repo, k)) or "/x")
    assert hub.resolve_hub_id("org/m@v1", "model.source") == "/x"
    assert calls == [("org/m", {"revision": "v1", "cache_dir": str(tmp_path / "c")})]
    # HF_HUB_OFFLINE decides over TRANSFORMERS_OFFLINE (which iefcli.hf.require sets by default)
    env.setenv("TRANSFORMERS_OFFLINE", "1")
    assert not hub.is_offline()
    env.delenv("HF_HUB_OFFLINE")
    assert hub.is_offline()


def test_looks_like_hub_id():
    assert all(hub.looks_like_hub_id(s) for s in ("org/name", "bert-base-uncased", "a/b.c-d_e@main"))
    assert not any(hub.looks_like_hub_id(s) for s in ("./x", "~/m", "/abs/dir", "a/b/c", "a b", ""))


def test_model_source_by_hub_id_loads_the_cached_weights(env, tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from hf_tiny import BERT
    from iefcli.hf import models

    env.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    snap = _cache_entry(tmp_path / "c", "org/tiny-bert")
    cfg = dict(BERT)
    torch.manual_seed(0)
    original = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg,
                                                                                   num_labels=2))
    original.save_pretrained(str(snap))
    built = models.build_model({"arch": "classifier", "source": "org/tiny-bert", "peft": {"method": "none"}},
                               dtype=torch.float32)
    own = dict(built.model.named_parameters())
    for k, v in original.named_parameters():
        assert torch.equal(own[k], v), k
    with pytest.raises(UsageError, match=r"model.source: 'org/other' is not in the Hugging Face cache"):
        models.build_model({"arch": "classifier", "source": "org/other"})
    # 'minilm' and local directories behave as before
    with pytest.raises(UsageError, match="neither 'minilm'"):
        models.build_model({"arch": "classifier", "source": str(tmp_path / "nothing" / "x" / "y")})

"""Hugging Face hub IDs (``model.source: google-bert/bert-base-uncased``) resolved from the local cache.

iefcli never needs the network: a hub ID is looked up in the hub cache that
``huggingface_hub`` / ``transformers`` fill, with the same environment variables
they use, read when the lookup happens:

- the cache directory: ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else
  ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
  ``~/.cache/huggingface/hub``;
- offline mode: ``HF_HUB_OFFLINE`` set to 1/true/yes/on (when it is unset, ``TRANSFORMERS_OFFLINE``).
  :func:`iefcli.hf.require` sets ``HF_HUB_OFFLINE=1`` unless the user set it,
  so by default a model that is not cached is an error, never a download.

The cache layout (``huggingface_hub``'s): ``models--ORG--NAME/refs/<revision>``
holds a commit hash, ``models--ORG--NAME/snapshots/<hash>/`` the files. A
revision may be given as ``ORG/NAME@REVISION`` (a branch, a tag or a commit
hash). With ``HF_HUB_OFFLINE=0`` a missing model is downloaded through
``huggingface_hub.snapshot_download``.

Errors are one line naming the recipe key, the ID and the cache directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from iefcli.errors import UsageError
from iefcli.hf.models import resolve_source as _ORIGINAL_RESOLVE_SOURCE  # imports no transformers

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
HUB_ID = re.compile(rf"^(?:{_PART}/)?{_PART}(?:@[A-Za-z0-9._/-]+)?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
TRUE = ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """The hub cache directory from the environment (see the module docstring)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def is_offline() -> bool:
    """HF_HUB_OFFLINE decides when set (to anything); else TRANSFORMERS_OFFLINE."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var) is not None:
            return os.environ[var].strip().lower() in TRUE
    return False


def looks_like_hub_id(text: str) -> bool:
    """``org/name`` or ``name``, optionally ``@revision`` (not ``./x``, ``~/x``, absolute paths)."""
    return isinstance(text, str) and HUB_ID.match(text) is not None and not text.startswith((".", "~"))


def split_id(text: str) -> tuple[str, str]:
    repo, _, rev = text.partition("@")
    return repo, rev or "main"


def cached_snapshot(repo_id: str, revision: str = "main", cache: Path | None = None) -> Path | None:
    """The cached snapshot directory of a model repo at ``revision``, or None."""
    cache = hub_cache_dir() if cache is None else cache
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    if not repo_dir.is_dir():
        return None
    commit = revision
    if not COMMIT.match(revision):
        ref = repo_dir / "refs" / revision
        try:
            commit = ref.read_text(encoding="utf-8").strip()
        except OSError:
            return None
    snap = repo_dir / "snapshots" / commit
    return snap if snap.is_dir() else None


def resolve_hub_id(text: str, where: str) -> str:
    """A hub ID -> a local directory holding its files (from the cache; downloaded only when not offline)."""
    repo_id, revision = split_id(text)
    cache = hub_cache_dir()
    snap = cached_snapshot(repo_id, revision, cache)
    if snap is not None:
        return str(snap)
    at = f" at revision {revision}" if revision != "main" else ""
    if is_offline():
        raise UsageError(
            f"{where}: {text!r} is not in the Hugging Face cache {cache}{at} (offline); download it once "
            f"(huggingface-cli download {repo_id}), set HF_HUB_CACHE/HF_HOME to the cache that has it, or use a local directory"
        )
    try:
        from huggingface_hub import snapshot_download

        return str(snapshot_download(repo_id, revision=revision, cache_dir=str(cache)))
    except Exception as e:  # noqa: BLE001 - network, auth and not-found errors all end the same way
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{where}: cannot download {text!r} into {cache}: {msg}") from None


def resolve_source_with_hub(name_or_path: str, where: str) -> str:
    """:func:`iefcli.hf.models.resolve_source` extended with hub IDs: ``minilm`` and local
    directories as before, else a hub ID from the cache (what resolve_source does once wired)."""
    text = str(name_or_path)
    if text != "minilm" and not Path(text).expanduser().exists() and looks_like_hub_id(text):
        return resolve_hub_id(text, where)
    return _ORIGINAL_RESOLVE_SOURCE(name_or_path, where)


"""Hugging Face models (transformers + peft) and text data for iefcli.

Optional: needs the ``hf`` extra (``pip install -e '.[hf]'``). Nothing outside
this package imports transformers or peft; the train registry names these
modules as lazy import strings, so they load only when a recipe asks for an
HF model or text data.

- :mod:`iefcli.hf.models`      build a base model (local dir, ``minilm``, or a config), wrap it with peft
- :mod:`iefcli.hf.vmap_compat` the ONE place that makes transformers models safe under torch.func.vmap
- :mod:`iefcli.hf.text`        ``data.kind: text``: text classification data (CSV / TSV / JSONL, tokenised)
- :mod:`iefcli.hf.rotten_tomatoes` the offline Rotten Tomatoes corpus and its fixed split (`ief data`)
"""

from __future__ import annotations

import os

from iefcli.errors import UsageError

INSTALL_HINT = "pip install -e '.[hf]'  (or: pip install transformers peft)"


def require() -> None:
    """Import transformers and peft, or raise a one-line UsageError naming the pip command.

    Also forces the Hugging Face hub offline before transformers is first
    imported: iefcli never downloads anything at run time.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise UsageError(f"this recipe needs the optional Hugging Face packages ({e.name} is missing): {INSTALL_HINT}") from None

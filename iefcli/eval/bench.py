"""`ief bench`: step time and peak memory of SGD vs EF / iEF / SF on one model and batch.

This is the impure shell around the core (clocks, subprocesses, /proc): the
core itself stays pure. For each batch size N it builds the workload (a
built-in model spec, random data from a fixed seed), then

- times one optimiser step per method, ALTERNATING the methods over
  ``repeats`` rounds after ``warmup`` rounds, and reports the median. A step
  is exactly what ``ief train`` runs: ``make_optimizer(...).update(params,
  state, batch, key=, lr=)`` from the optimiser registry (:mod:`iefcli.optim`),
  with the per-sample path chosen by ``jacobian`` and the paper-scale
  ``damping``; each method carries its own params and state from step to step.
  Every step uses the same model and batch.
- measures each step's peak memory:
  CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
  (parameters + batch + everything the step allocates);
  CPU: the growth of the resident set during the step (its high-water mark
  minus the resident set just before it) plus the bytes of the model's
  parameters and buffers and of the batch (the same quantity as on CUDA:
  model + batch + what the step allocates), in a separate worker process started with glibc's ``MALLOC_MMAP_THRESHOLD_``
  fixed at 64 KiB so freed tensors go back to the OS, and the high-water mark
  reset before every step through ``/proc/self/clear_refs`` (Linux), so one
  method's peak cannot mask another's. Elsewhere peak memory is not reported.
- checks the answer: the max relative difference ||d_fast - d_plain|| / ||d_plain||
  between the fast-path and plain (vmap) directions of each curvature method
  (both from the method table, :func:`iefcli.core.methods.compute_direction`)
  on the same batch (on the first ``check_n`` samples when N x P would exceed
  ``check_max_numbers``, since the plain path holds N x P numbers).

Model specs: ``mlp`` (64-1024-1024-10, ReLU, cross-entropy; the recipes' ``mlp``
model kind, :func:`iefcli.train.models.build_mlp`), ``mlp:W0-W1-...-C``
(any widths, for P scaling), ``bert-lora`` (a tiny-config BERT classifier,
hidden 128, 2 layers, 2 heads, sequence length 64, LoRA r=8 on query/value
plus the classifier head trainable; needs transformers and peft), or
``recipe:NAME_OR_PATH`` (a training recipe's model, loss and forward via
:func:`iefcli.train.task.build_task`, on its first shuffled train batch).
Every model runs in eval mode (no dropout), built-in specs in float32 unless
``dtype`` says otherwise (recipes: their own dtype and device).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from iefcli import allocator
from iefcli.core.methods import BENCH_METHODS, GRAM_METHODS, METHODS as DIRECTION_METHODS
from iefcli.errors import RunFailed, UsageError

METHODS = BENCH_METHODS
"""What ``ief bench`` times by default: SGD and the Gram-solve methods."""
CURVATURE = GRAM_METHODS
"""The methods whose fast-path direction is checked against the plain path."""


def choices() -> tuple[str, ...]:
    """What ``--methods`` accepts: every optimiser of the training registry."""
    from iefcli.optim import REGISTRY

    return tuple(REGISTRY)
DEFAULT_BATCH_SIZES = (32, 64, 128)
DEFAULT_MODEL = "mlp"
MLP_DEFAULT_WIDTHS = (64, 1024, 1024, 10)
BERT_SEQ_LEN = 64
MMAP_THRESHOLD = 65536  # bytes; see the module docstring
BENCH_LR = 1e-6  # small: the timed steps must not drive the model anywhere odd


@dataclass
class Workload:
    """One model + batch: what every method's step runs on."""

    spec: str
    model: nn.Module
    inputs: Any
    targets: Tensor
    loss_fn: Any
    forward: Callable
    n: int

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- workloads


@contextmanager
def _option(name: str):
    """Usage errors raised inside name the command-line option they come from."""
    try:
        yield
    except UsageError as e:
        raise UsageError(f"{name}: {e}") from None


def _mlp_widths(spec: str) -> tuple[int, ...]:
    if spec == "mlp":
        return MLP_DEFAULT_WIDTHS
    try:
        widths = tuple(int(w) for w in spec.split(":", 1)[1].split("-"))
    except (IndexError, ValueError):
        widths = ()
    if len(widths) < 2 or min(widths) < 1:
        raise UsageError(f"--model: {spec!r} is not mlp, mlp:W0-W1-...-C (positive widths) or bert-lora")
    return widths


def _mlp(widths: tuple[int, ...], seed: int) -> nn.Module:
    """The recipes' ``mlp`` model kind (:func:`iefcli.train.models.build_mlp`) with these widths, seeded."""
    from iefcli.train.data import DataInfo
    from iefcli.train.models import build_mlp
    from iefcli.train.recipe import recipe_from_dict
    from iefcli.train.registry import BuildContext

    section = {"kind": "mlp", "sizes": list(widths[1:-1]), "activation": "relu"}
    recipe = recipe_from_dict({"name": "bench", "seed": seed, "model": section}, source="--model")
    ctx = BuildContext(recipe=recipe, device=torch.device("cpu"), dtype=torch.float32, seed=seed,
                       data=DataInfo(input_shape=(widths[0],), n_outputs=widths[-1]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_mlp(section, ctx)


class _Last(nn.Module):
    """A recurrent module's last hidden state (its output is a tuple)."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0][:, -1]


class _Mean(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x.mean(dim=self.dim)


class _Attn(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x)[0]


class _Block(nn.Module):
    """A ResNet basic block: conv-norm-relu-conv-norm + identity."""

    def __init__(self, c: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(c, c, 3, padding=1, bias=False), norm(c)
        self.c2, self.n2 = nn.Conv2d(c, c, 3, padding=1, bias=False), norm(c)

    def forward(self, x):
        return torch.relu(x + self.n2(self.c2(torch.relu(self.n1(self.c1(x))))))


class _Tied(nn.Module):
    """A token model whose output layer is tied to its embedding (the same Parameter)."""

    def __init__(self, vocab: int, d: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.emb(ids).mean(dim=1))))


def _resnet(norm: Callable[[int], nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), norm(16), nn.ReLU(), _Block(16, norm),
                         _Block(16, norm), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _zoo(spec: str, n: int, gen: torch.Generator):
    """(model, inputs, n_classes) of the small models ``ief bench --model`` offers besides mlp / bert-lora
    (the models of issue 14's table: layers with and without fast rules)."""
    enc = lambda: nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)  # noqa: E731
    builders = {
        "mha": lambda: (nn.Sequential(nn.Linear(32, 64), _Attn(64, 4), _Mean(1), nn.Linear(64, 10)),
                        torch.randn(n, 16, 32, generator=gen), 10),
        "encoder": lambda: (nn.Sequential(nn.Linear(32, 64), nn.TransformerEncoder(enc(), 2, enable_nested_tensor=False),
                                          _Mean(1), nn.Linear(64, 10)), torch.randn(n, 16, 32, generator=gen), 10),
        "conv1d": lambda: (nn.Sequential(nn.Conv1d(8, 32, 5, padding=2), nn.ReLU(), nn.Conv1d(32, 32, 5, padding=2),
                                         nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 10)),
                           torch.randn(n, 8, 64, generator=gen), 10),
        "cnn-bn": lambda: (nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                         nn.Flatten(), nn.Linear(16 * 16 * 16, 10)),
                           torch.randn(n, 3, 16, 16, generator=gen), 10),
        "cnn-gn": lambda: (nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                                         nn.Flatten(), nn.Linear(16 * 16 * 16, 10)),
                           torch.randn(n, 3, 16, 16, generator=gen), 10),
        "resnet-gn": lambda: (_resnet(lambda c: nn.GroupNorm(4, c)), torch.randn(n, 3, 16, 16, generator=gen), 10),
        "resnet-bn": lambda: (_resnet(nn.BatchNorm2d), torch.randn(n, 3, 16, 16, generator=gen), 10),
        "lstm": lambda: (nn.Sequential(_Last(nn.LSTM(16, 64, batch_first=True)), nn.Linear(64, 10)),
                         torch.randn(n, 12, 16, generator=gen), 10),
        "tied": lambda: (_Tied(100, 64), torch.randint(0, 100, (n, 16), generator=gen), 100),
    }
    if spec not in builders:
        return None
    model, inputs, classes = builders[spec]()
    return model, inputs, classes


ZOO = ("mha", "encoder", "conv1d", "cnn-bn", "cnn-gn", "resnet-gn", "resnet-bn", "lstm", "tied", "bert")
"""The extra ``--model`` specs (besides mlp, mlp:W..., bert-lora, recipe:...)."""


def build_workload(spec: str, n: int, *, seed: int = 0, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> Workload:
    """The model of ``spec`` and a random batch of ``n`` samples, all from ``seed``."""
    from iefcli.core import CrossEntropy, default_forward

    gen = torch.Generator().manual_seed(seed)
    if spec.startswith("recipe:"):
        return _recipe_workload(spec, n, seed=seed, device=device)
    if spec in ("bert-lora", "bert"):
        model, forward, n_classes, vocab = _bert_lora(seed, lora=spec == "bert-lora")
        inputs = {"input_ids": torch.randint(0, vocab, (n, BERT_SEQ_LEN), generator=gen).to(device)}
    elif spec in ZOO:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, inputs, n_classes = _zoo(spec, n, gen)
        forward = default_forward
        inputs = inputs.to(device=device, dtype=dtype if inputs.is_floating_point() else inputs.dtype)
    elif spec.startswith("mlp"):
        widths = _mlp_widths(spec)
        model = _mlp(widths, seed)
        forward, n_classes = default_forward, widths[-1]
        inputs = torch.randn(n, widths[0], generator=gen).to(device=device, dtype=dtype)
    else:
        raise UsageError(f"--model: unknown model spec {spec!r}; choose mlp, mlp:W0-W1-...-C, bert-lora, "
                         f"{', '.join(ZOO)} or --recipe")
    targets = torch.randint(0, n_classes, (n,), generator=gen).to(device)
    model = model.to(device=device, dtype=dtype).eval()
    return Workload(spec, model, inputs, targets, CrossEntropy(), forward, n)


def _recipe_workload(spec: str, n: int, *, seed: int, device) -> Workload:
    """The model, loss and forward of a training recipe, and its first shuffled train batch of ``n``."""
    from iefcli.train.recipe import load_recipe_file
    from iefcli.train.task import build_task

    with _option("--recipe"):
        recipe = load_recipe_file(spec.split(":", 1)[1])
        task = build_task(recipe, device)
    if task.size("train") < n:
        name = recipe.get("name", spec)
        raise UsageError(f"--batch-sizes: {n} is more than the {task.size('train')} training samples of {name}")
    batch = next(task.batches("train", n, torch.Generator().manual_seed(seed)))
    return Workload(spec, task.model.eval(), batch.inputs, batch.targets, task.loss_fn, task.forward, n)


def _bert_lora(seed: int, lora: bool = True):
    try:
        from iefcli.hf.models import build_model
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise UsageError(f"--model bert-lora needs transformers and peft ({e})") from None
    try:
        built = build_model(
            {
                "arch": "classifier",
                "config": {"model_type": "bert", "hidden_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "intermediate_size": 512,
                           "max_position_embeddings": 128},
                "num_labels": 2,
                **({"peft": {"method": "lora", "r": 8, "alpha": 8, "target_modules": ["query", "value"]}}
                   if lora else {}),
            },
            seed=seed,
        )
    except ImportError as e:  # pragma: no cover
        raise UsageError(f"--model bert-lora needs transformers and peft ({e})") from None
    vocab = built.model.get_input_embeddings().num_embeddings
    return built.model, built.forward, 2, vocab


# ---------------------------------------------------------------- steps


def _optimizer(method: str, wl: Workload, *, jacobian: str, damping: float):
    """The training loop's optimiser for ``method`` (registry + recipe defaults), at the bench's damping."""
    from iefcli.optim import config_from_recipe, make_optimizer

    section = {"name": method, "lr": BENCH_LR, "jacobian": jacobian}
    if method in DIRECTION_METHODS and method != "sgd":
        section["damping"] = damping
    return make_optimizer(config_from_recipe(section), model=wl.model, loss_fn=wl.loss_fn, forward=wl.forward)


class Step:
    """One optimiser update of ``method`` on ``wl`` per call, exactly as ``ief train`` runs it
    (``make_optimizer(...).update`` from the registry). Each call continues from the previous
    call's ``params`` and ``state`` (held here; the module's own tensors are not touched)."""

    def __init__(self, method: str, wl: Workload, *, jacobian: str = "auto", damping: float = 1e-4,
                 lr: float | None = None, seed: int = 0, config=None, diagnostics: bool = True):
        from iefcli.core import trainable_params
        from iefcli.train.task import Batch

        if config is not None:  # a recipe's resolved OptimConfig (tools/bench_train_step.py): its lr too
            from iefcli.optim import make_optimizer

            self.opt = make_optimizer(config, model=wl.model, loss_fn=wl.loss_fn, forward=wl.forward)
            lr = config.lr if lr is None else lr
        else:
            self.opt = _optimizer(method, wl, jacobian=jacobian, damping=damping)
        self.batch = Batch(wl.inputs, wl.targets)
        # ef/sf/ngd directions are N^2 longer on the paper scale: the same small move per step for all.
        power = DIRECTION_METHODS[method].direction_power if method in DIRECTION_METHODS else 0
        self.lr = BENCH_LR / wl.n ** power if lr is None else lr
        self.seed = seed
        self.params = trainable_params(wl.model)
        self.state = self.opt.init(self.params)
        self.steps = 0
        self.metrics: dict[str, Tensor] = {}
        self.diagnostics = diagnostics

    def __call__(self) -> None:
        from iefcli.optim.base import update_step

        self.params, self.state, self.metrics = update_step(
            self.opt, self.params, self.state, self.batch, key=self.seed + self.steps, lr=self.lr,
            diagnostics=self.diagnostics)
        self.steps += 1


def make_step(method: str, wl: Workload, *, jacobian: str = "auto", damping: float = 1e-4,
              lr: float | None = None, seed: int = 0, diagnostics: bool = True) -> Step:
    """A callable running one real optimiser update of ``method`` on ``wl`` per call (see :class:`Step`).
    ``diagnostics=False``: the step ``ief train`` runs between log lines (no grad norm, cosine,
    imbalance, ...; the same new params)."""
    return Step(method, wl, jacobian=jacobian, damping=damping, lr=lr, seed=seed, diagnostics=diagnostics)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_methods(steps: dict[str, Callable[[], None]], *, repeats: int, warmup: int,
                 device: torch.device, cpu_times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Wall seconds per step for each method, the methods alternating within every round (paired,
    interleaved repeats). ``cpu_times``, when given, receives the process CPU seconds of each step."""
    for _ in range(warmup):
        for f in steps.values():
            f()
    _sync(device)
    out: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(repeats):
        for m, f in steps.items():
            _sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            _sync(device)
            out[m].append(time.perf_counter() - t0)
            if cpu_times is not None:
                cpu_times.setdefault(m, []).append(time.process_time() - c0)
    return out


# ---------------------------------------------------------------- correctness check


def _direction(method: str, wl: Workload, *, jacobian: str, damping: float, seed: int,
               params: dict | None = None) -> tuple[Tensor, Any]:
    """(d, bg): the method table's direction (paper-scale damping) on ``wl`` through ``jacobian``."""
    from iefcli.core import batch_grads, trainable_params
    from iefcli.core.methods import compute_direction

    params = trainable_params(wl.model) if params is None else params
    bg = batch_grads(wl.model, params, wl.inputs, wl.targets, wl.loss_fn, jacobian=jacobian, forward=wl.forward)
    gen = torch.Generator(device=bg.logits.device).manual_seed(seed)
    d, _ = compute_direction(method, bg, damping, generator=gen)
    return d, bg


def check_fast_vs_plain(wl: Workload, methods, *, damping: float, seed: int,
                        max_numbers: int) -> tuple[dict[str, float], int]:
    """Max relative difference of fast vs plain directions per curvature method, and the samples used."""
    from iefcli.core import trainable_params

    p = wl.n_params
    n = max(1, min(wl.n, max_numbers // max(1, p)))
    sub = wl if n == wl.n else Workload(wl.spec, wl.model, _take(wl.inputs, n), wl.targets[:n], wl.loss_fn,
                                        wl.forward, n)
    params = trainable_params(sub.model)
    out = {}
    for m in methods:
        if m not in CURVATURE:
            continue
        d_fast, _ = _direction(m, sub, jacobian="fast", damping=damping, seed=seed, params=params)
        d_plain, _ = _direction(m, sub, jacobian="vmap", damping=damping, seed=seed, params=params)
        a, b = d_fast.to(torch.float64), d_plain.to(torch.float64)
        out[m] = float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))
    return out, n


def check_vs_float64(wl: Workload, methods, *, damping: float, seed: int) -> dict[str, float]:
    """Max relative difference of each curvature method's fast direction in the model's dtype vs the
    same direction from a float64 copy of the model and batch (the reference), on ALL N rows."""
    import copy

    from iefcli.core import trainable_params

    if next(wl.model.parameters()).dtype == torch.float64:
        return {}
    m64 = copy.deepcopy(wl.model).to(torch.float64)
    cast = lambda t: t.to(torch.float64) if isinstance(t, Tensor) and t.is_floating_point() else t  # noqa: E731
    ins = wl.inputs
    ins64 = ({k: cast(v) for k, v in ins.items()} if isinstance(ins, dict)
             else tuple(cast(v) for v in ins) if isinstance(ins, (tuple, list)) else cast(ins))
    w64 = Workload(wl.spec, m64, ins64, wl.targets, wl.loss_fn, wl.forward, wl.n)
    out = {}
    for m in methods:
        if m not in CURVATURE:
            continue
        d, _ = _direction(m, wl, jacobian="auto", damping=damping, seed=seed, params=trainable_params(wl.model))
        d64, _ = _direction(m, w64, jacobian="auto", damping=damping, seed=seed, params=trainable_params(m64))
        a = d.to(torch.float64)
        out[m] = float(torch.linalg.vector_norm(a - d64) / torch.linalg.vector_norm(d64).clamp_min(1e-300))
    return out


def fallback_params(wl: Workload) -> dict[str, str]:
    """Parameter -> "replay: why" / "vmap: why" for every trainable parameter the fast path does not
    cover with a layer rule ("replay": the per-module fallback, "vmap": the whole model per sample)."""
    from iefcli.core import trainable_params
    from iefcli.core.fast import FastJacobian

    try:
        jac = FastJacobian(wl.model, trainable_params(wl.model), wl.inputs, forward=wl.forward)
    except Exception as e:  # noqa: BLE001 - reported, not raised: the timing says the rest
        return {"*": f"error: {e}"}
    return {p: f"{path}: {jac.fallback_reasons.get(p, '')}" for p, path in jac.param_paths.items()
            if path in ("vmap", "replay")}


def _take(inputs: Any, n: int) -> Any:
    if isinstance(inputs, Tensor):
        return inputs[:n]
    if isinstance(inputs, dict):
        return {k: v[:n] for k, v in inputs.items()}
    return tuple(v[:n] for v in inputs)


# ---------------------------------------------------------------- memory


def _proc_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def cpu_peak_supported() -> bool:
    try:
        _proc_kib("VmHWM")
        _reset_peak_rss()
        return True
    except OSError:
        return False
    except KeyError:
        return False


def _memory_worker(cfg: dict) -> dict:
    """Run inside the worker process: per N and method, peak memory of one step (MiB, see the module doc)."""
    torch.set_num_threads(cfg["threads"])
    from iefcli import core  # noqa: F401  (import costs belong to the baseline)

    # One throwaway round on a tiny batch first: lazy initialisation (imports, kernels, the
    # autograd engine) happens once per process and belongs to no step.
    wl = build_workload(cfg["model"], 2, seed=cfg["seed"])
    for m in cfg["methods"]:
        make_step(m, wl, jacobian=cfg["jacobian"], damping=cfg["damping"], seed=cfg["seed"],
                  diagnostics=cfg.get("diagnostics", True))()
    del wl
    out: dict[str, dict[str, float]] = {}
    for n in cfg["batch_sizes"]:
        wl = build_workload(cfg["model"], n, seed=cfg["seed"])
        held = _workload_bytes(wl)
        steps = {m: make_step(m, wl, jacobian=cfg["jacobian"], damping=cfg["damping"], seed=cfg["seed"],
                              diagnostics=cfg.get("diagnostics", True))
                 for m in cfg["methods"]}
        for step in steps.values():  # warm-up: lazy initialisation is not the step's memory
            step()
        peaks: dict[str, float] = {m: 0.0 for m in steps}
        for _ in range(2):
            for m, step in steps.items():
                gc.collect()
                before = _proc_kib("VmRSS")
                _reset_peak_rss()
                step()
                grown = (_proc_kib("VmHWM") - before) * 1024
                peaks[m] = max(peaks[m], (grown + held) / 2**20)
        out[str(n)] = peaks
        del wl, steps, step
    return out


def _workload_bytes(wl: Workload) -> int:
    """Bytes of the model's parameters and buffers and of the batch: what every step holds."""
    tensors = list(wl.model.parameters()) + list(wl.model.buffers()) + [wl.targets]
    inputs = wl.inputs
    tensors += list(inputs.values()) if isinstance(inputs, dict) else (
        [inputs] if isinstance(inputs, Tensor) else list(inputs))
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_cpu_memory(*, model: str, batch_sizes, methods, jacobian: str, damping: float, seed: int,
                       threads: int, diagnostics: bool = True) -> dict[str, dict[str, float]] | None:
    """Per N and method the CPU peak (MiB), from a fresh worker process; None where unsupported."""
    if not cpu_peak_supported():
        return None
    cfg = {"model": model, "batch_sizes": list(batch_sizes), "methods": list(methods), "jacobian": jacobian,
           "damping": damping, "seed": seed, "threads": threads, "diagnostics": diagnostics}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-m", "iefcli.eval.bench", "--memory-worker", json.dumps(cfg)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RunFailed(f"memory worker failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the benchmark


def run_bench(
    *,
    model: str = DEFAULT_MODEL,
    batch_sizes=DEFAULT_BATCH_SIZES,
    methods=METHODS,
    jacobian: str = "auto",
    repeats: int = 7,
    warmup: int = 2,
    threads: int | None = None,
    device: str = "cpu",
    damping: float = 1e-4,
    seed: int = 0,
    memory: bool = True,
    check: bool = True,
    check_max_numbers: int = 1 << 26,
    progress: Callable[[str], None] | None = None,
    diagnostics: bool = False,
) -> list[dict]:
    """Run the benchmark; one result dict per (batch size, method). See the module docstring.

    Keys: model, optimizer, batch_size, n_params, jacobian, device, threads, cpu_allocator
    (:func:`iefcli.allocator.state`), repeats,
    ms_median, ms_min, ratio_to_sgd, peak_mb, peak_ratio_to_sgd,
    max_rel_diff_fast_vs_plain, check_n, diagnostics.

    ``diagnostics``: False (default) times the step ``ief train`` runs between log lines, True the
    step of a logging line (grad norm, cosine, imbalance, ... for every method).
    """
    methods = tuple(methods)
    bad = [m for m in methods if m not in choices()]
    if bad or not methods:
        raise UsageError(f"--methods: {', '.join(bad) or 'empty'} not among {', '.join(choices())}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise UsageError("--batch-sizes: give positive integers, e.g. 32,64,128")
    if jacobian not in ("auto", "fast", "vmap"):
        raise UsageError(f"--jacobian: {jacobian!r} is not one of auto, fast, vmap")
    if repeats < 1 or warmup < 0:
        raise UsageError("--repeats must be >= 1 and --warmup >= 0")
    if not damping > 0:
        raise UsageError(f"--damping: must be > 0 (sf divides by it), got {damping:g}")
    if device not in ("cpu", "cuda", "auto") and not device.startswith("cuda:"):
        raise UsageError(f"--device: {device!r} is not one of cpu, cuda, cuda:N, auto")
    from iefcli.train.task import resolve_device

    try:
        dev = resolve_device(device)  # the same rule as a recipe's device
    except UsageError:
        raise UsageError(f"--device {device}: no CUDA device is available") from None
    if threads is not None:
        if threads < 1:
            raise UsageError("--threads must be >= 1")
        torch.set_num_threads(threads)
    n_threads = torch.get_num_threads()
    say = progress or (lambda _msg: None)
    if model in ("bert-lora", "bert"):
        _bert_lora(seed)  # fail early, with one line, when transformers/peft are missing
    elif model in ZOO:
        pass
    elif model.startswith("mlp"):
        _mlp_widths(model)  # fail before the memory worker starts
    elif model.startswith("recipe:"):
        from iefcli.train.recipe import load_recipe_file

        with _option("--recipe"):
            load_recipe_file(model.split(":", 1)[1])  # a bad recipe fails here, with its own message
    else:
        raise UsageError(f"--model: unknown model spec {model!r}; choose mlp, mlp:W0-W1-...-C, bert-lora, "
                         f"{', '.join(ZOO)} or --recipe")

    cpu_mem = None
    if memory and dev.type == "cpu":
        say("measuring CPU peak memory in a worker process")
        cpu_mem = measure_cpu_memory(model=model, batch_sizes=batch_sizes, methods=methods, jacobian=jacobian,
                                     damping=damping, seed=seed, threads=n_threads, diagnostics=diagnostics)

    results: list[dict] = []
    for n in batch_sizes:
        say(f"N={n}: building {model}")
        wl = build_workload(model, n, seed=seed, device=dev)
        fell_back = fallback_params(wl) if jacobian != "vmap" else {}
        steps = {m: make_step(m, wl, jacobian=jacobian, damping=damping, seed=seed, diagnostics=diagnostics)
                 for m in methods}
        say(f"N={n}: timing {', '.join(methods)} ({warmup} warm-up + {repeats} alternating rounds)")
        cpu: dict[str, list[float]] = {}
        times = time_methods(steps, repeats=repeats, warmup=warmup, device=dev, cpu_times=cpu)
        peaks: dict[str, float | None] = {m: None for m in methods}
        if memory and dev.type == "cuda":
            for m, f in steps.items():
                _sync(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                f()
                _sync(dev)
                peaks[m] = torch.cuda.max_memory_allocated(dev) / 2**20
        elif cpu_mem is not None:
            peaks = {m: cpu_mem[str(n)][m] for m in methods}
        diffs: dict[str, float] = {}
        diffs64: dict[str, float] = {}
        check_n = None
        if check and any(m in CURVATURE for m in methods):
            say(f"N={n}: checking the directions against a float64 reference (all {n} rows)")
            try:
                diffs64 = check_vs_float64(wl, methods, damping=damping, seed=seed)
            except Exception as e:  # noqa: BLE001 - the reference is a check, not the benchmark
                say(f"N={n}: no float64 reference: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            say(f"N={n}: checking fast vs plain directions")
            try:
                diffs, check_n = check_fast_vs_plain(wl, methods, damping=damping, seed=seed,
                                                     max_numbers=check_max_numbers)
            except Exception as e:  # noqa: BLE001
                say(f"N={n}: no fast-vs-plain check: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        med = {m: statistics.median(ts) * 1e3 for m, ts in times.items()}
        cmed = {m: statistics.median(ts) * 1e3 for m, ts in cpu.items()}
        for m in methods:
            results.append({
                "model": model,
                "optimizer": m,
                "batch_size": n,
                "n_params": wl.n_params,
                "jacobian": jacobian if m in DIRECTION_METHODS and m != "sgd" else "n/a",
                "device": str(dev),
                "threads": n_threads,
                "cpu_allocator": allocator.state() if dev.type == "cpu" else None,
                "repeats": repeats,
                "diagnostics": diagnostics,
                "ms_median": med[m],
                "ms_min": min(times[m]) * 1e3,
                "ratio_to_sgd": med[m] / med["sgd"] if "sgd" in med else None,
                "cpu_ms_median": cmed[m],
                "cpu_ratio_to_sgd": cmed[m] / cmed["sgd"] if "sgd" in cmed and cmed["sgd"] > 0 else None,
                "peak_mb": peaks[m],
                "peak_ratio_to_sgd": (peaks[m] / peaks["sgd"]
                                      if peaks[m] is not None and peaks.get("sgd") else None),
                "max_rel_diff_fast_vs_plain": diffs.get(m),
                "check_n": check_n if m in diffs else None,
                "max_rel_diff_vs_float64": diffs64.get(m),
                "fallback_params": fell_back if m in DIRECTION_METHODS and m != "sgd" else {},
            })
        del wl, steps
        gc.collect()
    return results


if __name__ == "__main__":  # the memory worker: python -m iefcli.eval.bench --memory-worker '<json>'
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        print(json.dumps(_memory_worker(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m iefcli.eval.bench --memory-worker '<json config>' (internal; use `ief bench`)")

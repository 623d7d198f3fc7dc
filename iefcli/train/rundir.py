"""The run directory: atomic writers and the readers other commands use.

Layout (the contract read by eval-gamma, compare, plot and --resume)::

    RUN/
      recipe.yaml              the fully resolved recipe (defaults + --set applied)
      metrics.jsonl            one JSON object per line (step, epoch, split, loss, metrics, lr, time, ...)
      checkpoints/step-<N>/    a checkpoint (see below)
      best/                    the best-validation checkpoint, same layout
      summary.json             written when the run ends (any status)

A checkpoint directory holds::

    params.safetensors         trainable parameters by name
    optimizer.safetensors      optimiser state tensors, nested keys joined by "/"
    trainer_state.json         data order + RNG state + loop counters (what --resume needs)
    meta.json                  {"step", "epoch", "metrics"}

Every file is written to a temporary name in the same directory and moved into
place with ``os.replace`` (:func:`atomic_write_bytes`); a checkpoint directory
is assembled under a hidden temporary name and renamed as a whole
(:func:`atomic_dir`), so a crash at any moment leaves the previous checkpoint
intact and loadable. Replacing ``best/`` takes two renames
(old best -> ``.best-old``, new -> ``best``); the readers fall back to
``.best-old`` if a crash happened between them.

Files and directories get the modes an ordinary ``open``/``mkdir`` would give
them (0644 / 0755 under the usual umask 022). Every file iefcli writes goes
through these writers.

Readers raise :class:`iefcli.errors.UsageError` naming the file when it is
missing or corrupt. Do not parse these files anywhere else.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

from iefcli.errors import UsageError

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
BEST_OLD_DIR = ".best-old"
PARAMS_FILE = "params.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
META_FILE = "meta.json"

# ----------------------------------------------------------------------------- writers


def _temp_sibling(path: Path, make: Callable[[Path], None]) -> Path:
    """A fresh hidden ``.NAME.<random>.tmp`` next to ``path``, created by ``make``
    (exclusively: an existing name is never reused)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            make(tmp)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: no free temporary name")


def _start_output(path: Path, make: Callable[[Path], None]) -> Path:
    """The parent folder and the hidden temporary of an output: an output that cannot be
    created at all (read-only or missing place, a file in the way) is ONE UsageError line
    naming it, before anything is written (every command's outputs come through here)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _temp_sibling(path, make)
    except OSError as e:
        raise UsageError(f"{path}: cannot write ({e.strerror or e})") from None


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory + os.replace.

    The file gets the mode an ordinary ``open(path, "w")`` would give it (0666
    less the umask: 0644 under the usual 022), never tempfile's 0600.
    """
    path = Path(path)
    fd_box: list[int] = []
    tmp = _start_output(path, lambda t: fd_box.append(os.open(t, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
    try:
        with os.fdopen(fd_box[0], "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o: Any) -> Any:
    if isinstance(o, Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _finite_or_none(o: Any) -> Any:
    """JSON has no NaN/Inf: write them as null (readers see None)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite_or_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite_or_none(v) for v in o]
    return o


def to_json(obj: Any, indent: int | None = None) -> str:
    return json.dumps(_finite_or_none(obj), default=_json_default, indent=indent, allow_nan=False)


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, to_json(obj, indent=2) + "\n")


def save_tensors_atomic(path: Path | str, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a flat name -> tensor dict as safetensors, atomically."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata=metadata))


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Tensor]:
    """Nested dict of tensors -> flat dict with keys joined by "/"."""
    out: dict[str, Tensor] = {}
    for k, v in tree.items():
        if "/" in k:
            raise ValueError(f"state key {k!r} must not contain '/'")
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_tree(v, key + "/"))
        elif isinstance(v, Tensor):
            out[key] = v
        else:
            raise TypeError(f"state entry {key!r} is a {type(v).__name__}, not a tensor")
    return out


def unflatten_tree(flat: Mapping[str, Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        parts = key.split("/")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


class MetricsWriter:
    """Appends one JSON object per line to metrics.jsonl, flushed per line.

    Appending is not atomic per file, but a torn last line is the only possible
    damage and :func:`read_metrics` skips it.
    """

    def __init__(self, run_dir: Path | str, *, truncate_after_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        if truncate_after_step is not None and self.path.exists():
            # On resume: drop lines logged after the checkpoint we restart from, and the
            # end-of-run test line (it is written again when the resumed run ends).
            keep = [r for r in read_metrics(run_dir)
                    if (r.get("step") or 0) <= truncate_after_step and r.get("split") != "test"]
            atomic_write_text(self.path, "".join(to_json(r) + "\n" for r in keep))
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        self._f.write(to_json(dict(record)) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


@contextlib.contextmanager
def atomic_dir(dest: Path | str, old: Path | str | None = None) -> Iterator[Path]:
    """Assemble a directory under a hidden temporary sibling of ``dest`` and put it
    in place as ``dest`` when the block ends without an error (:func:`replace_dir`;
    an existing ``dest`` is moved to ``old``, default ``.NAME.old``, then removed).
    On an error the temporary is removed and ``dest`` is untouched.

    The directory gets the mode of an ordinary ``mkdir`` (0777 less the umask:
    0755 under the usual 022), never tempfile's 0700::

        with atomic_dir(out) as tmp:
            atomic_write_text(tmp / "a.csv", text)
    """
    dest = Path(dest)
    tmp = _start_output(dest, lambda t: t.mkdir())
    try:
        yield tmp
        replace_dir(tmp, dest, Path(old) if old is not None else dest.parent / f".{dest.name}.old")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(
    ckpt_dir: Path | str,
    *,
    params: Mapping[str, Tensor],
    optimizer_state: Mapping[str, Any],
    trainer_state: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> Path:
    """Write a complete checkpoint to ``ckpt_dir`` atomically (replacing any old one)."""
    ckpt_dir = Path(ckpt_dir)
    old = ckpt_dir.parent / BEST_OLD_DIR if ckpt_dir.name == BEST_DIR else None
    with atomic_dir(ckpt_dir, old) as tmp:
        save_tensors_atomic(tmp / PARAMS_FILE, params)
        save_tensors_atomic(tmp / OPTIMIZER_FILE, flatten_tree(optimizer_state))
        atomic_write_json(tmp / TRAINER_STATE_FILE, trainer_state)
        atomic_write_json(tmp / META_FILE, meta)
    return ckpt_dir


def replace_dir(tmp: Path, dest: Path, old: Path) -> None:
    """Put the complete directory ``tmp`` in place as ``dest``.

    An existing ``dest`` is first renamed to ``old`` (removed once the new one is
    in place), so at every moment either the previous or the new directory is
    complete at ``dest`` or ``old``: never a half-written one.
    """
    if dest.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def checkpoint_dir(run_dir: Path | str, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{step}"


def remove_stale_temps(run_dir: Path | str) -> None:
    """Delete hidden temporaries a crash may have left (never a complete checkpoint)."""
    run_dir = Path(run_dir)
    for parent in (run_dir, run_dir / CHECKPOINTS_DIR):
        if parent.is_dir():
            for p in parent.glob(".*.tmp"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- readers


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read {what}: {e}") from None


def _read_json(path: Path, what: str) -> Any:
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: corrupt {what} (invalid JSON: {e.msg} at line {e.lineno})") from None


def _require_run_dir(run_dir: Path | str) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: run directory not found")
    return run_dir


def load_recipe(run_dir: Path | str):
    """The run's resolved recipe (a validated :class:`iefcli.train.recipe.Recipe`)."""
    from iefcli.train.recipe import load_recipe_file

    run_dir = _require_run_dir(run_dir)
    path = run_dir / RECIPE_FILE
    if not path.is_file():
        raise UsageError(f"{path}: recipe not found (is {run_dir} a run directory?)")
    return load_recipe_file(path)


def read_metrics(run_dir: Path | str) -> list[dict]:
    """Every record of metrics.jsonl, in file order. A torn LAST line is skipped;
    a corrupt line elsewhere raises UsageError."""
    run_dir = _require_run_dir(run_dir)
    path = run_dir / METRICS_FILE
    lines = _read_text(path, "metrics file").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn write of the last line (a crash mid-append)
            raise UsageError(f"{path}: corrupt metrics file (line {i + 1} is not JSON)") from None
        if not isinstance(rec, dict):
            raise UsageError(f"{path}: corrupt metrics file (line {i + 1} is not an object)")
        out.append(rec)
    return out


def read_summary(run_dir: Path | str) -> dict:
    run_dir = _require_run_dir(run_dir)
    path = run_dir / SUMMARY_FILE
    obj = _read_json(path, "summary")
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: corrupt summary (not a JSON object)")
    return obj


def _step_of(p: Path) -> int | None:
    name = p.name
    if not name.startswith("step-"):
        return None
    try:
        return int(name[5:])
    except ValueError:
        return None


def list_checkpoints(run_dir: Path | str) -> list[tuple[int, Path]]:
    """[(step, path)] of the complete step checkpoints, in step order."""
    run_dir = _require_run_dir(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        step = _step_of(p)
        if step is not None and p.is_dir() and (p / PARAMS_FILE).is_file():
            found.append((step, p))
    return sorted(found)


def is_checkpoint(path: Path | str) -> bool:
    return (Path(path) / PARAMS_FILE).is_file()


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint directory as given, or a run directory -> its best/ checkpoint
    (falling back to ``.best-old`` after an interrupted replace, then to the last step checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: checkpoint or run directory not found")
    if is_checkpoint(path):
        return path
    for cand in (path / BEST_DIR, path / BEST_OLD_DIR):
        if is_checkpoint(cand):
            return cand
    if path.is_dir() and (path / RECIPE_FILE).is_file():
        ckpts = list_checkpoints(path)
        if ckpts:
            return ckpts[-1][1]
        raise UsageError(f"{path}: run directory has no checkpoint yet")
    raise UsageError(f"{path}: not a checkpoint directory ({PARAMS_FILE} missing) nor a run directory")


def load_checkpoint_params(ckpt_dir: Path | str, device: torch.device | str | None = None) -> dict[str, Tensor]:
    """The trainable parameters saved in a checkpoint (a run dir resolves to best/)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt = resolve_checkpoint(ckpt_dir)
    path = ckpt / PARAMS_FILE
    try:
        return load_file(str(path), device=str(device) if device is not None else "cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"{path}: corrupt parameters file: {e}") from None


def load_params(
    own: Mapping[str, Tensor],
    ckpt: Path | str,
    *,
    where: str | None = None,
    allow_missing: bool = False,
) -> dict[str, Tensor]:
    """The parameters a checkpoint holds for a model whose parameters are ``own``.

    ``ckpt`` is a checkpoint directory, or a run directory (-> its best/, see
    :func:`resolve_checkpoint`). The one strictness rule: every saved name must be
    one of ``own``'s with the same shape, and every name of ``own`` must be saved
    unless ``allow_missing`` (a partial load: initialising from, or transferring
    into, a model with more parameters than the checkpoint). Returns the saved
    tensors on each own tensor's device and dtype, in ``own``'s order.

    Errors: one :class:`UsageError` line naming the file, prefixed by ``where``
    (a recipe key or an option) when given.
    """
    prefix = f"{where}: " if where else ""
    try:
        path = resolve_checkpoint(Path(ckpt).expanduser()) / PARAMS_FILE
        saved = load_checkpoint_params(path.parent)
    except UsageError as e:
        raise UsageError(f"{prefix}{e}") from None
    for k, v in saved.items():
        if k not in own:
            raise UsageError(f"{prefix}{path}: parameter {k!r} is not in the model (the checkpoint is of another model)")
        if tuple(v.shape) != tuple(own[k].shape):
            raise UsageError(f"{prefix}{path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    if not allow_missing:
        missing = [k for k in own if k not in saved]
        if missing:
            raise UsageError(f"{prefix}{path}: parameter {missing[0]!r} of the model is missing")
    return {k: saved[k].to(device=ref.device, dtype=ref.dtype) for k, ref in own.items() if k in saved}


def load_optimizer_state(ckpt_dir: Path | str, device: torch.device | str | None = None) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / OPTIMIZER_FILE
    if not path.is_file():
        raise UsageError(f"{path}: optimizer state not found")
    try:
        flat = load_file(str(path), device=str(device) if device is not None else "cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"{path}: corrupt optimizer state: {e}") from None
    return unflatten_tree(flat)


def checkpoint_meta(ckpt_dir: Path | str) -> dict:
    """meta.json of a checkpoint: {"step", "epoch", "metrics"} (a run dir resolves to best/)."""
    ckpt = resolve_checkpoint(ckpt_dir)
    path = ckpt / META_FILE
    obj = _read_json(path, "checkpoint metadata")
    if not isinstance(obj, dict) or "step" not in obj:
        raise UsageError(f"{path}: corrupt checkpoint metadata (no 'step')")
    return obj


def read_trainer_state(ckpt_dir: Path | str) -> dict:
    path = Path(ckpt_dir) / TRAINER_STATE_FILE
    obj = _read_json(path, "trainer state")
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: corrupt trainer state")
    return obj


def is_nonempty_dir(path: Path | str) -> bool:
    p = Path(path)
    return p.is_dir() and any(p.iterdir())


# ----------------------------------------------------------------------------- checks before work


def check_writable(path: Path | str, what: str) -> None:
    """Refuse (one UsageError line naming ``what`` and the path) an output location that
    cannot be written: ``path`` itself when it exists, else its nearest existing ancestor
    must be a directory in which a file can be created. Checked before any work is done,
    by a real probe (a hidden temporary file, removed at once), not permission bits."""
    path = Path(path)
    target = path
    while not target.exists():
        if target.parent == target:
            break
        target = target.parent
    if target.exists() and not target.is_dir():
        where = "exists and is not a directory" if target == path else f"{target} is not a directory"
        raise UsageError(f"{what} {path}: {where}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ief-write-probe-", suffix=".tmp", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{what} {path}: not writable: cannot create a file in {target} ({e.strerror or e})") from None


def check_finite_params(params: Mapping[str, Tensor], path: Path | str) -> None:
    """A checkpoint never holds NaN/Inf parameters; refuse one that does (forged or damaged)."""
    for k, v in params.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise UsageError(f"{path}: parameter {k} holds NaN/Inf values")


def _brief(v: Any, limit: int = 40) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def check_optimizer_state(fresh: Mapping[str, Any], loaded: Mapping[str, Any], path: Path | str,
                          params: Mapping[str, Tensor] | None = None) -> None:
    """Every saved optimiser state tensor that the fresh state also has (torch.optim's have none
    before their first step) must have its shape; none may hold NaN/Inf; the top-level keys must
    be this optimiser's."""
    flat_fresh, flat_loaded = flatten_tree(fresh), flatten_tree(loaded)
    for k in loaded:
        if k not in fresh:
            raise UsageError(f"{path}: optimizer state entry {_brief(k, 60)} is not one of this optimiser's")
    for k, v in flat_loaded.items():
        if k in flat_fresh and tuple(v.shape) != tuple(flat_fresh[k].shape):
            raise UsageError(f"{path}: optimizer state {k} has shape {tuple(v.shape)}, "
                             f"expected {tuple(flat_fresh[k].shape)}")
        owner = k.split("/", 1)[0]
        if (k not in flat_fresh and params is not None and owner in params
                and v.numel() > params[owner].numel()):  # torch.optim's lazily created per-parameter state
            raise UsageError(f"{path}: optimizer state {k} has shape {tuple(v.shape)}, "
                             f"larger than its parameter {tuple(params[owner].shape)}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise UsageError(f"{path}: optimizer state {k} holds NaN/Inf values")


def check_trainer_state(ckpt: Path | str, ts: Mapping[str, Any], total_steps: int) -> None:
    """The trainer state of a step checkpoint, checked before a resume trusts it: its step is
    the checkpoint's own (step-N), within the run's planned steps, and every field has its type."""
    ckpt = Path(ckpt)
    path = ckpt / TRAINER_STATE_FILE

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    step = ts.get("step")
    if not is_int(step) or step < 0:
        raise UsageError(f"{path}: corrupt trainer state (step {_brief(step)} is not a step number)")
    own = _step_of(ckpt)
    if own is not None and step != own:
        raise UsageError(f"{path}: corrupt trainer state (step {step} in checkpoint {ckpt.name})")
    if step > total_steps:
        raise UsageError(f"{path}: trainer state at step {step}, beyond the run's {total_steps} steps")
    best_step = ts.get("best_step")
    if best_step is not None and not (is_int(best_step) and 0 <= best_step <= step):
        raise UsageError(f"{path}: corrupt trainer state (best_step {_brief(best_step)})")
    best = ts.get("best_metric")
    if best is not None and not is_num(best):
        raise UsageError(f"{path}: corrupt trainer state (best_metric {_brief(best)})")
    bad = ts.get("bad_steps", 0)
    if not is_int(bad) or bad < 0:
        raise UsageError(f"{path}: corrupt trainer state (bad_steps {_brief(bad)})")
    el = ts.get("elapsed_s", 0.0)
    if not is_num(el) or el < 0:
        raise UsageError(f"{path}: corrupt trainer state (elapsed_s {_brief(el)})")
    rl = ts.get("recent_losses", [])
    if not isinstance(rl, list) or not all(is_num(x) for x in rl):
        raise UsageError(f"{path}: corrupt trainer state (recent_losses)")

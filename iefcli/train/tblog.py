"""TensorBoard event files beside metrics.jsonl (optional: needs the ``tensorboard`` package).

:func:`open_metrics_writer` returns the run's metrics writer: the usual
:class:`iefcli.train.rundir.MetricsWriter`, and when TensorBoard is wanted and
installed, a :class:`TensorBoardWriter` fed the same records, through
``torch.utils.tensorboard.SummaryWriter`` into ``RUN/tensorboard/``. Each numeric
field of a record becomes the scalar ``<split>/<field>`` at ``step`` (``train/loss``,
``val/accuracy``, ``train/lr``, ``train/step_time_s``, the optimiser diagnostics);
the bookkeeping fields (step, epoch, time, split, event, checkpoint) and
non-finite values are left out. On ``--resume`` the event log is purged after
the checkpoint's step, as metrics.jsonl is, so the curves read as one run.

``mode``: ``auto`` (write them when tensorboard is installed), ``on`` (a
UsageError naming the install command when it is not), ``off``.
metrics.jsonl stays the contract other commands read; the event files are for
people (``tensorboard --logdir runs``).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Mapping

from iefcli.errors import UsageError
from iefcli.train.rundir import MetricsWriter

TB_DIR = "tensorboard"
MODES = ("auto", "on", "off")
SKIP = frozenset({"step", "epoch", "time", "split", "event", "checkpoint", "skipped"})
INSTALL_HINT = "pip install tensorboard  (or: pip install 'iefcli[tensorboard]')"


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardWriter:
    """Scalars of metrics records -> TensorBoard event files in ``run_dir/tensorboard``."""

    def __init__(self, run_dir: Path | str, *, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / TB_DIR
        self._w = SummaryWriter(log_dir=str(self.path), purge_step=purge_step)

    def write(self, record: Mapping[str, Any]) -> None:
        step, split = record.get("step"), record.get("split")
        if step is None or split is None:
            return
        for k, v in record.items():
            if k in SKIP or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not math.isfinite(v):
                continue
            self._w.add_scalar(f"{split}/{k}", float(v), global_step=int(step))
        if split != "train":  # train lines: the writer's own periodic flush (and close); a flush
            self._w.flush()   # per train line cost ~2-5 ms of waiting on the writer thread

    def close(self) -> None:
        self._w.close()


class TeeWriter:
    """The metrics writer plus extra writers: ``write`` and ``close`` go to all of them
    (the metrics file first: it is the contract)."""

    def __init__(self, primary: Any, *others: Any):
        self.primary, self.others = primary, list(others)

    @property
    def path(self) -> Path:
        return self.primary.path

    def write(self, record: Mapping[str, Any]) -> None:
        self.primary.write(record)
        for w in self.others:
            w.write(record)

    def close(self) -> None:
        try:
            self.primary.close()
        finally:
            for w in self.others:
                w.close()


def open_metrics_writer(run_dir: Path | str, *, truncate_after_step: int | None = None, mode: str = "auto") -> Any:
    """metrics.jsonl writer (as :class:`~iefcli.train.rundir.MetricsWriter`), teed to TensorBoard per ``mode``
    (``True``/``False``, YAML's reading of a bare on/off, mean "on"/"off")."""
    if isinstance(mode, bool):
        mode = "on" if mode else "off"
    if mode not in MODES:
        raise UsageError(f"output.tensorboard: must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "on" and not tensorboard_available():
        raise UsageError(f"output.tensorboard: on needs the tensorboard package: {INSTALL_HINT}")
    metrics = MetricsWriter(run_dir, truncate_after_step=truncate_after_step)
    if mode == "off" or not tensorboard_available():
        return metrics
    purge = truncate_after_step + 1 if truncate_after_step is not None else None
    return TeeWriter(metrics, TensorBoardWriter(run_dir, purge_step=purge))

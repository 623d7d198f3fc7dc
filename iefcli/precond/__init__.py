"""iEF in the user's own training loop: :class:`Preconditioner` (any torch.optim optimiser
steps the direction it writes into ``.grad``) and :class:`IEF` (a torch.optim.Optimizer).
See docs/library.md. The Hugging Face Trainer callback is :class:`iefcli.hf.trainer.IEFCallback`."""

from iefcli.precond.losses import resolve_loss
from iefcli.precond.optim import IEF
from iefcli.precond.preconditioner import SUPPORTED_METHODS, Preconditioner
from iefcli.precond.kfac import KFAC, KFACPreconditioner  # noqa: E402  (method="kfac"|"ekfac"|"iekfac")

__all__ = ["Preconditioner", "IEF", "SUPPORTED_METHODS", "resolve_loss", "bench_loop", "KFAC", "KFACPreconditioner"]


def __getattr__(name):
    if name == "bench_loop":  # imported on use (it builds models)
        from iefcli.precond.bench import bench_loop

        return bench_loop
    raise AttributeError(name)

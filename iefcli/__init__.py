"""iefcli: the improved empirical Fisher (iEF) natural-gradient optimiser, as a library and a CLI.

``iefcli.Preconditioner`` and ``iefcli.IEF`` (iEF/EF/SF in your own torch loop) are imported on first
use, so that ``import iefcli`` (and the CLI's start-up) stays light.
"""

__version__ = "0.1.0"

__all__ = ["IEF", "Preconditioner", "__version__", "KFAC"]


def __getattr__(name: str):
    if name in ("Preconditioner", "IEF", "KFAC"):
        from iefcli import precond

        return getattr(precond, name)
    raise AttributeError(f"module 'iefcli' has no attribute {name!r}")

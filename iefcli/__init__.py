"""iefcli: the improved empirical Fisher (iEF) natural-gradient optimiser, as a library and a CLI."""

__version__ = "0.1.0"

"""One module per CLI command; each exposes ``register(app)``.

Command modules import only typer/rich at import time (so ``ief --help`` is
fast) and import torch and the heavy code inside the command body.
"""

"""Shared pytest set-up: put tests/ on sys.path so test files can
``from cases import make_case`` and ``import reference``."""

from __future__ import annotations

import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

# Seven agents share two cores; tiny tensors gain nothing from more threads.
torch.set_num_threads(1)

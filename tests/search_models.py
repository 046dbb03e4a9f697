"""Importable model factories for the search tests (stored candidates rebuild from them)."""
from __future__ import annotations

from torch import nn

import mm_jupyter as mm


@mm.architecture
def mlp(inputs: int = 16, classes: int = 4) -> nn.Module:
    """Three feature blocks (Linear + ReLU) and a Linear head."""
    return nn.Sequential(nn.Linear(inputs, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, classes))

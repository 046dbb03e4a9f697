"""Importable models for the serving tests (architectures are recorded by class path)."""
from __future__ import annotations

import torch
from torch import nn


class ItemNet(nn.Module):
    """A model ``torch.func.vmap`` cannot batch: its forward reads a Python number from a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + 0.0 * float(x.sum().item())
        return self.l(x) * scale

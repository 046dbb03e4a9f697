"""Importable model factories for the search tests (stored candidates rebuild from them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import mm_jupyter as mm


@mm.architecture
def mlp(inputs: int = 16, classes: int = 4) -> nn.Module:
    """Three feature blocks (Linear + ReLU) and a Linear head."""
    return nn.Sequential(nn.Linear(inputs, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, classes))


class BasicBlock(nn.Module):
    """A ResNet basic block: two 3x3 convolutions with batch norm and a residual connection
    (a 1x1 projection when the width or stride changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """A ResNet-like classifier as users write it: a stem, a ``ModuleList`` of residual blocks walked
    in ``forward`` (every second one halving the resolution), global pooling and a Linear head."""

    def __init__(self, width: int = 8, depth: int = 3, classes: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.layers = nn.ModuleList(
            BasicBlock(width * (1 + (i > 1)), width * (1 + (i >= 1)), 2 if i == 1 else 1) for i in range(depth))
        self.fc = nn.Linear(width * (1 + (depth > 1)), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


@mm.architecture
def tiny_resnet(width: int = 8, depth: int = 3) -> nn.Module:
    """TinyResNet with constructor arguments, rebuildable from the store."""
    return TinyResNet(width=width, depth=depth)


def assert_search_agrees(cands: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, batch_size: int = 12) -> None:
    """Alsatian and shift rank ``cands`` the same with the same scores; every shared block runs once."""
    shared = mm.search(cands, (x, y), k=1, approach="alsatian", batch_size=batch_size)
    whole = mm.search(cands, (x, y), k=1, approach="shift", batch_size=batch_size)
    assert list(shared.ranking["model"]) == list(whole.ranking["model"])
    assert list(shared.ranking["score"]) == list(whole.ranking["score"])
    st = shared.stats
    assert st["block_inferences"] == st["unique_edges"] < whole.stats["block_inferences"]

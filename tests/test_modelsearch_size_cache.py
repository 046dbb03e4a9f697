"""The remembered output sizes (``blocks.cached_output_sizes``) are never served to a changed model
or a different input."""
from __future__ import annotations

import torch
from torch import nn

from mm_jupyter.modelsearch import blocks
from mm_jupyter.modelsearch.blocks import cached_output_sizes
from mm_jupyter.modelsearch.hashing import block_ids
from mm_jupyter.modelsearch.verify import verified_split


class Tile(nn.Module):
    """Output width set by a plain attribute: no parameter shape shows it."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.times = times

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(1, self.times, 1)


class Mean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


def _model(times: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), Tile(times), nn.Linear(6, 6), Mean(), nn.Linear(6, 3))


def _sizes(model: nn.Module, x: torch.Tensor) -> list[int]:
    split = verified_split(model, x)
    assert split.architecture is not None
    return cached_output_sizes(split, block_ids(split.blocks), x)


def test_sizes_are_remembered(monkeypatch) -> None:
    x = torch.randn(5, 1, 4)
    first = _sizes(_model(), x)
    calls = []
    real = blocks.output_sizes
    monkeypatch.setattr(blocks, "output_sizes", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert _sizes(_model(), x) == first
    assert calls == []  # the same architecture, weights and item: served from the cache


def test_changed_attribute_is_measured_again() -> None:
    x = torch.randn(5, 1, 4)
    model = _model(2)
    two = _sizes(model, x)
    model[1].times = 3  # the same object, same parameters: only the attribute says the width changed
    three = _sizes(model, x)
    assert three != two
    assert three == blocks.output_sizes(verified_split(model, x), x)


def test_changed_weights_and_input_are_measured_again(monkeypatch) -> None:
    x = torch.randn(5, 1, 4)
    model = _model()
    _sizes(model, x)
    calls = []
    real = blocks.output_sizes
    monkeypatch.setattr(blocks, "output_sizes", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    _sizes(model, x)
    assert len(calls) == 1  # new block ids: measured, not served
    _sizes(model, x + 1)
    assert len(calls) == 2  # a different item: measured
    _sizes(model, x.double().float().clone())
    assert len(calls) == 2  # the same item's bytes again: served

"""A block that writes its input in place must not change what the other candidates sharing that
input read: Alsatian runs a shared prefix once and hands its output to every child block."""
from __future__ import annotations

import copy

import torch
from torch import nn

import mm_jupyter as mm


class ScaleInPlace(nn.Module):
    """A layer with a parameter (so it starts a block of its own) that multiplies its input in place."""

    def __init__(self, width: int, scale: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((width,), scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.w)


def candidates() -> dict[str, nn.Module]:
    g = torch.Generator().manual_seed(4)
    trunk = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU())
    with torch.no_grad():
        for p in trunk.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    out: dict[str, nn.Module] = {}
    for i in range(4):
        layers: list[nn.Module] = [copy.deepcopy(trunk)]
        if i != 1:  # three of them write the shared trunk's output (whichever runs first, the others would read it)
            layers.append(ScaleInPlace(24, 2.0 + i))
        layers += [nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4)]
        m = nn.Sequential(*layers)
        with torch.no_grad():
            for p in list(m.parameters())[4:]:
                if p.dim() > 1 or p.shape != (24,):  # (the scale stays as set)
                    p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        out[f"c{i}"] = m
    return out


def test_a_block_writing_its_input_changes_no_other_candidate_s_features() -> None:
    cands = candidates()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    before = x.clone()
    whole = mm.search(cands, (x, y), k=1, approach="shift", device="cpu", batch_size=32)  # each candidate whole
    shared = mm.search(cands, (x, y), k=1, approach="alsatian", device="cpu", batch_size=32)
    assert torch.equal(x, before), "the caller's data is never written"
    assert shared.stats["block_inferences"] < whole.stats["block_inferences"], "the trunk is shared"
    cols = ["model", "score", "loss", "rung"]
    assert whole.ranking[cols].equals(shared.ranking[cols]), (whole.ranking, shared.ranking)


def test_features_of_an_earlier_layer_are_not_written_by_the_block_after_it() -> None:
    """With layers as arms, a block's output is both an arm's features and the next block's input."""
    cands = candidates()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 2] > 0).long()
    whole = mm.search(cands, (x, y), k=1, approach="shift", device="cpu", batch_size=32, layers=2)
    shared = mm.search(cands, (x, y), k=1, approach="alsatian", device="cpu", batch_size=32, layers=2)
    cols = ["model", "layer", "score", "loss", "rung"]
    assert whole.ranking[cols].equals(shared.ranking[cols]), (whole.ranking, shared.ranking)

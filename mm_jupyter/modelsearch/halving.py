"""Successive halving: rungs of doubling training data, half of the candidates pruned per rung."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Rung:
    """Rung ``index`` scores ``models`` candidates on the first ``items`` training items and keeps
    ``keep`` of them."""

    index: int
    models: int
    items: int
    keep: int


def schedule(models: int, k: int, train_items: int, eta: int = 2, halving: bool = True) -> list[Rung]:
    """Rungs until ``k`` candidates remain; the last rung uses all training items, each earlier
    rung half of the next. No rung is spent once ``k`` or fewer candidates are left; with nothing
    to prune (or ``halving=False``) one rung scores everyone on all data."""
    if eta < 2:
        raise ValueError(f"eta must be at least 2, not {eta}")
    counts = []
    c = models
    while halving and c > k:
        counts.append(c)
        c = max(k, math.ceil(c / eta))
    if not counts:
        return [Rung(0, models, train_items, min(models, k) if halving else models)]
    last = len(counts) - 1
    rungs = []
    for r, c in enumerate(counts):
        items = max(1, math.ceil(train_items / 2 ** (last - r)))
        rungs.append(Rung(r, c, items, max(k, math.ceil(c / eta))))
    return rungs

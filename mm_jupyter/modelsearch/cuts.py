"""A model cut into blocks by one named method, unverified (``blocks.py`` lists the methods;
``splitting.py`` proves a cut before the search uses it)."""
from __future__ import annotations

from torch import Tensor, nn

from .blocks import Block, Split, declared_split, sequential_split
from .hf import split_hf
from .traced import traced_blocks


def split_by(model: nn.Module, method: str, probe: Tensor | None = None, recipe: object = None) -> Split:
    """``model`` cut by one method (unverified); the Hugging Face rule observes ``probe`` or
    follows ``recipe`` (a verified split's)."""
    if method == "declared":
        return declared_split(model)
    if method == "sequential":
        return sequential_split(model)
    if method == "hf":

        return split_hf(model, probe, recipe)  # type: ignore[arg-type]

    blocks, head = traced_blocks(model)
    return Split([Block(b) for b in blocks], head, "traced")


__all__ = ["split_by"]

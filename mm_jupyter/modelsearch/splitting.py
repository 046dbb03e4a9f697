"""The block view the search uses: a model's split, verified on a probe batch where one is given."""
from __future__ import annotations

from torch import Tensor, nn

from .blocks import Split, methods
from .cuts import split_by
from .verify import verified_split


def split_model(model: nn.Module, probe: Tensor | None = None) -> Split:
    """The block view of ``model``: declared blocks, the Sequential rule, the Hugging Face rule, or
    else the traced graph (``traced.py``); a SearchError naming the class when it has none.

    With a ``probe`` batch (what ``mm.search`` passes: the first items of its data) the split is
    verified: its composed blocks must reproduce the model's own features on the probe, else the
    next method is tried and, when none does, a SearchError names the block where they diverge
    (``verify.py``; verdicts are cached per architecture). Hugging Face models are always verified,
    on a probe made from their config when none is given."""
    if probe is not None or "hf" in methods(model)[:1]:
        return verified_split(model, probe)
    return split_by(model, methods(model)[0])


__all__ = ["split_model"]

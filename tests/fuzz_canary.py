"""A module no store record may make a process import: importing it writes the fuzzer's sentinel.

The store fuzzer (tests/test_store_fuzz.py) names it in records; the trust gate must refuse it
before importing it, so the sentinel file never appears.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

_SENTINEL = os.environ.get("MM_FUZZ_SENTINEL")
if _SENTINEL:
    Path(_SENTINEL).write_text("fuzz_canary was imported\n")


class Boom(nn.Module):
    """An nn.Module class of the canary module (a record naming it must not import the module)."""

    def forward(self, x: object) -> object:
        return x


def boom(*args: object, **kwargs: object) -> None:
    """A function of the canary module."""
    if _SENTINEL:
        Path(_SENTINEL).write_text("fuzz_canary.boom ran\n")

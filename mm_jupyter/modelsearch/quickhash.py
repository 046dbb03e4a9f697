"""A fast keyed hash that tells whether bytes are the ones a remembered result was computed from.

XXH3-128 runs at memory speed (~9x sha256 here). Its key is drawn per process, so no bytes can be
prepared to collide with a remembered digest; a digest never leaves the process (store keys and
ids stay sha256). A leaf module without torch: ``lake.py`` needs it at import time.
"""
from __future__ import annotations

import os
from typing import Any

import xxhash

#: XXH3's key, drawn per process
_SEED = int.from_bytes(os.urandom(8), "little")


def quick_hash() -> Any:
    """A fresh 128-bit XXH3 state keyed with this process's secret (``update``, ``digest``)."""
    return xxhash.xxh3_128(seed=_SEED)


__all__ = ["quick_hash"]

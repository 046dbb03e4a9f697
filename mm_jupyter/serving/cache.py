"""The prediction cache: a bounded LRU of answers keyed by (set version, model, input digest).

The version is the catalog id of the set version that computed the answer, so an answer of one
version can never be returned for another; the server also clears the cache when it switches
versions, so old answers do not hold memory.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Hashable

import numpy as np

if TYPE_CHECKING:
    import torch

Key = tuple[int, str, bytes]  # (set version id, model name, input digest)


def input_digest(x: np.ndarray) -> bytes:
    """16-byte BLAKE2b digest of a C-contiguous array's dtype, shape and bytes."""
    h = hashlib.blake2b(x.data, digest_size=16)
    h.update(f"{x.dtype.str}{x.shape}".encode())
    return h.digest()


class PredictionCache:
    """Thread-safe LRU of at most ``size`` answers (``size=0`` disables it). Stored tensors are
    private copies and a hit returns a fresh copy, so callers may modify what they get."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"cache size must be >= 0, not {size}")
        self.size = size
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[Hashable, "torch.Tensor"] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Key) -> "torch.Tensor | None":
        """The cached answer (a copy) or None; counts a hit or a miss."""
        if not self.size:
            return None
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
        return value.clone()

    def put(self, key: Key, value: "torch.Tensor") -> None:
        if not self.size:
            return
        copy = value.detach().clone()
        with self._lock:
            self._items[key] = copy
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def resize(self, size: int) -> None:
        """Keep at most ``size`` answers from now on (0 turns the cache off and empties it)."""
        if size < 0:
            raise ValueError(f"cache size must be >= 0, not {size}")
        with self._lock:
            self.size = size
            while len(self._items) > size:
                self._items.popitem(last=False)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

"""Small synthetic image data for the CNN use case (CIFAR-shaped, generated from a seed).

Every class has a fixed smooth pattern; an image is its class pattern plus seeded noise, so a
CNN can actually learn something. Pure numpy with explicit seeds: the same arguments give
bit-identical tensors in every process (what provenance-based recovery relies on).
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from ..store.provenance import DatasetRef
from ..store.trust import trusted

if TYPE_CHECKING:
    import torch

#: Loader reference recorded in provenance.
LOADER = "mm_jupyter.usecases.images:random_images"
CLASSES = 10
SHAPE = (3, 32, 32)
NOISE = 0.5


@lru_cache(maxsize=1)
def _patterns() -> np.ndarray:
    """(CLASSES, 3, 32, 32) float32: one low-frequency colour pattern per class."""
    rng = np.random.default_rng(20240601)
    coarse = rng.standard_normal((CLASSES, SHAPE[0], 4, 4))
    return np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3).astype(np.float32)


def image_arrays(seed: int, n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` as numpy arrays: float32 (n, 3, 32, 32) and int64 (n,) labels in [0, 10)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, not {n}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(n)])
    y = rng.integers(0, CLASSES, size=n).astype(np.int64)
    x = _patterns()[y] + NOISE * rng.standard_normal((n, *SHAPE)).astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32), y


@trusted
def random_images(seed: int, n: int = 32) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Deterministic image classification data: ``(X float32 (n, 3, 32, 32), y int64 (n,))``."""
    import torch

    x, y = image_arrays(seed, n)
    return torch.from_numpy(x), torch.from_numpy(y)


def image_seed(model: int, version: int) -> int:
    """The data seed of model ``model``'s dataset at ``version`` (distinct for every pair)."""
    return int(model) * 1_000 + int(version)


def image_ref(model: int, version: int = 0, n: int = 32) -> DatasetRef:
    """``DatasetRef`` of ``random_images(image_seed(model, version), n)`` for provenance."""
    return DatasetRef(LOADER, {"seed": image_seed(model, version), "n": int(n)})

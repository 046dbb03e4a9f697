"""Importable training functions for the provenance tests (recorded as ``provenance_helpers:...``).

The tests put this folder on ``sys.path`` (and on ``PYTHONPATH`` for subprocesses), so the
recorded reference resolves the same way in a fresh process.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

import mm_jupyter as mm
from mm_jupyter.usecases.training import train

#: Every call of a training function below appends one line to the file named by this variable.
LOG_ENV = "MM_TEST_TRAIN_LOG"


def _log(what: str) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(what + "\n")


def calls(path: str | os.PathLike[str]) -> list[str]:
    """The logged calls (one entry per training run)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except FileNotFoundError:
        return []


def _xy(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Data saved as one (n, 6) .npy array: five features, then the target."""
    arr = np.asarray(data, dtype=np.float32)
    return torch.from_numpy(arr[:, :5].copy()), torch.from_numpy(arr[:, 5:].copy())


@mm.trusted
def counting_train(model: torch.nn.Module, data: Any, config: dict[str, Any]) -> None:
    """Deterministic training on an (n, 6) array that logs each call."""
    _log("counting_train")
    train(model, _xy(data), config)


@mm.trusted
def noisy_train(model: torch.nn.Module, data: Any, config: dict[str, Any]) -> None:
    """Deterministic training, then OS-entropy noise on the last layer's bias only: not reproducible."""
    _log("noisy_train")
    train(model, data, config)
    noise = np.frombuffer(os.urandom(4), dtype=np.uint32)[0] / 2**32
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias.add_(float(noise) * 1e-3 + 1e-6)


#: While this variable is set, ``failing_when_asked`` raises the user's own error.
FAIL_ENV = "MM_TEST_TRAIN_FAIL"


@mm.trusted
def failing_when_asked(model: torch.nn.Module, data: Any, config: dict[str, Any]) -> None:
    """``counting_train``, or a ValueError of the user's own while ``$MM_TEST_TRAIN_FAIL`` is set."""
    if os.environ.get(FAIL_ENV):
        raise ValueError("the user's training code failed here")
    counting_train(model, data, config)


@mm.trusted
def noisy_when_asked(model: torch.nn.Module, data: Any, config: dict[str, Any]) -> None:
    """``noisy_train`` for models whose config says ``noisy``, deterministic training otherwise."""
    config = dict(config)
    if config.pop("noisy", False):
        noisy_train(model, data, config)
    else:
        _log("train")
        train(model, data, config)

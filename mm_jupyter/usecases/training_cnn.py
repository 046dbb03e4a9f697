"""Training of the CNN use case: cross-entropy classification, deterministic on CPU.

``train`` is referenced as ``"mm_jupyter.usecases.training_cnn:train"`` by ``mm.Provenance``. It
only uses torch's global RNG (for shuffling) and deterministic CPU kernels, so running it under
``mm_jupyter.store.provenance.deterministic(seed)`` reproduces it bit for bit on the same software
environment.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..store.trust import trusted
from .models import cnn, seeded_models
from .training import SCOPES, last_linear

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULTS: dict[str, Any] = {"epochs": 3, "lr": 0.05, "batch_size": 16, "scope": "all"}
#: Reference recorded in provenance.
TRAIN = "mm_jupyter.usecases.training_cnn:train"


def _config(config: dict[str, Any] | None) -> dict[str, Any]:
    unknown = sorted(set(config or {}) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown training config keys {unknown}; known: {sorted(DEFAULTS)}")
    cfg = DEFAULTS | dict(config or {})
    if cfg["scope"] not in SCOPES:
        raise ValueError(f"training scope must be one of {SCOPES}, not {cfg['scope']!r}")
    if int(cfg["epochs"]) < 0 or int(cfg["batch_size"]) < 1:
        raise ValueError("epochs must be >= 0 and batch_size >= 1")
    return cfg


@trusted
def train(model: "nn.Module", data: tuple["torch.Tensor", "torch.Tensor"], config: dict[str, Any]) -> None:
    """Train ``model`` in place on ``data = (X (n, C, H, W), y int64 (n,))``: SGD with momentum on
    the cross-entropy loss.

    Config (defaults): ``epochs`` (3), ``lr`` (0.05), ``batch_size`` (16), ``scope``: ``"all"``
    trains every parameter (BatchNorm in training mode), ``"last"`` only the last ``nn.Linear``;
    the rest is frozen, BatchNorm running statistics included (the model runs in eval mode), so
    every other tensor stays bit-identical.
    """
    import torch

    cfg = _config(config)
    x, y = data
    x = torch.as_tensor(x).to(torch.float32)
    y = torch.as_tensor(y).to(torch.int64).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"X has {len(x)} items but y has {len(y)}")
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    if cfg["scope"] == "last":
        keep = {id(p) for p in last_linear(model).parameters()}
        for p in params:
            p.requires_grad_(id(p) in keep)
        model.eval()
    else:
        model.train()
    trainable = [p for p in params if p.requires_grad]
    try:
        opt = torch.optim.SGD(trainable, lr=float(cfg["lr"]), momentum=0.9)
        loss_fn = torch.nn.CrossEntropyLoss()
        n, bs = len(x), int(cfg["batch_size"])
        for _ in range(int(cfg["epochs"])):
            order = torch.randperm(n)
            for start in range(0, n, bs):
                idx = order[start : start + bs]
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)
            p.grad = None


def accuracy(model: "nn.Module", data: tuple["torch.Tensor", "torch.Tensor"]) -> float:
    """Fraction of ``data`` that ``model`` classifies correctly (eval mode, no gradients)."""
    import torch

    x, y = data
    model.eval()
    with torch.no_grad():
        return float((model(torch.as_tensor(x)).argmax(1) == torch.as_tensor(y).reshape(-1)).float().mean())


def initial_models(n: int, classes: int = 10, seed: int = 0) -> list["nn.Module"]:
    """``n`` CNNs (``models.cnn``), model ``i`` initialised from seed ``seed + i``.

    The caller's RNG state is untouched.
    """

    return seeded_models(cnn, n, seed, classes=classes)

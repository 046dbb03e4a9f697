"""The training function of the battery use case, as recorded in provenance.

``train`` is referenced as ``"mm_jupyter.usecases.training:train"`` by ``mm.Provenance``. It only
uses torch's global RNG (for shuffling), so running it under ``mm_jupyter.store.provenance.
deterministic(seed)`` reproduces it bit for bit on the same software environment.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..store.trust import trusted
from .models import ffnn, seeded_models

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULTS: dict[str, Any] = {"epochs": 3, "lr": 1e-3, "batch_size": 64, "scope": "all"}
SCOPES = ("all", "last")


def _config(config: dict[str, Any] | None) -> dict[str, Any]:
    cfg = dict(DEFAULTS)
    unknown = sorted(set(config or {}) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown training config keys {unknown}; known: {sorted(DEFAULTS)}")
    cfg.update(config or {})
    if cfg["scope"] not in SCOPES:
        raise ValueError(f"training scope must be one of {SCOPES}, not {cfg['scope']!r}")
    if int(cfg["epochs"]) < 0 or int(cfg["batch_size"]) < 1:
        raise ValueError("epochs must be >= 0 and batch_size >= 1")
    return cfg


def last_linear(model: "nn.Module") -> "nn.Module":
    """The last ``nn.Linear`` of ``model`` (the layer a ``scope="last"`` run retrains)."""
    from torch import nn

    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to train")
    return layers[-1]


@trusted
def train(model: "nn.Module", data: tuple["torch.Tensor", "torch.Tensor"], config: dict[str, Any]) -> None:
    """Train ``model`` in place on ``data = (X, y)`` with mini-batch Adam on the MSE loss.

    Config (defaults): ``epochs`` (3), ``lr`` (1e-3), ``batch_size`` (64), ``scope``: ``"all"``
    trains every parameter, ``"last"`` only the last ``nn.Linear`` (the other parameters are frozen
    for the run and get neither gradients nor optimizer state, so they stay bit-identical).
    Shuffling draws from torch's global RNG (``torch.randperm``).
    """
    import torch

    cfg = _config(config)
    x, y = data
    params = list(model.parameters())
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters to train")
    dtype = params[0].dtype
    x = torch.as_tensor(x).to(dtype)
    y = torch.as_tensor(y).to(dtype)
    if y.dim() == 1:
        y = y.unsqueeze(1)
    if len(x) != len(y):
        raise ValueError(f"X has {len(x)} items but y has {len(y)}")

    was = [p.requires_grad for p in params]
    if cfg["scope"] == "last":
        keep = {id(p) for p in last_linear(model).parameters()}
        for p in params:
            p.requires_grad_(id(p) in keep)
    trainable = [p for p in params if p.requires_grad]
    try:
        opt = torch.optim.Adam(trainable, lr=float(cfg["lr"]))
        n, bs = len(x), int(cfg["batch_size"])
        model.train()
        for _ in range(int(cfg["epochs"])):
            order = torch.randperm(n)
            for start in range(0, n, bs):
                idx = order[start : start + bs]
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
    finally:
        for p in trainable:
            p.grad = None
        for p, w in zip(params, was):
            p.requires_grad_(w)


def mse(model: "nn.Module", data: tuple["torch.Tensor", "torch.Tensor"]) -> float:
    """Mean squared error of ``model`` on ``data`` (no gradients)."""
    import torch

    x, y = data
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y.reshape(len(y), -1)))


def initial_models(n: int, hidden: int = 48, seed: int = 0) -> list["nn.Module"]:
    """``n`` FFNN-``hidden`` voltage models, model ``i`` initialised from seed ``seed + i``.

    The caller's RNG state is untouched.
    """

    return seeded_models(ffnn, n, seed, hidden=hidden)

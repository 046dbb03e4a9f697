"""The multi-model management paper's model architectures, as recordable factories."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from ..store.architectures import architecture

if TYPE_CHECKING:
    from torch import nn


@architecture
def ffnn(hidden: int = 48, inputs: int = 5, layers: int = 3) -> "nn.Module":
    """FFNN-h: Linear(inputs→h, no bias), ReLU, then (layers-1) x [Linear(h→h), ReLU], Linear(h→1).

    FFNN-48 has 4,993 parameters, FFNN-69 10,075 (the paper's battery models).
    """
    from torch import nn

    mods: list[nn.Module] = [nn.Linear(inputs, hidden, bias=False), nn.ReLU()]
    for _ in range(layers - 1):
        mods += [nn.Linear(hidden, hidden), nn.ReLU()]
    mods.append(nn.Linear(hidden, 1))
    return nn.Sequential(*mods)


@architecture
def cnn(classes: int = 10, channels: int = 3) -> "nn.Module":
    """A CIFAR-style CNN with 6,918 parameters (BatchNorm included, so int64 buffers too)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 20), nn.ReLU(), nn.Linear(20, classes),
    )


def last_layer_prefix(model: "nn.Module") -> str:
    """State-dict prefix of the last trainable layer (what a partial update retrains)."""
    names = [n for n, p in model.named_parameters()]
    return names[-1].rsplit(".", 1)[0] + "."


def seeded_models(factory: Callable[..., "nn.Module"], n: int, seed: int = 0, **kwargs: Any) -> list["nn.Module"]:
    """``n`` models from ``factory(**kwargs)``, model ``i`` initialised from seed ``seed + i``;
    the caller's RNG state is untouched."""
    import torch

    out = []
    for i in range(n):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            out.append(factory(**kwargs))
    return out

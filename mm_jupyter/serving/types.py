"""Serving's plain types, a leaf module: what the queue, the server and the HTTP endpoint pass
between them. Keeping them here (not in ``server``) leaves the package without import circles:
``batching`` and ``http`` import these, and only ``server`` imports ``batching`` and ``http``."""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from ..store import SetRef


@dataclass(frozen=True)
class Prediction:
    """One answer: the model's output and the set version that produced it."""

    model: str
    version: "SetRef"
    output: "torch.Tensor"
    cached: bool
    latency_s: float          # from the request's arrival (default: its submission) to the answer
    answered_at: float = 0.0  # time.perf_counter() when answered: the metrics' clock

    def __repr__(self) -> str:
        how = "cache" if self.cached else "computed"
        return f"Prediction({self.model!r} by {self.version}, {how}, shape {list(self.output.shape)})"


class Answering(Protocol):
    """What the HTTP endpoint needs of a server (``server.Server`` is one)."""

    @property
    def closed(self) -> bool: ...

    @property
    def version(self) -> "SetRef": ...

    @property
    def models(self) -> list[str]: ...

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    def submit(self, model: str | int, x: Any, arrival: float | None = None) -> "Future[Prediction]": ...

    def metrics(self, window_s: float = 10.0, since: float | None = None, until: float | None = None,
                label: str | None = None) -> dict[str, Any]: ...

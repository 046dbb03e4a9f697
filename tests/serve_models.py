"""Importable models for the serving tests (architectures are recorded by class path), and ``held``."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn


class ItemNet(nn.Module):
    """A model ``torch.func.vmap`` cannot batch: its forward reads a Python number from a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + 0.0 * float(x.sum().item())
        return self.l(x) * scale


@contextmanager
def held(server: Any) -> Iterator[Any]:
    """The server's worker stuck inside a batch until the block ends, so requests submitted meanwhile
    stay queued (what a busy worker looks like). Yields the future of the request it is stuck on."""
    gate, inside = threading.Event(), threading.Event()
    runner = server._runner

    def stuck(run: Callable[..., Any]) -> Callable[..., Any]:
        def wait_then_run(*args: Any) -> Any:
            inside.set()
            assert gate.wait(60), "held for more than 60 s"
            return run(*args)
        return wait_then_run

    runner.run_multi, runner.run_one = stuck(runner.run_multi), stuck(runner.run_one)
    try:
        first = server.submit(0, torch.zeros(server.input_shape))
        assert inside.wait(30), "the worker did not take the request"
        yield first
    finally:
        del runner.run_multi, runner.run_one
        gate.set()

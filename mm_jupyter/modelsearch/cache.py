"""Tiered cache of intermediate results: device memory, host memory, disk spill.

The planner keeps the plan's peak within the budget of the fastest tier; the tiers make execution
robust when real sizes exceed the estimate: an entry that does not fit is spilled to the next tier,
choosing the resident entry whose next use is furthest away (the plan says when that is). Disk
entries are raw tensor bytes in a private temp folder — never pickled.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass
class _Entry:
    tier: int
    tensor: "torch.Tensor | None" = None
    path: str | None = None
    dtype: "torch.dtype | None" = None
    shape: tuple[int, ...] = ()
    nbytes: int = 0


@dataclass
class TieredCache:
    """``budgets[i]`` bytes for in-memory tier ``i`` (``devices[i]``); the last tier is disk."""

    devices: list[str]
    budgets: list[int | None]
    next_use: Callable[[int], int] = lambda key: 0
    entries: dict[int, _Entry] = field(default_factory=dict)
    used: list[int] = field(default_factory=list)
    peak: int = 0
    spilled_bytes: int = 0
    _dir: str | None = None

    def __post_init__(self) -> None:
        self.used = [0] * len(self.devices)

    @property
    def memory_bytes(self) -> int:
        return sum(self.used)

    def put(self, key: int, tensor: "torch.Tensor") -> None:
        nbytes = tensor.element_size() * tensor.numel()
        tier = self._place(nbytes, exclude=key)
        if tier < len(self.devices):
            t = tensor if str(tensor.device) == self.devices[tier] else tensor.to(self.devices[tier])
            self.entries[key] = _Entry(tier, t, nbytes=nbytes)
            self.used[tier] += nbytes
        else:
            self.entries[key] = self._to_disk(tensor, nbytes)
        self.peak = max(self.peak, self.memory_bytes)

    def get(self, key: int, device: str) -> "torch.Tensor":
        e = self.entries[key]
        if e.tensor is not None:
            return e.tensor if str(e.tensor.device) == device else e.tensor.to(device)
        import torch

        assert e.path is not None and e.dtype is not None  # not in memory: spilled to disk (_to_disk)
        raw = np.fromfile(e.path, dtype=np.uint8)
        t = torch.from_numpy(raw).view(e.dtype).view(e.shape)
        return t.to(device)

    def release(self, key: int) -> None:
        e = self.entries.pop(key, None)
        if e is None:
            return
        if e.tensor is not None:
            self.used[e.tier] -= e.nbytes
        elif e.path:
            os.unlink(e.path)

    def _fits(self, tier: int, nbytes: int) -> bool:
        budget = self.budgets[tier]
        return budget is None or self.used[tier] + nbytes <= budget

    def _place(self, nbytes: int, exclude: int) -> int:
        """The fastest tier that can take ``nbytes``, spilling entries used later than any other."""
        for tier in range(len(self.devices)):
            while not self._fits(tier, nbytes):
                victims = [k for k, e in self.entries.items() if e.tier == tier and e.tensor is not None]
                if not victims:
                    break
                far = max(victims, key=self.next_use)
                if self.next_use(far) <= self.next_use(exclude):
                    break  # everything resident is needed sooner than the new entry
                self._demote(far)
            if self._fits(tier, nbytes):
                return tier
        return len(self.devices)

    def _demote(self, key: int) -> None:
        e = self.entries[key]
        assert e.tensor is not None
        self.used[e.tier] -= e.nbytes
        nxt = e.tier + 1
        if nxt < len(self.devices) and self._fits(nxt, e.nbytes):
            e.tensor = e.tensor.to(self.devices[nxt])
            e.tier = nxt
            self.used[nxt] += e.nbytes
        else:
            self.entries[key] = self._to_disk(e.tensor, e.nbytes)

    def _to_disk(self, tensor: "torch.Tensor", nbytes: int) -> _Entry:
        import torch

        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="mm_jupyter_spill_")
        fd, path = tempfile.mkstemp(dir=self._dir, suffix=".bin")
        cpu = tensor.detach().to("cpu").contiguous()
        with os.fdopen(fd, "wb") as f:
            if nbytes:
                f.write(cpu.reshape(-1).view(torch.uint8).numpy().tobytes())
        self.spilled_bytes += nbytes
        return _Entry(len(self.devices), None, path, cpu.dtype, tuple(cpu.shape), nbytes)

    def close(self) -> None:
        self.entries.clear()
        self.used = [0] * len(self.devices)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

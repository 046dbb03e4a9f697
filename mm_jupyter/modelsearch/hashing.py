"""Content ids of blocks: identical blocks of different candidates are recognised (and stored,
loaded and run once) by a hash of what determines their output.

The id covers the call tag and the context inputs a layer takes, the module structure (every
submodule's class, ``extra_repr()`` and scalar hyperparameter attributes, with names relative to
the block), the generated code of every traced piece (``fx.GraphModule``: its operations, their
targets and constants, with canonical names) and every parameter and buffer (name relative to the
block, dtype, shape, raw bytes). Nothing positional enters it, so the same layer, or an identical
copy, has the same id at any position of any model.
"""
from __future__ import annotations

import hashlib
import weakref
from typing import Any

import torch
from torch import fx, nn

from ..errors import SearchError
from .blocks import Block
from .identity import IdentityCache, Scope
from .quickhash import quick_hash

_VERSION = b"mm-block-id/1"

# Attributes that do not change what a block computes at inference (training switches, cache slots).
_IGNORED_ATTRS = frozenset({"training", "gradient_checkpointing", "layer_idx"})
_SCALARS = (bool, int, float, str, type(None))


class _Fields:
    """Length-prefixed fields, so no two different field sequences hash the same. Small fields are
    gathered and hashed in one call (the byte stream, hence the id, is the same as field by field);
    a tensor's bytes go to the hash directly, never copied."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.small: list[bytes] = []

    def put(self, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        self.small.append(len(raw).to_bytes(8, "little"))
        self.small.append(raw)

    def put_large(self, raw: memoryview) -> None:
        self.small.append(raw.nbytes.to_bytes(8, "little"))
        self.h.update(b"".join(self.small))
        self.small.clear()
        self.h.update(raw)

    def hexdigest(self) -> str:
        self.h.update(b"".join(self.small))
        self.small.clear()
        return self.h.hexdigest()


def _scalar_attrs(module: nn.Module) -> str:
    """Public scalar attributes (e.g. attention heads, eps, activation names in custom modules)
    that ``extra_repr`` does not always show."""
    items: list[str] = []
    for key, value in sorted(vars(module).items()):
        if key.startswith("_") or key in _IGNORED_ATTRS:
            continue
        if isinstance(value, _SCALARS) or (
            isinstance(value, tuple) and all(isinstance(v, _SCALARS) for v in value)
        ):
            items.append(f"{key}={value!r}")
    return ";".join(items)


def _tensor_bytes(name: str, t: torch.Tensor) -> memoryview:
    """The tensor's raw bytes without a per-element Python loop (zero-copy when already contiguous).
    First as numpy's view: ``numpy()`` refuses exactly what needs a closer look (another device, the
    meta device, a sparse or quantized layout, a conjugate or negative bit, a dtype numpy lacks), and
    a C-contiguous view's buffer is the tensor's bytes in memory order, as ``view(torch.uint8)`` gives
    them; two calls instead of a dozen checks, on every tensor of every candidate of every search."""
    try:
        arr = t.detach().numpy()
    except (TypeError, RuntimeError):
        return _tensor_bytes_checked(name, t)
    return arr.data if arr.flags.c_contiguous else _tensor_bytes_slow(t)


def _tensor_bytes_checked(name: str, t: torch.Tensor) -> memoryview:
    if t.is_meta:
        raise SearchError(f"cannot hash block tensor {name!r}: it is on the meta device (no data)")
    if t.layout != torch.strided or t.is_quantized:
        raise SearchError(f"cannot hash block tensor {name!r}: unsupported layout {t.layout}")
    if t.device.type == "cpu" and t.is_contiguous() and not (t.is_conj() or t.is_neg()):
        return t.detach().view(torch.uint8).numpy().data if t.dim() else _tensor_bytes_slow(t)
    return _tensor_bytes_slow(t)


def _tensor_bytes_slow(t: torch.Tensor) -> memoryview:
    flat = t.detach()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous().reshape(-1)
    if flat.is_conj():
        flat = flat.resolve_conj()
    if flat.is_neg():
        flat = flat.resolve_neg()
    return flat.view(torch.uint8).numpy().data


def block_id(block: Block, scope: Scope | None = None) -> str:
    """sha256 hex id of a block's call, structure and tensors (see the module docstring). What the
    id reads besides the tensors' bytes is remembered per block module (``identity.py``), or in
    ``scope`` (a ``Split.scope``: the model's signature just checked covers every module of its
    tree, so a block inside it needs no walk of its own); the bytes are read on every call: they
    are the proof that a candidate did not change. They go through a 128-bit XXH3 (keyed with a
    secret drawn per process, ~9x sha256's speed here) first: when the block's remembered plan last
    gave its id for bytes with the same XXH3 digest, that id is returned without the sha256 (the
    plan holds the same tensor objects, dtypes and shapes, so equal digests mean equal bytes but
    for a 2**-128 chance that nobody outside this process can aim at); otherwise sha256 decides."""
    if not isinstance(block, Block):
        raise SearchError(f"block_id takes a Block, got {type(block).__name__}")
    if scope is not None and id(block.module) in scope.tree:
        at = (id(block.module), block.call, tuple(block.inputs))
        plan = scope.memo.get(at)
        if plan is None:
            plan = scope.memo[at] = _plan(block)
    else:
        plan = _PLANS.get(block.module, (block.call, tuple(block.inputs)), lambda: _plan(block))
    if plan is None:
        return _digest(block, True)
    views = []
    quick = quick_hash()
    for name, ref in plan.tensors:
        t = ref()
        if t is None:  # cannot happen while the signature holds (it keeps every tensor checked alive)
            return _digest(block, True)
        raw = _tensor_bytes(name, t)
        quick.update(raw)
        views.append(raw)
    check = quick.digest()
    seen = plan.seen
    if seen is not None and seen[0] == check:
        return seen[1]
    h = hashlib.sha256()
    for segment, raw in zip(plan.segments, views):
        h.update(segment)
        h.update(raw)
    h.update(plan.segments[-1])
    out = h.hexdigest()
    plan.seen = (check, out)
    return out


class _Plan:
    """The id's byte stream as ``segments`` around the bytes of ``tensors`` (held weakly; the
    signature that keeps this plan keeps them alive), and ``seen``: the XXH3 digest of the tensors'
    bytes the last id was computed from, with that id."""

    __slots__ = ("segments", "tensors", "seen")

    def __init__(self, segments: list[bytes], tensors: list[tuple[str, "weakref.ref[torch.Tensor]"]]) -> None:
        self.segments = segments
        self.tensors = tensors
        self.seen: tuple[bytes, str] | None = None


_PLANS = IdentityCache[_Plan](4096)


def _plan(block: Block) -> _Plan:
    """The id's byte stream as segments around the tensors' bytes (same bytes as ``_digest``)."""
    f = _Fields()
    tensors = _fields(block, f)
    segments: list[bytes] = []
    refs: list[tuple[str, weakref.ref[torch.Tensor]]] = []
    for kind, name, t in tensors:
        f.put(kind)
        f.put(name)
        f.put(str(t.dtype))
        f.put(",".join(map(str, t.shape)))
        f.small.append((t.numel() * t.element_size()).to_bytes(8, "little"))
        segments.append(b"".join(f.small))
        f.small.clear()
        refs.append((name, weakref.ref(t)))
    segments.append(b"".join(f.small))
    return _Plan(segments, refs)


def block_structure(block: Block) -> str:
    """sha256 hex of everything ``block_id`` covers except the tensors' bytes: two blocks with the
    same structure take each other's state (a stored block loaded into a rebuilt skeleton)."""
    return _digest(block, False)


def _fields(block: Block, h: _Fields) -> list[tuple[str, str, Any]]:
    """Puts the id's fields that precede the tensors; returns the tensors as (kind, name, tensor)."""
    h.put(_VERSION)
    h.put(block.call)
    if block.inputs:
        h.put("inputs")
        h.put(",".join(block.inputs))
    for name, module in block.module.named_modules():
        cls = type(module)
        h.put("module")
        h.put(name)
        h.put(f"{cls.__module__}:{cls.__qualname__}")
        h.put(module.extra_repr())
        h.put(_scalar_attrs(module))
        if isinstance(module, fx.GraphModule):
            h.put("code")
            h.put(module.code)
    tensors: list[tuple[str, str, Any]] = [("param", n, t) for n, t in block.module.named_parameters()]
    tensors += [("buffer", n, t) for n, t in block.module.named_buffers()]
    return tensors


def _digest(block: Block, values: bool) -> str:
    if not isinstance(block, Block):
        raise SearchError(f"block_id takes a Block, got {type(block).__name__}")
    h = _Fields()
    for kind, name, t in _fields(block, h):
        h.put(kind)
        h.put(name)
        h.put(str(t.dtype))
        h.put(",".join(map(str, t.shape)))
        if values:
            h.put_large(_tensor_bytes(name, t))
    return h.hexdigest()


def block_ids(blocks: list[Block]) -> list[str]:
    """Ids of a split's blocks, in order (the candidate's path in the task tree)."""
    return [block_id(b) for b in blocks]


__all__ = ["block_id", "block_ids", "block_structure"]
